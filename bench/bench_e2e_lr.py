"""e2e learning rates from one block-wise run: SmolLM2, enable_alg_ext, iters 50, the frontier's BBC windows (32 x 256,
batch 4, seed 42), then one e2e_epochs trial per LR:EPOCHS from the same records, held-out ppl (16 x 512) of each.

    .venv/bin/python bench/bench_e2e_lr.py W4G128 3.75e-4:2 1.5e-3:2     # bench/results/e2e_lr_W4G128.json
"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, "bench")
import torch
from transformers import AutoTokenizer
from _common import bbc_texts, reference_windows, smollm2_dir, write_text_for_windows
from _worker import _fixed_windows_class, _ppl
from demo.assets import token_windows
from auto_round import AutoRound
from auto_round.tuning.e2e import tune_scales
from auto_round.tuning.wrapper import load_record

args = sys.argv[1:] or ["W4G128", "3.75e-4:2", "1.5e-3:2"]  # make bench: the figures of the README
scheme = args[0]
trials = [tuple(float(x) for x in t.split(":")) for t in args[1:]]  # LR:EPOCHS
bits, gs = {"W4G128": (4, 128), "W3G128": (3, 128), "W2G64": (2, 64)}[scheme]
work = Path(".cache/bench/e2e"); work.mkdir(parents=True, exist_ok=True)
model_dir = smollm2_dir(); tok = AutoTokenizer.from_pretrained(model_dir)
calib, heldout = bbc_texts()
tf = work / "calib.txt"; write_text_for_windows(tok, calib, tf, 32 * 256)
win = reference_windows(tok, tf, 256, 32)
torch.save(token_windows(tok, heldout, 512, 16), work / "heldout.pt")
cap = {}
cls = _fixed_windows_class(AutoRound, win)
cls._e2e_tune = lambda self, teacher, batches: cap.update(teacher=teacher, batches=batches)
ar = cls(str(model_dir), None, model_dtype="fp32", bits=bits, group_size=gs, sym=True, iters=50, nsamples=32,
         seqlen=256, batch_size=4, seed=42, device="cpu", enable_alg_ext=True, e2e_epochs=1)
t = time.perf_counter(); ar.quantize(); tq = time.perf_counter() - t
out = {"scheme": scheme, "quantize_s": round(tq, 1), "blockwise_ppl": _ppl(ar.model, str(work / "heldout.pt")), "trials": []}
print(json.dumps(out), flush=True)
orig = {n: r.scale.clone() for n, r in ar.quantized_layers.items()}
for lr, ep in trials:
    for n, r in ar.quantized_layers.items():
        r.scale = orig[n].clone()
        with torch.no_grad():
            load_record(ar.model.get_submodule(n), r)
    t = time.perf_counter()
    res = tune_scales(ar.model, ar.quantized_layers, cap["batches"], cap["teacher"], int(ep), lr, 42, torch.device("cpu"))
    res["ppl"] = _ppl(ar.model, str(work / "heldout.pt")); res["wall_s"] = round(time.perf_counter() - t, 1)
    out["trials"].append(res); print(json.dumps(res), flush=True)
    (Path("bench/results") / f"e2e_lr_{scheme}.json").write_text(json.dumps(out, indent=1))
