"""Model-free RTN vs the in-memory iters=0 path: wall time, GB/s read and peak RSS, same checkpoint, same run.

The model: a random Llama shaped like TinyLlama-1.1B (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 kv heads, vocab 32000: 1.10 B parameters, 2.2 GB in bf16), saved with ``save_pretrained`` in 1 GB shards
under ``.cache/bench/models`` (made once, by its own process) with the test suite's tokenizer.

Each measured run is its own process (``bench/_common.py``: peak RSS per run):

- ``model_free``: ``quantize_model_free(src, out, bits=4, group_size=128)``;
- ``in_memory``: ``AutoRound(src, iters=0, disable_opt_rtn=True, bits=4, group_size=128)
  .quantize_and_save(out, format="auto_round")`` (loading included: the model-free run reads the
  files too);
- ``compare``: every tensor of the two outputs byte for byte, and both configs;
- ``model_free`` again on the same model at half the depth (11 layers, 1.2 GB): its peak should not
  move, since model-free holds one layer at a time.

"GB/s" is the input checkpoint's safetensors bytes over the run's wall time (the files are in the page
cache for both runs after the model is written, so this is the quantization's speed, not the disk's);
"GB per CPU-s" divides by the process's CPU time instead, which the other jobs on a shared machine
disturb less ("load before": the 1-minute load average when the run started).
"peak RSS" is ``ru_maxrss`` of the run's process; "after imports" is its RSS before the call (torch,
transformers and the model classes imported, which is also left out of the wall time), so the difference
is what the run itself holds.

    .venv/bin/python bench/bench_model_free.py            # the 2.2 GB model (about 4 min on 2 cores)
    .venv/bin/python bench/bench_model_free.py --quick    # hidden 512, 4 layers (seconds)
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (WORK, _tests_on_path, fmt, job_compare, log, machine_info, main_or_child,  # noqa: E402
                     parse_bench_args, print_table, run_child, write_json)

NAME = "model_free"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)
QUICK_SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _preload() -> float:
    """Import what both runs use before their clocks start (transformers' lazy imports cost 5-20 s here);
    returns the seconds it took."""
    t0 = time.perf_counter()
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import auto_round.autoround  # noqa: F401
    import auto_round.model_free.core  # noqa: F401
    from auto_round.export import available_formats

    available_formats()  # imports the format modules
    return time.perf_counter() - t0


def _input_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ child jobs
def job_make(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(spec["folder"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16", **spec["shape"])
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size=spec["shard"])
    _tests_on_path()
    from tokenizer_fixture import make_tokenizer

    make_tokenizer().save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return {"params": sum(p.numel() for p in model.parameters())}


def job_model_free(spec: dict) -> dict:
    import torch

    from auto_round import quantize_model_free

    torch.set_num_threads(spec["threads"])
    imports = _preload()
    before, cpu0 = _rss_mb(), _cpu_s()
    t0 = time.perf_counter()
    quantize_model_free(spec["src"], spec["out"], bits=spec["bits"], group_size=spec["group_size"])
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0, "imports_s": imports,
            "rss_after_imports_mb": before, "peak_rss_mb": _rss_mb()}


def job_in_memory(spec: dict) -> dict:
    import torch

    from auto_round import AutoRound

    torch.set_num_threads(spec["threads"])
    imports = _preload()
    before, cpu0 = _rss_mb(), _cpu_s()
    t0 = time.perf_counter()
    ar = AutoRound(spec["src"], iters=0, disable_opt_rtn=True, bits=spec["bits"], group_size=spec["group_size"])
    ar.quantize_and_save(spec["out"], format="auto_round")
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0, "imports_s": imports,
            "rss_after_imports_mb": before, "peak_rss_mb": _rss_mb()}


JOBS = {"make": job_make, "model_free": job_model_free, "in_memory": job_in_memory, "compare": job_compare}


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (this machine has 2 cores)")
    p.add_argument("--shard", default="1GB", help="max_shard_size of the saved source model")
    p.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    args = parse_bench_args(p, argv, NAME, "hidden 512, 4 layers", {"shape": "quick", "shard": "50MB"})
    if not getattr(args, "shape", None):
        args.shape = "tinyllama"
    return args


def _model(shape: dict, shard: str, work: Path) -> Optional[Path]:
    """The random model folder of ``shape`` (written once, by its own process); None if that failed."""
    src = WORK / "models" / f"llama-{shape['hidden_size']}x{shape['num_hidden_layers']}-bf16-{shard}"
    if not (src / ".complete").is_file():
        shutil.rmtree(src, ignore_errors=True)
        log(f"writing the random model to {src}")
        made = run_child(__file__, {"job": "make", "folder": str(src), "shape": shape, "shard": shard}, work,
                         f"make-{shape['num_hidden_layers']}")
        if "error" in made:
            return None
    return src


def _row(name: str, src: Path, r: dict) -> list:
    gb = _input_bytes(src) / 1e9
    return [name, fmt(gb, ".2f"), fmt(r["seconds"], ".1f"), fmt(gb / r["seconds"], ".3f"), fmt(r["cpu_s"], ".1f"),
            fmt(gb / r["cpu_s"], ".3f"), fmt(r["load_avg_1min_before"], ".1f"), fmt(r["peak_rss_mb"], ".0f"),
            fmt(r["rss_after_imports_mb"], ".0f"), fmt(r["peak_rss_mb"] - r["rss_after_imports_mb"], ".0f")]


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = QUICK_SHAPE if args.shape == "quick" else SHAPE
    half = {**shape, "num_hidden_layers": shape["num_hidden_layers"] // 2}
    work = WORK / NAME
    src, src_half = _model(shape, args.shard, work), _model(half, args.shard, work)
    if src is None or src_half is None:
        return 1
    gb = _input_bytes(src) / 1e9
    shards = len(list(src.glob("*.safetensors")))
    log(f"model {src.name}: {gb:.2f} GB in {shards} shard(s)")
    jobs = {"model_free": ("model_free", src), "in_memory": ("in_memory", src),
            f"model_free_{half['num_hidden_layers']}_layers": ("model_free", src_half)}
    runs, outs = {}, {}
    for name, (kind, folder) in jobs.items():
        outs[name] = work / f"out-{name}"
        shutil.rmtree(outs[name], ignore_errors=True)
        log(f"{name} ...")
        runs[name] = run_child(__file__, {"job": kind, "src": str(folder), "out": str(outs[name]),
                                          "bits": args.bits, "group_size": args.group_size, "threads": args.threads},
                               work, name)
        if "error" in runs[name]:
            return 1
    cmp = run_child(__file__, {"job": "compare", "a": str(outs["model_free"]), "b": str(outs["in_memory"])}, work,
                    "compare")
    rows = [_row(f"{name} ({jobs[name][1].name})", jobs[name][1], r) for name, r in runs.items()]
    out_gb = _input_bytes(outs["model_free"]) / 1e9
    table = print_table(["run (model)", "input GB", "wall s", "GB/s read", "CPU s", "GB per CPU-s", "load before",
                         "peak RSS MiB", "after imports MiB", "held by the run MiB"], rows,
                        title=f"W{args.bits}G{args.group_size} RTN, bf16 in {args.shard} shards ({src.name}: "
                              f"{gb:.2f} GB -> {out_gb:.2f} GB); model_free and in_memory outputs byte-identical: "
                              f"{cmp.get('identical')}")
    write_json(NAME, {"machine": machine_info(), "model": {"folder": str(src), "shape": shape, "input_gb": gb,
                                                           "shards": shards, "output_gb": out_gb,
                                                           "half_depth_folder": str(src_half)},
                      "settings": {"bits": args.bits, "group_size": args.group_size, "threads": args.threads},
                      "runs": runs, "compare": cmp, "table": table}, args.json)
    if not args.keep:
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    return 0 if cmp.get("identical") else 1


if __name__ == "__main__":
    main_or_child(main, JOBS)
