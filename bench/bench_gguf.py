"""Our GGUF files in llama.cpp: logits of a prompt vs our in-memory quantized model.

For each ``gguf:<type>``: quantize the model, export it, then run the file in llama.cpp (through
llama-cpp-python) and compare the last-layer logits of the same token ids with our model's
(whose quantized layers hold exactly the dequantized weights the file stores), plus llama.cpp's own
tokenization of the prompt against transformers'. Prints a table and writes
``bench/results/gguf.json``. Not a test: llama.cpp computes in its own kernels (on CPU it
quantizes activations to 8 bits for the quantized dot products), so small differences are
expected; a wrong permutation, tensor or metadata key shows as logits that disagree wholesale.

llama-cpp-python is not a dependency of the project and is not installed into ``.venv``. The
script uses ``llama_cpp`` when the running Python has it, else the Python given by
``--llamacpp-python`` (default ``.venv-llamacpp/bin/python``, built with
``python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python``, which
compiles llama.cpp, ~15 min on 2 cores), else it stops with that hint.

    .venv/bin/python bench/bench_gguf.py                      # tiny llama/qwen2, every type
    .venv/bin/python bench/bench_gguf.py --model smollm2 --types q4_0 q8_0 --iters 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gguf.json"
DEFAULT_LLAMACPP_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
TYPES = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False), "q8_0": (8, True)}
PROMPT = ("The history of the river begins in the mountains, where snow melts each spring. "
          "In 1848, 25 settlers arrived; by 1900 the town had 3,417 people.")


# ------------------------------------------------------------------ llama.cpp side (no torch)
def llamacpp_worker(gguf_path: str, request_path: str, out_path: str) -> None:
    """Run in a Python that has llama_cpp: logits of the given ids and the file's tokenization."""
    import numpy as np
    from llama_cpp import Llama

    req = json.loads(Path(request_path).read_text())
    ids: List[int] = req["ids"]
    llm = Llama(model_path=gguf_path, n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                n_threads=req.get("threads", 2), seed=0)
    t0 = time.perf_counter()
    llm.eval(ids)
    eval_s = time.perf_counter() - t0
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    tokens = llm.tokenize(req["prompt"].encode("utf-8"), add_bos=True, special=False)
    np.save(out_path, logits)
    Path(out_path + ".json").write_text(json.dumps({"tokens": list(map(int, tokens)), "eval_s": eval_s}))


def _llamacpp_python(requested: Optional[Path]) -> Optional[str]:
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    path = requested or DEFAULT_LLAMACPP_PYTHON
    if Path(path).exists():
        probe = subprocess.run([str(path), "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            return str(path)
    return None


def _run_llamacpp(python: str, gguf_path: Path, ids: List[int], prompt: str, work: Path) -> Dict[str, Any]:
    import numpy as np

    req, out = work / "request.json", work / "logits.npy"
    req.write_text(json.dumps({"ids": ids, "prompt": prompt}))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--llamacpp-worker", str(gguf_path), str(req),
                           str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return {"logits": np.load(out), **json.loads(Path(str(out) + ".json").read_text())}


# ------------------------------------------------------------------ our side
def _load(name: str):
    sys.path.insert(0, str(ROOT / "tests"))
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from auto_round.assets import fetch_smollm2

        folder = fetch_smollm2(ROOT / ".cache" / "assets")
        import torch

        return (lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                AutoTokenizer.from_pretrained(folder))
    from tiny_models import tiny_llama, tiny_qwen2
    from tokenizer_fixture import make_tokenizer

    factory = {"tiny-llama": tiny_llama, "tiny-qwen2": tiny_qwen2}[name]
    return factory, make_tokenizer()


def _compare(ours, theirs) -> Dict[str, float]:
    import numpy as np

    diff = np.abs(ours - theirs)
    scale = float(np.abs(ours).max())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_rel": float(diff.max() / scale),
            "top1_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()), "logit_range": scale}


def bench_one(model_name: str, qtype: str, args, python: str, work: Path) -> Dict[str, Any]:
    import torch

    from auto_round import AutoRound

    make_model, tokenizer = _load(model_name)
    bits, sym = TYPES[qtype]
    t0 = time.perf_counter()
    ar = AutoRound(make_model(), tokenizer, bits=bits, sym=sym, group_size=32, iters=args.iters,
                   nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                   dataset="auto_round:offline_corpus", device="cpu")
    folder = work / f"{model_name}-{qtype}"
    ar.quantize_and_save(folder, format=f"gguf:{qtype}", inplace=False, overwrite=True)
    quant_s = time.perf_counter() - t0
    gguf_path = next(folder.glob("*.gguf"))
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        # The file keeps embeddings / lm_head as F16: compare with our model rounded the same way.
        for name, param in ar.model.named_parameters():
            if param.dim() > 1 and name not in {f"{n}.weight" for n in ar.quantized_layers}:
                param.copy_(param.half().float())
        ours = ar.model(torch.tensor([ids])).logits[0].float().numpy()
        fp = make_model()(torch.tensor([ids])).logits[0].float().numpy()
    got = _run_llamacpp(python, gguf_path, ids, PROMPT, folder)
    rec: Dict[str, Any] = {"model": model_name, "type": qtype, "tokens": len(ids),
                           "quantize_export_s": round(quant_s, 2), "file_mib": round(gguf_path.stat().st_size / 2**20, 2)}
    if "error" in got:
        rec["error"] = got["error"]
        return rec
    rec.update(_compare(ours, got["logits"]))
    # Scale of the signal: how far quantization itself moved the logits from the FP model's.
    rec["quantization_max_abs"] = _compare(fp, ours)["max_abs"]
    rec["tokenization_equal"] = got["tokens"] == ids
    rec["llamacpp_eval_s"] = round(got["eval_s"], 4)
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["tiny-llama", "tiny-qwen2"],
                   choices=["tiny-llama", "tiny-qwen2", "smollm2"])
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--llamacpp-python", type=Path, default=None)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--llamacpp-worker", nargs=3, metavar=("GGUF", "REQUEST", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.llamacpp_worker:
        llamacpp_worker(*args.llamacpp_worker)
        return 0
    python = _llamacpp_python(args.llamacpp_python)
    if python is None:
        print("SKIPPED: llama_cpp (llama-cpp-python) is not importable here nor in "
              f"{args.llamacpp_python or DEFAULT_LLAMACPP_PYTHON}. Build it in its own venv (not .venv): "
              "python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python numpy")
        return 0
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as tmp:
        for model_name in args.model:
            for qtype in args.types:
                rec = bench_one(model_name, qtype, args, python, Path(tmp))
                records.append(rec)
                if "error" in rec:
                    print(f"{model_name:11s} {qtype}: FAILED\n{rec['error']}")
                    continue
                print(f"{model_name:11s} {qtype}: max|dlogit| {rec['max_abs']:.4f} (rel {rec['max_rel']:.2e}, "
                      f"mean {rec['mean_abs']:.4f}; quantization moved them {rec['quantization_max_abs']:.3f}), "
                      f"top-1 agree {rec['top1_agree']:.3f}, "
                      f"tokenization equal {rec['tokenization_equal']}, {rec['file_mib']} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"prompt": PROMPT, "iters": args.iters, "records": records}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
