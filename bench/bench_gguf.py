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
    .venv/bin/python bench/bench_gguf.py --model tiny-llama-256 --types q4_k_m q6_k   # K-quants (rows of 256)

``--quality`` (SmolLM2 only): perplexity, from llama.cpp's own logits, of our tuned files against
llama.cpp's quantizer (``llama_model_quantize`` on an F16 file we write of the FP model) at the
same type, on held-out BBC windows; llama.cpp's quantizer is told to keep ``token_embd``/``output``
in F16 as our files do, so the comparison is of the quantized layers only (no importance matrix).

    .venv/bin/python bench/bench_gguf.py --model smollm2 --quality --types q4_k_m q2_k_s --iters 32
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
# K-quant mixes: the format picks every layer's scheme (no bits/sym settings); numbers are llama.h's
# LLAMA_FTYPE_MOSTLY_* for llama_model_quantize (the worker has no auto_round to look them up).
K_TYPES = {"q2_k_s": 21, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
LEGACY_FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}
GGML_F16 = 1
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


def llamacpp_quantize_worker(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer at ``ftype`` (no importance matrix), embeddings and output kept F16."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    params.token_embedding_type = GGML_F16
    params.output_tensor_type = GGML_F16
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def llamacpp_ppl_worker(gguf_path: str, windows_path: str, out_path: str) -> None:
    """Perplexity of each window (ids in a .npy ``[n, seqlen]``) from llama.cpp's logits."""
    import numpy as np
    from llama_cpp import Llama

    windows = np.load(windows_path)
    llm = Llama(model_path=gguf_path, n_ctx=int(windows.shape[1]) + 8, logits_all=True, verbose=False,
                n_threads=2, seed=0)
    nll, count = 0.0, 0
    for row in windows:
        ids = [int(t) for t in row]
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    Path(out_path).write_text(json.dumps({"ppl": float(np.exp(nll / count)), "tokens": count}))


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
    from tiny_models import VOCAB, tiny_llama, tiny_qwen2
    from tokenizer_fixture import make_tokenizer

    def tiny_llama_256():  # rows of 256: the K types store every layer without a fallback
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=512, tie_word_embeddings=False)).eval()

    factory = {"tiny-llama": tiny_llama, "tiny-qwen2": tiny_qwen2, "tiny-llama-256": tiny_llama_256}[name]
    return factory, make_tokenizer()


def _scheme(qtype: str) -> Dict[str, Any]:
    """AutoRound keywords for a type: the legacy types need their scheme, K mixes choose their own."""
    if qtype in K_TYPES:
        return {}
    bits, sym = TYPES[qtype]
    return {"bits": bits, "sym": sym, "group_size": 32}


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
    t0 = time.perf_counter()
    ar = AutoRound(make_model(), tokenizer, **_scheme(qtype), iters=args.iters,
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
                   choices=["tiny-llama", "tiny-qwen2", "tiny-llama-256", "smollm2"])
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES) + list(K_TYPES))
    p.add_argument("--quality", action="store_true", help="perplexity vs llama.cpp's quantizer (smollm2)")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--ppl-seqlen", type=int, default=256)
    p.add_argument("--work", type=Path, default=None,
                   help="--quality: keep the files here and reuse our tuned files found there (default: a temp folder)")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--llamacpp-python", type=Path, default=None)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--llamacpp-worker", nargs=3, metavar=("GGUF", "REQUEST", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--quantize-worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--ppl-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.llamacpp_worker:
        llamacpp_worker(*args.llamacpp_worker)
        return 0
    if args.quantize_worker:
        llamacpp_quantize_worker(*args.quantize_worker)
        return 0
    if args.ppl_worker:
        llamacpp_ppl_worker(*args.ppl_worker)
        return 0
    python = _llamacpp_python(args.llamacpp_python)
    if args.quality:
        return quality(args, python)
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


# ------------------------------------------------------------------ quality vs llama.cpp's quantizer
def _worker(python: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)


def _ppl(python: str, gguf_path: Path, windows: Path) -> Dict[str, Any]:
    out = gguf_path.with_suffix(".ppl.json")
    proc = _worker(python, "--ppl-worker", str(gguf_path), str(windows), str(out))
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(out.read_text())


def _ours(args, qtype: str, make_model, tokenizer, data: Path, windows, work: Path) -> Dict[str, Any]:
    """Tune and export our file (or reuse the one a previous run left in ``work``)."""
    from auto_round import AutoRound
    from auto_round.assets import perplexity_of_windows

    folder, record = work / f"ours-{qtype}", work / f"ours-{qtype}.json"
    if record.is_file() and list(folder.glob("*.gguf")):
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    ar = AutoRound(make_model(), tokenizer, **_scheme(qtype), iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=str(data), device="cpu")
    ar.quantize_and_save(folder, format=f"gguf:{qtype}", inplace=False, overwrite=True)
    rec = {"quantize_s": round(time.perf_counter() - t0, 1), "torch_ppl": perplexity_of_windows(ar.model, windows),
           "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen, "plan": ar.summary["plan"],
           "file": str(next(folder.glob("*.gguf")))}
    record.write_text(json.dumps(rec, indent=1))
    return rec


def quality(args, python: Optional[str]) -> int:
    """Perplexity (llama.cpp's logits) of our tuned files vs llama.cpp's quantizer, SmolLM2, held-out BBC.
    Without llama_cpp only our side runs (kept in ``--work`` for a later run)."""
    import numpy as np

    from auto_round.assets import bbc_split, perplexity_of_windows, token_windows
    from auto_round.export import get_format

    make_model, tokenizer = _load("smollm2")
    calib, heldout = bbc_split(ROOT / ".cache" / "assets")
    windows = token_windows(tokenizer, heldout, args.ppl_seqlen, args.ppl_windows)
    out_json = args.json if args.json != RESULTS else RESULTS.with_name("gguf_quality.json")
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_gguf_q_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        np.save(work / "windows.npy", windows.numpy())
        data = work / "calib.txt"
        data.write_text("\n\n".join(calib), encoding="utf-8")
        ours = {qtype: _ours(args, qtype, make_model, tokenizer, data, windows, work) for qtype in args.types}
        if python is None:
            print("our files are in", work, "; llama_cpp is not importable: the comparison needs it "
                  "(python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python numpy)")
            return 0
        model = make_model()
        f16 = work / "f16"
        if not list(f16.glob("*.gguf")):
            get_format("gguf:q8_0").export(model, {}, f16, {}, False, tokenizer=tokenizer)  # every tensor F16/F32
        f16_file = next(f16.glob("*.gguf"))
        base = {"fp32_torch": perplexity_of_windows(model, windows),
                "f16_llamacpp": _ppl(python, f16_file, work / "windows.npy").get("ppl")}
        print(f"SmolLM2 held-out ppl ({windows.shape[0]}x{windows.shape[1]} tokens): fp32 torch "
              f"{base['fp32_torch']:.3f}, F16 file in llama.cpp {base['f16_llamacpp']}")
        for qtype in args.types:
            ftype = K_TYPES.get(qtype, LEGACY_FTYPES.get(qtype))
            theirs = work / f"llamacpp-{qtype}.gguf"
            proc = _worker(python, "--quantize-worker", str(f16_file), str(theirs), str(ftype))
            rec: Dict[str, Any] = {"type": qtype, "ours": {**ours[qtype], **_ppl(python, Path(ours[qtype]["file"]),
                                                                                    work / "windows.npy")}}
            rec["llamacpp_quantizer"] = _ppl(python, theirs, work / "windows.npy") if proc.returncode == 0 \
                else {"error": proc.stderr[-2000:]}
            rec["file_mib"] = {"ours": round(Path(ours[qtype]["file"]).stat().st_size / 2**20, 1),
                               "llamacpp": round(theirs.stat().st_size / 2**20, 1) if theirs.exists() else None}
            records.append(rec)
            print(f"{qtype}: ppl ours {rec['ours'].get('ppl')} (torch {rec['ours']['torch_ppl']:.3f}, iters "
                  f"{rec['ours']['iters']}) vs llama.cpp's quantizer {rec['llamacpp_quantizer'].get('ppl')}; "
                  f"files {rec['file_mib']} MiB")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"base": base, "windows": list(windows.shape), "records": records},
                                   indent=2, default=str))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
