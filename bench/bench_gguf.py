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

``--quality`` (SmolLM2 only): perplexity, from llama.cpp's own logits, of our files (one per
``--iters`` value; 0 is our optimized RTN) against llama.cpp's quantizer (``llama_model_quantize``
on an F16 file we write of the FP model) at the same type, on held-out BBC windows; llama.cpp's
quantizer is told to keep ``token_embd``/``output`` in F16 as our files do, so the comparison is
of the quantized layers only. ``--imatrix`` adds llama.cpp's quantizer with an importance matrix,
as llama.cpp users run it: ``llama-imatrix`` on the F16 file, then ``llama-quantize --imatrix``
(embeddings/output F16 again), with two matrices, both from BBC *calibration* articles only:
``tuner``, the very ``--nsamples`` x ``--seqlen`` samples our tuner calibrates on (decoded to text,
chunks of ``--seqlen``), and ``calib``, a larger slice of the same articles (``--imatrix-chunks`` x
``--imatrix-ctx`` tokens). Every file's tensor types are recorded (llama.cpp with an imatrix
switches a few ffn_down tensors of q4_0 to q4_1, for instance) and a type whose files differ says so.

llama-cpp-python cannot compute an importance matrix and ships neither tool; ``--imatrix`` looks for
``llama-imatrix``/``llama-quantize`` in ``--llamacpp-bin``, else beside the llama_cpp Python, else on
PATH, and says plainly that the column was not run when they are missing. ``make llamacpp-venv``
(``scripts/setup_llamacpp_venv.sh``, about 15 minutes on 2 cores) builds ``.venv-llamacpp`` with
llama-cpp-python from source and both tools from the very llama.cpp source it vendors, reusing the
objects of its build (so the tools and the evaluator are one version, and the tools run on the
evaluator's own libllama). Measured figures (``bench/results/gguf_quality.json``):

    .venv/bin/python bench/bench_gguf.py --model smollm2 --quality --imatrix \
        --types q4_0 q4_k_m q3_k_m q2_k_s --iters 0 --nsamples 32 --seqlen 256 --work .cache/gq
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

        from demo.assets import fetch_smollm2

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
    p.add_argument("--iters", type=int, nargs="+", default=[2],
                   help="tuning iterations (0: optimized RTN); --quality takes several, e.g. 0 32")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--alg-ext", action="store_true",
                   help="our runs with enable_alg_ext=True (the extended tuner; the library's default since "
                        "2026-12-07, when it is on wherever clip factors are tuned: without this flag the runs use "
                        "the plain tuner, enable_alg_ext=False, as the figures before that date did)")
    p.add_argument("--e2e-epochs", type=int, default=0,
                   help="ours: e2e_epochs (end-to-end scale tuning after the blocks; float-scale types only)")
    p.add_argument("--llamacpp-python", type=Path, default=None)
    p.add_argument("--imatrix", action="store_true",
                   help="--quality: also llama.cpp's quantizer with importance matrices (needs llama-imatrix, llama-quantize)")
    p.add_argument("--llamacpp-bin", type=Path, default=None,
                   help="folder with llama-imatrix and llama-quantize (default: beside the llama_cpp Python, else PATH)")
    p.add_argument("--imatrix-ctx", type=int, default=512, help="chunk length of the larger imatrix")
    p.add_argument("--imatrix-chunks", type=int, default=32, help="chunks of the larger imatrix")
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
    if len(args.iters) != 1:
        p.error("one --iters value without --quality")
    args.iters = args.iters[0]
    if python is None:
        print("SKIPPED: llama_cpp (llama-cpp-python) is not importable here nor in "
              f"{args.llamacpp_python or DEFAULT_LLAMACPP_PYTHON}. Build it in its own venv (not .venv): "
              "make llamacpp-venv")
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


def _ours(args, qtype: str, iters: int, make_model, tokenizer, data: Path, windows, work: Path) -> Dict[str, Any]:
    """Tune (or optimized-RTN at ``iters`` 0) and export our file, or reuse the one a previous run left in
    ``work`` with the same settings."""
    from auto_round import AutoRound
    from demo.assets import perplexity_of_windows

    tag = (f"ours-{qtype}-i{iters}" + ("-ext" if args.alg_ext else "")
           + (f"-e2e{args.e2e_epochs}" if args.e2e_epochs else ""))
    folder, record = work / tag, work / f"{tag}.json"
    if record.is_file() and list(folder.glob("*.gguf")):
        rec = json.loads(record.read_text())
        if (rec["nsamples"], rec["seqlen"]) == (args.nsamples, args.seqlen):
            return rec
    t0 = time.perf_counter()
    ar = AutoRound(make_model(), tokenizer, **_scheme(qtype), iters=iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=str(data), device="cpu",
                   enable_alg_ext=args.alg_ext, e2e_epochs=args.e2e_epochs)
    ar.quantize_and_save(folder, format=f"gguf:{qtype}", inplace=False, overwrite=True)
    rec = {"quantize_s": round(time.perf_counter() - t0, 1), "torch_ppl": perplexity_of_windows(ar.model, windows),
           "iters": iters, "enable_alg_ext": args.alg_ext, "e2e_epochs": args.e2e_epochs,
           "e2e": ar.summary["e2e"], "nsamples": args.nsamples, "seqlen": args.seqlen, "plan": ar.summary["plan"],
           "file": str(next(folder.glob("*.gguf")))}
    record.write_text(json.dumps(rec, indent=1))
    return rec


def _tensor_types(path: Path) -> Dict[str, int]:
    """How many tensors of each GGML type a file holds (the fallbacks and mixes show here)."""
    from gguf import GGUFReader

    counts: Dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _llamacpp_tools(requested: Optional[Path], python: str) -> Dict[str, Any]:
    """``llama-imatrix`` and ``llama-quantize``: in ``requested``, else beside the llama_cpp Python (the
    recipe of the module docstring puts them there), else on PATH. Tools beside that Python run with its
    ``llama_cpp/lib`` first on LD_LIBRARY_PATH, i.e. on the very libllama that evaluates the files.
    Returns ``{"error": ...}`` when one is missing."""
    probe = subprocess.run([python, "-c", "import os, llama_cpp; print(llama_cpp.__version__); "
                            "print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))"],
                           capture_output=True, text=True)
    py_version, lib = probe.stdout.split()[:2]
    beside = Path(python).parent
    found: Dict[str, str] = {}
    for tool in ("llama-imatrix", "llama-quantize"):
        candidates = [requested / tool] if requested else [beside / tool]
        if not requested and shutil.which(tool):
            candidates.append(Path(shutil.which(tool)))
        path = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        if path is None:
            return {"error": f"{tool} not found (looked in {', '.join(str(c.parent) for c in candidates)}). "
                             "llama-cpp-python cannot compute an importance matrix; build llama.cpp's tools "
                             "with make llamacpp-venv, or pass --llamacpp-bin DIR"}
        found[tool] = str(path)
    env = dict(os.environ)
    if not requested and Path(found["llama-quantize"]).parent == beside:
        # the tools' own libs (libllama-common, libllama-quantize-impl) sit beside them
        env["LD_LIBRARY_PATH"] = ":".join([lib, str(beside)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    ver = subprocess.run([found["llama-imatrix"], "--version"], env=env, capture_output=True, text=True)
    version = " ".join(line for line in (ver.stdout + ver.stderr).splitlines() if line.startswith("version"))
    return {"imatrix": found["llama-imatrix"], "quantize": found["llama-quantize"], "env": env,
            "llama_cpp_python": py_version, "tools_version": version or (ver.stdout + ver.stderr)[-300:]}


def _run_tool(tools: Dict[str, Any], cmd: List[str], log: Path) -> Optional[str]:
    """Run a llama.cpp tool, its output to ``log``; the tail of that output on failure, else None."""
    proc = subprocess.run(cmd, env=tools["env"], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    return None if proc.returncode == 0 else f"{Path(cmd[0]).name} exited {proc.returncode}:\n" + \
        (proc.stdout + proc.stderr)[-2000:]


def _imatrix(tools: Dict[str, Any], f16_file: Path, text: Path, ctx: int, chunks: Optional[int],
             out: Path) -> Dict[str, Any]:
    """llama-imatrix over ``text`` (chunks of ``ctx`` tokens, each started by BOS as llama.cpp does)."""
    import re

    cmd = [tools["imatrix"], "-m", str(f16_file), "-f", str(text), "-c", str(ctx), "-t", "2", "--no-ppl",
           "-o", str(out)] + (["--chunks", str(chunks)] if chunks else [])
    t0 = time.perf_counter()
    err = _run_tool(tools, cmd, out.with_suffix(".log"))
    if err or not out.is_file():
        return {"error": err or f"llama-imatrix wrote no {out}"}
    said = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", out.with_suffix(".log").read_text())
    n = int(said.group(1)) if said else None
    return {"file": str(out), "ctx": ctx, "chunks": n, "tokens": n * ctx if n else None, "text": text.name,
            "s": round(time.perf_counter() - t0, 1)}


def quality(args, python: Optional[str]) -> int:
    """Perplexity (llama.cpp's logits) of our files (each ``--iters``) vs llama.cpp's quantizer, plain and
    (``--imatrix``) with importance matrices, SmolLM2, held-out BBC. Without llama_cpp only our side runs
    (kept in ``--work`` for a later run)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import print_table, write_text_for_windows

    from demo.assets import bbc_split, perplexity_of_windows, token_windows
    from auto_round.calib.text import get_text_calibration
    from auto_round.export import get_format

    make_model, tokenizer = _load("smollm2")
    calib, heldout = bbc_split(ROOT / ".cache" / "assets")
    windows = token_windows(tokenizer, heldout, args.ppl_seqlen, args.ppl_windows)
    out_json = args.json if args.json != RESULTS else RESULTS.with_name("gguf_quality.json")
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_gguf_q_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        win = work / "windows.npy"
        np.save(win, windows.numpy())
        data = work / "calib.txt"
        data.write_text("\n\n".join(calib), encoding="utf-8")
        ours = {(q, it): _ours(args, q, it, make_model, tokenizer, data, windows, work)
                for q in args.types for it in args.iters}
        if python is None:
            print("our files are in", work, "; llama_cpp is not importable: the comparison needs it "
                  "(python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install llama-cpp-python numpy)")
            return 0
        model = make_model()
        f16 = work / "f16"
        if not list(f16.glob("*.gguf")):
            get_format("gguf:q8_0").export(model, {}, f16, {}, False, tokenizer=tokenizer)  # every tensor F16/F32
        f16_file = next(f16.glob("*.gguf"))
        base: Dict[str, Any] = {"fp32_torch": perplexity_of_windows(model, windows),
                                "f16_llamacpp": _ppl(python, f16_file, win).get("ppl")}
        print(f"SmolLM2 held-out ppl ({windows.shape[0]}x{windows.shape[1]} tokens): fp32 torch "
              f"{base['fp32_torch']:.3f}, F16 file in llama.cpp {base['f16_llamacpp']}")

        # Importance matrices of the FP model (F16 file), on BBC calibration articles only: "tuner" = the
        # very samples our tuner calibrates on (decoded, nsamples x seqlen), "calib" = a larger slice of
        # the same articles, as llama.cpp users compute one.
        imatrices: Dict[str, Dict[str, Any]] = {}
        tools: Dict[str, Any] = {}
        if args.imatrix:
            tools = _llamacpp_tools(args.llamacpp_bin, python)
            if "error" in tools:
                print(f"llama.cpp + imatrix: NOT RUN. {tools['error']}")
                imatrices = {"tuner": {"error": tools["error"]}, "calib": {"error": tools["error"]}}
            else:
                print(f"llama.cpp tools {tools['quantize']} ({tools['tools_version']}), "
                      f"llama-cpp-python {tools['llama_cpp_python']}")
                samples = get_text_calibration(tokenizer, str(data), nsamples=args.nsamples, seqlen=args.seqlen)
                tuner_text = work / "imatrix-tuner.txt"
                tuner_text.write_text("\n\n".join(tokenizer.decode(row, skip_special_tokens=True)
                                                  for row in samples.input_ids.tolist()), encoding="utf-8")
                imatrices["tuner"] = _imatrix(tools, f16_file, tuner_text, args.seqlen, None,
                                              work / "imatrix-tuner.gguf")
                calib_text = work / "imatrix-calib.txt"
                write_text_for_windows(tokenizer, calib, calib_text, args.imatrix_ctx * args.imatrix_chunks)
                imatrices["calib"] = _imatrix(tools, f16_file, calib_text, args.imatrix_ctx, args.imatrix_chunks,
                                              work / "imatrix-calib.gguf")
                for name, im in imatrices.items():
                    print(f"imatrix {name}: " + (im["error"] if "error" in im else
                                                 f"{im['chunks']} chunks x {im['ctx']} tokens of {im['text']}"))

        for qtype in args.types:
            ftype = K_TYPES.get(qtype, LEGACY_FTYPES.get(qtype))
            rec: Dict[str, Any] = {"type": qtype, "ours": {}, "file_mib": {}, "tensor_types": {}}
            files: Dict[str, Path] = {}
            for it in args.iters:
                key = f"iters{it}"
                files[f"ours_{key}"] = Path(ours[(qtype, it)]["file"])
                rec["ours"][key] = {**ours[(qtype, it)], **_ppl(python, files[f"ours_{key}"], win)}
            theirs = work / f"llamacpp-{qtype}.gguf"
            proc = _worker(python, "--quantize-worker", str(f16_file), str(theirs), str(ftype))
            if proc.returncode == 0:
                rec["llamacpp_quantizer"] = _ppl(python, theirs, win)
            elif "requires an importance matrix" in proc.stderr or "requires an imatrix" in proc.stderr:
                # recent llama.cpp refuses some types (q2_k_s's q2_K tensors) without an imatrix: no figure
                rec["llamacpp_quantizer"] = {"refused": "llama.cpp refuses this type without an importance matrix",
                                             "error": proc.stderr[-600:]}
            else:
                rec["llamacpp_quantizer"] = {"error": proc.stderr[-2000:]}
            files["llamacpp"] = theirs
            for name, im in imatrices.items():
                key = f"llamacpp_imatrix_{name}"
                if "error" in im:
                    rec[key] = {"error": im["error"]}
                    continue
                out = work / f"llamacpp-imatrix-{name}-{qtype}.gguf"
                # same mix as llama_model_quantize above: embeddings and output kept F16
                err = _run_tool(tools, [tools["quantize"], "--imatrix", im["file"], "--token-embedding-type", "f16",
                                        "--output-tensor-type", "f16", str(f16_file), str(out), qtype.upper(), "2"],
                                out.with_suffix(".log"))
                rec[key] = {"error": err} if err else _ppl(python, out, win)
                files[key] = out
            for key, path in files.items():
                if path.exists():
                    rec["file_mib"][key] = round(path.stat().st_size / 2**20, 1)
                    rec["tensor_types"][key] = _tensor_types(path)
            records.append(rec)
            if len({json.dumps(v) for v in rec["tensor_types"].values()}) > 1:
                print(f"{qtype}: the files' tensor types differ: {rec['tensor_types']}")
            print(f"{qtype}: " + ", ".join(f"{k} {_fmt_ppl(v)}" for k, v in _columns(rec)) +
                  f"; files {rec['file_mib']} MiB", flush=True)

    headers = ["type"] + [k for k, _ in _columns(records[0])] + ["MiB ours / llama.cpp / +imatrix"] if records else []
    rows = [[r["type"]] + [_fmt_ppl(v) for _, v in _columns(r)] +
            [" / ".join(str(r["file_mib"].get(k)) for k in (f"ours_iters{args.iters[-1]}", "llamacpp",
                                                              "llamacpp_imatrix_calib") if k in r["file_mib"])]
            for r in records]
    rows.insert(0, ["FP", f"torch fp32 {base['fp32_torch']:.2f}", f"llama.cpp F16 {_fmt_ppl(base['f16_llamacpp'])}"]
                + [""] * (len(headers) - 3))
    table = print_table(headers, rows, title=f"SmolLM2-135M-Instruct, held-out BBC perplexity from llama.cpp's logits "
                                             f"({windows.shape[0]}x{windows.shape[1]} tokens)") if records else ""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({
        "base": base, "windows": list(windows.shape),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "source": "BBC calibration articles"},
        "imatrix": {k: {kk: vv for kk, vv in v.items() if kk != "file"} for k, v in imatrices.items()},
        "llamacpp": {k: tools[k] for k in ("llama_cpp_python", "tools_version") if k in tools},
        "records": records, "table": table}, indent=2, default=str))
    print(f"wrote {out_json}")
    return 0


def _columns(rec: Dict[str, Any]) -> List[tuple]:
    """(column name, record) of one type's perplexities, in table order."""
    cols = [(f"ours {k.replace('iters', 'iters ')}", v) for k, v in rec["ours"].items()]
    cols.append(("llama.cpp", rec["llamacpp_quantizer"]))
    cols += [(f"llama.cpp+imatrix ({k.rsplit('_', 1)[1]})", rec[k]) for k in rec if k.startswith("llamacpp_imatrix_")]
    return cols


def _fmt_ppl(value: Any) -> str:
    if isinstance(value, dict):
        value = "refused (needs imatrix)" if "refused" in value else "FAILED" if "error" in value else value.get("ppl")
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
