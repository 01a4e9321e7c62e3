"""e2e learning rates from one block-wise run: several ``e2e_epochs`` trials without re-tuning the blocks.

SmolLM2-135M-Instruct (fp32), ``enable_alg_ext``, iters 50, sym, on the frontier's identical BBC windows
(32 x 256, batch 4, seed 42; see bench_frontier.py). The FP model's top-k teacher is taken once before
tuning (as ``AutoRound`` does for ``e2e_epochs``), the blocks are tuned once, then each ``LR:EPOCHS`` trial
restarts from the block-wise scales, runs :func:`auto_round.tuning.e2e.tune_scales` and measures the held-out
perplexity (16 x 512). Writes bench/results/e2e_lr_<scheme>.json after every trial.

    .venv/bin/python bench/bench_e2e_lr.py                                     # W4G128 fp32 3.75e-4:2 3.75e-4:4 7.5e-4:2 2.5e-4:3
    .venv/bin/python bench/bench_e2e_lr.py W3G128 fp32 7.5e-4:2 1.06e-3:2     # the README's W3 trials
    .venv/bin/python bench/bench_e2e_lr.py W4G128 3.75e-4:2 1.5e-3:2          # with bf16 autocast (amp) in the blocks

``fp32`` after the scheme tunes the blocks without bf16 autocast (``amp=False``; the results file then ends in
``_fp32``), as ``bench_frontier.py --disable-amp`` does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, WORK, identical_windows, smollm2_dir  # noqa: E402
from _worker import _fixed_windows_class, _ppl  # noqa: E402

SCHEMES = {"W4G128": (4, 128), "W3G128": (3, 128), "W2G64": (2, 64)}
DEFAULT = ["W4G128", "fp32", "3.75e-4:2", "3.75e-4:4", "7.5e-4:2", "2.5e-4:3"]


def main(argv=None) -> int:
    import torch
    from transformers import AutoTokenizer

    from auto_round import AutoRound
    from auto_round.tuning.e2e import TOP_K, teacher_targets, tune_scales
    from auto_round.tuning.wrapper import load_record

    args = list(sys.argv[1:] if argv is None else argv) or DEFAULT
    scheme, rest = args[0], args[1:]
    fp32 = bool(rest) and rest[0] == "fp32"
    trials = [tuple(float(x) for x in t.split(":")) for t in (rest[1:] if fp32 else rest)]  # LR:EPOCHS
    if scheme not in SCHEMES:
        raise SystemExit(f"scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    bits, gs = SCHEMES[scheme]
    work = WORK / "e2e_lr"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, win_file, eval_file = identical_windows(work, tok, 32, 256, 16, 512)
    cpu = torch.device("cpu")

    ar = _fixed_windows_class(AutoRound, torch.load(win_file))(
        str(model_dir), None, model_dtype="fp32", bits=bits, group_size=gs, sym=True, iters=50, nsamples=32,
        seqlen=256, batch_size=4, seed=42, device="cpu", enable_alg_ext=True,
        amp=not fp32)
    batches = ar.calibration_batches()
    teacher = teacher_targets(ar.model, batches, TOP_K, cpu)  # the FP model, before tuning
    t = time.perf_counter()
    ar.quantize()
    out = {"scheme": scheme, "amp": not fp32, "quantize_s": round(time.perf_counter() - t, 1),
           "blockwise_ppl": _ppl(ar.model, str(eval_file)), "trials": []}
    print(json.dumps(out), flush=True)
    start = {name: rec.scale.clone() for name, rec in ar.quantized_layers.items()}
    for lr, epochs in trials:
        for name, rec in ar.quantized_layers.items():  # back to the block-wise scales
            rec.scale = start[name].clone()
            with torch.no_grad():
                load_record(ar.model.get_submodule(name), rec)
        t = time.perf_counter()
        res = tune_scales(ar.model, ar.quantized_layers, batches, teacher, int(epochs), lr, 42, cpu)
        res["ppl"] = _ppl(ar.model, str(eval_file))
        res["wall_s"] = round(time.perf_counter() - t, 1)
        out["trials"].append(res)
        print(json.dumps(res), flush=True)
        (RESULTS / f"e2e_lr_{scheme}{'_fp32' if fp32 else ''}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
