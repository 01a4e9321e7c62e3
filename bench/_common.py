"""Shared plumbing of the bench scripts (not a benchmark itself).

- :func:`run_ours` / :func:`run_ppl` start ``bench/_worker.py`` in a fresh process of the current
  Python (our package), so that every measured run has its own peak RSS;
- :func:`run_child` / :func:`main_or_child` do the same for a bench script that runs its jobs in child
  processes of itself (``script --child SPEC OUT``);
- :func:`run_reference` starts ``bench/reference_runner.py`` with ``.venv-ref``'s Python (the
  reference auto-round 0.16.1; both packages are called ``auto_round``);
- calibration/evaluation data helpers (BBC split, token windows exactly as the reference runner
  builds them), table printing and the JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the demo package (demo/) beside src/
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ASSETS = ROOT / ".cache" / "assets"
WORKER = BENCH / "_worker.py"
REF_RUNNER = BENCH / "reference_runner.py"
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> Dict[str, Any]:
    import torch

    git = {}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT)
        git = {"head": head.stdout.strip() or None, "src_dirty": bool(dirty.stdout.strip())}
    except OSError:
        pass
    return {
        "git": git,
        "machine": platform.machine(), "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _run(cmd: List[str], log_path: Path, timeout: Optional[float]) -> int:
    """Run ``cmd`` through ``/bin/sh -c '...; exit $?'`` (no exec), output to ``log_path``.

    Why the shell: on Linux a child spawned directly by this (large) process starts with
    ``ru_maxrss`` already at this process's peak (vfork/exec carries the high-water mark over),
    so the reference runner's ``getrusage`` peak would read at least our parent's RSS. The shell
    forks a fresh process image for the command, whose peak RSS is then its own.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
    with open(log_path, "w") as fh:
        proc = subprocess.run(wrapped, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
    return proc.returncode


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed_job(cmd: List[str], json_path: Path, log_path: Path, timeout: Optional[float],
               failed: str = "worker") -> Dict[str, Any]:
    """Run ``cmd`` (which writes its record to ``json_path``) and return that record with the
    process's wall/CPU time, exit code, log path and the load before it; on failure, ``error`` and
    the log's tail are set."""
    if json_path.exists():
        json_path.unlink()
    load0, cpu0 = os.getloadavg()[0], _children_cpu_s()
    t0 = time.perf_counter()
    rc = _run(cmd, log_path, timeout)
    wall = time.perf_counter() - t0
    rec = json.loads(json_path.read_text()) if json_path.exists() else {}
    rec.update({"process_wall_s": round(wall, 2), "process_cpu_s": round(_children_cpu_s() - cpu0, 2), "rc": rc,
                "log": str(log_path), "load_avg_1min_before": load0})
    if rc != 0 or "error" in rec:
        rec.setdefault("error", f"{failed} exited {rc}")
        rec["log_tail"] = log_path.read_text()[-3000:] if log_path.exists() else ""
    return rec


def parse_bench_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], name: str, quick_help: str,
                     quick: Dict[str, Any]) -> argparse.Namespace:
    """Add ``--quick`` (smoke-test settings ``quick``, results in ``<name>_quick.json``) and ``--json``
    to a benchmark's parser ``p`` and parse ``argv``."""
    p.add_argument("--quick", action="store_true", help=f"smoke test: {quick_help}")
    p.add_argument("--json", type=Path, default=None, help=f"default bench/results/{name}.json")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
        if args.json is None:
            args.json = RESULTS / f"{name}_quick.json"
    return args


def run_ours(spec: Dict[str, Any], work: Path, name: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one job of ``bench/_worker.py`` (see its docstring for ``spec``) and return its record."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    rec = _timed_job([sys.executable, str(WORKER), str(spec_path), str(out_path)], out_path, log_path, timeout)
    if "error" in rec:
        log(f"  {name}: FAILED (rc={rec['rc']}); see {log_path}: {rec['error']}")
        print(rec["log_tail"], file=sys.stderr)
    return rec


Job = Callable[[Dict[str, Any]], Dict[str, Any]]


def run_child(script: str, spec: Dict[str, Any], work: Path, name: str) -> Dict[str, Any]:
    """Run the job ``spec`` of the bench script ``script`` (its ``__file__``) in a fresh process of it,
    ``script --child SPEC OUT`` (see :func:`main_or_child`), and return its record: spec, record and log are
    ``work/<name>.spec.json``, ``.out.json`` and ``.log``; on failure the record has ``error`` and the log's tail
    is printed."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    rec = _timed_job([sys.executable, str(Path(script).resolve()), "--child", str(spec_path), str(out_path)],
                     out_path, log_path, None)
    if "error" in rec:
        log(f"  {name}: FAILED (rc={rec['rc']}); see {log_path}")
        print(rec.get("log_tail", ""), file=sys.stderr)
    return rec


def _child_main(jobs: Mapping[str, Job], spec_path: str, out_path: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(jobs[spec["job"]](spec), indent=2))


def main_or_child(main: Callable[[], int], jobs: Mapping[str, Job]) -> None:
    """The ``__main__`` of a bench script that uses :func:`run_child`: ``script --child SPEC OUT`` runs the job
    ``jobs[SPEC['job']]`` and writes its record to OUT (an exception exits non-zero, its traceback in the log);
    any other command line is ``sys.exit(main())``."""
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child_main(jobs, sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())


def job_compare(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The child job ``{"job": "compare", "a": folder, "b": folder}``: :func:`compare_checkpoints`."""
    return compare_checkpoints(Path(spec["a"]), Path(spec["b"]))


def run_ppl(model: str, windows: Path, work: Path, name: str, kind: str = "llm",
            dtype: str = "fp32") -> Dict[str, Any]:
    """Perplexity of a saved folder (``kind='llm'``) or of the SmolLM2-LLaVA demo (``'llava'``)."""
    return run_ours({"job": "ppl", "kind": kind, "model": model, "model_dtype": dtype,
                     "ppl_windows": str(windows)}, work, name)


def run_reference(model: str, dataset: Path, out_dir: Path, work: Path, name: str, *, bits: int,
                  group_size: int, sym: bool, iters: int, nsamples: int, seqlen: int, batch_size: int,
                  seed: int = 42, dtype: str = "float32", fmt: str = "fake",
                  timeout: Optional[float] = None, enable_alg_ext: bool = False,
                  disable_opt_rtn: bool = False, avg_bits: Optional[float] = None,
                  scheme_options: str = "", disable_amp: bool = False) -> Dict[str, Any]:
    """Quantize with the reference runner (``--calib-mode windows``) and return its JSON record.

    ``enable_alg_ext``: the reference's SignRoundV2 path; ``disable_opt_rtn``: plain RTN at iters 0;
    ``avg_bits`` / ``scheme_options``: its AutoScheme (mixed bits) over those preset names; ``disable_amp``: its
    ``amp=False`` (float32 tuning; by default it tunes a bf16 copy on a CPU with bf16)."""
    if not REF_PYTHON.exists():
        return {"error": f"{REF_PYTHON} is missing: run `make ref-venv`"}
    work.mkdir(parents=True, exist_ok=True)
    json_path, log_path = work / f"{name}.json", work / f"{name}.log"
    cmd = [str(REF_PYTHON), str(REF_RUNNER), "--model", model, "--dataset", str(dataset),
           "--output-dir", str(out_dir), "--json", str(json_path), "--bits", str(bits),
           "--group-size", str(group_size), "--sym" if sym else "--asym", "--iters", str(iters),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--batch-size", str(batch_size),
           "--seed", str(seed), "--format", fmt, "--calib-mode", "windows", "--dtype", dtype,
           "--device", "cpu"]
    cmd += ["--enable-alg-ext"] if enable_alg_ext else []
    cmd += ["--disable-opt-rtn"] if disable_opt_rtn else []
    cmd += ["--disable-amp"] if disable_amp else []
    cmd += ["--avg-bits", str(avg_bits), "--options", scheme_options] if avg_bits is not None else []
    rec = _timed_job(cmd, json_path, log_path, timeout, failed="reference runner")
    if "error" in rec:
        log(f"  {name}: reference FAILED (rc={rec['rc']}); see {log_path}: {rec['error']}")
    return rec


def compare_checkpoints(a: Path, b: Path) -> Dict[str, Any]:
    """Byte identity of every tensor of two checkpoint folders (read one at a time) and of their
    ``config.json`` / ``quantization_config.json``."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out

    def raw(t) -> tuple:
        return t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    a, b = Path(a), Path(b)
    ia, ib = index(a), index(b)
    different = []
    for k in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            if raw(fa.get_tensor(k)) != raw(fb.get_tensor(k)):
                different.append(k)
    configs = all(json.loads((a / n).read_text()) == json.loads((b / n).read_text())
                  for n in ("config.json", "quantization_config.json"))
    return {"tensors": len(ia), "only_in_one": sorted(set(ia) ^ set(ib))[:10], "different": different[:10],
            "identical": not different and set(ia) == set(ib) and configs, "configs_equal": configs,
            "packed_layers": sum(k.endswith(".qweight") for k in ia)}


# ------------------------------------------------------------------------------------------ data
def bbc_texts() -> tuple:
    """``(calib_texts, heldout_texts)`` of the cached BBC corpus."""
    from demo.assets import bbc_split

    return bbc_split(ASSETS)


def bbc_files(work: Path, tokenizer, eval_seqlen: int, eval_windows: int) -> tuple:
    """``(calib_file, heldout_windows_file)`` under ``work``: the BBC calibration articles as ``.jsonl`` (one
    article per line, read by our normal data path) and the first ``eval_windows`` held-out windows of
    ``eval_seqlen`` tokens (``torch.save``), what the perplexity jobs score."""
    import torch

    from demo.assets import token_windows

    calib, heldout = bbc_texts()
    calib_file, windows_file = work / "bbc_calib.jsonl", work / "heldout_windows.pt"
    calib_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib), encoding="utf-8")
    torch.save(token_windows(tokenizer, heldout, eval_seqlen, eval_windows), windows_file)
    return calib_file, windows_file


def write_text_for_windows(tokenizer, texts: Sequence[str], path: Path, tokens_needed: int,
                           margin: float = 1.15) -> None:
    """Write the first texts (joined by blank lines) that give ``tokens_needed`` tokens and a margin.

    Only as much text as needed, so the reference runner (which tokenizes the whole file) and
    :func:`reference_windows` stay quick.
    """
    chosen, total = [], 0
    for text in texts:
        chosen.append(text.strip())
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2
        if total >= tokens_needed * margin:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")


def reference_windows(tokenizer, path: Path, seqlen: int, nsamples: int):
    """The calibration windows exactly as ``reference_runner.py --calib-mode windows`` builds them:
    the whole file tokenized without special tokens, cut into the first ``nsamples``
    non-overlapping ``seqlen``-token windows. Returns a LongTensor ``[nsamples, seqlen]``."""
    import torch

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if n < nsamples:
        raise SystemExit(f"{path}: {len(ids)} tokens = {n} windows of {seqlen} < nsamples {nsamples}")
    return torch.tensor(ids[: nsamples * seqlen], dtype=torch.long).view(nsamples, seqlen)


def identical_windows(work: Path, tokenizer, nsamples: int, seqlen: int, eval_windows: int = 0,
                      eval_seqlen: int = 512, tag: str = "") -> tuple:
    """The calibration both sides see, under ``work``: ``(text_file, windows_file, heldout_file)``.

    ``text_file`` holds just enough BBC calibration articles for ``nsamples`` windows of ``seqlen`` (what the
    reference runner tokenizes), ``windows_file`` those windows exactly as the runner cuts them
    (:func:`reference_windows`, ``torch.save``, what ours reads), and ``heldout_file`` the first ``eval_windows``
    held-out windows of ``eval_seqlen`` tokens (None when ``eval_windows`` is 0). ``tag`` suffixes the names."""
    import torch

    from demo.assets import token_windows

    calib, heldout = bbc_texts()
    text_file, windows_file = work / f"calib{tag}.txt", work / f"calib_windows{tag}.pt"
    write_text_for_windows(tokenizer, calib, text_file, nsamples * seqlen)
    torch.save(reference_windows(tokenizer, text_file, seqlen, nsamples), windows_file)
    heldout_file = None
    if eval_windows:
        heldout_file = work / f"heldout_windows{tag}.pt"
        torch.save(token_windows(tokenizer, heldout, eval_seqlen, eval_windows), heldout_file)
    return text_file, windows_file, heldout_file


def check_reference_tokenizes_alike(model_dir: str, path: Path, seqlen: int, nsamples: int, ours) -> Dict[str, Any]:
    """Tokenize ``path`` in the reference venv the runner's way and compare with ``ours``."""
    import hashlib

    code = (
        "import sys, hashlib; from transformers import AutoTokenizer;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "ids = t(open(sys.argv[2], encoding='utf-8').read(), add_special_tokens=False)['input_ids'];"
        "n = int(sys.argv[3]) * int(sys.argv[4]);"
        "print(hashlib.sha256(','.join(map(str, ids[:n])).encode()).hexdigest())"
    )
    proc = subprocess.run([str(REF_PYTHON), "-c", code, model_dir, str(path), str(seqlen), str(nsamples)],
                          capture_output=True, text=True, cwd=ROOT)
    theirs = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
    mine = hashlib.sha256(",".join(map(str, ours.reshape(-1).tolist())).encode()).hexdigest()
    return {"identical": theirs == mine, "ours_sha256": mine, "reference_sha256": theirs,
            "reference_stderr": proc.stderr[-500:] if proc.returncode else ""}


# ------------------------------------------------------------------------------------------ output
def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, record: Dict[str, Any], out: Optional[Path] = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.rename(path)
    log(f"wrote {path}")
    return path


def mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ours_block_losses(rec: Dict[str, Any]) -> List[float]:
    return [b["best"] for b in rec.get("summary", {}).get("blocks", [])]


def ref_block_losses(rec: Dict[str, Any]) -> List[float]:
    return [b["best_loss"] for b in rec.get("block_losses", [])]


# ------------------------------------------------------------------------------------------ models
WORK = ROOT / ".cache" / "bench"


def smollm2_dir() -> Path:
    from demo.assets import fetch_smollm2

    return fetch_smollm2(ASSETS)


def _tests_on_path() -> None:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def tiny_llama_dir(folder: Optional[Path] = None, dtype: str = "fp32") -> Path:
    """Tiny random Llama (hidden 64, intermediate 128, 2 layers, 4/2 heads, vocab 512) saved in
    ``dtype`` (fp32 or bf16) with the test suite's byte-level BPE tokenizer
    (``tests/tokenizer_fixture.make_tokenizer``)."""
    import torch

    folder = folder or WORK / "models" / ("tiny-llama" if dtype == "fp32" else f"tiny-llama-{dtype}")
    if (folder / ".complete").is_file():
        return folder
    _tests_on_path()
    from tiny_models import tiny_llama
    from tokenizer_fixture import make_tokenizer

    model = tiny_llama(seed=0)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return folder


MID_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
             "num_attention_heads": 16, "num_key_value_heads": 16}


def mid_llama_dir(folder: Optional[Path] = None) -> Path:
    """Random Llama-shaped model (hidden 1024, intermediate 2816, 8 layers, 16 heads, fp32) with
    the SmolLM2 tokenizer. Its vocabulary is the tokenizer's (49152), not 32000: SmolLM2's ids
    go up to 49151, so a 32000-row embedding could not take its windows."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = folder or WORK / "models" / "mid-llama"
    if (folder / ".complete").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **MID_SHAPE)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    (folder / ".complete").write_text("ok\n")
    return folder


def param_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                total += _prod(fh.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
