"""Block-streamed tuning (``low_cpu_mem_usage=True``) vs the in-memory path: peak RSS and wall time, same
checkpoint, same settings, same seed, and whether the two outputs are byte-identical.

Models (bf16 safetensors, made once under ``.cache/bench/models`` by their own process):

- the real SmolLM2-135M-Instruct (``.cache/assets``, ``make assets``), 30 blocks;
- random Llamas of one mid width (hidden 768, intermediate 2048, 12 heads, 4 kv heads, vocab 32000) at
  8, 16 and 32 blocks, with the test suite's tokenizer: streaming's peak should stay flat with depth,
  the in-memory peak grows by about a block's weights (and its integer codes) per block.

Each run is its own process (peak RSS ``ru_maxrss`` of that process, "after imports" its RSS before the
run: torch, transformers and our modules imported), ``OMP_NUM_THREADS=1`` and one torch thread, and runs
``AutoRound(src, [low_cpu_mem_usage=True,] bits=4, group_size=128, iters=5, nsamples=8, seqlen=128,
batch_size=8, dataset="auto_round:offline_corpus").quantize_and_save(out)``.

    .venv/bin/python bench/bench_streaming.py            # all models (about 10 min on 2 busy cores)
    .venv/bin/python bench/bench_streaming.py --quick    # 2 and 4 blocks of hidden 256 (a minute)
    .venv/bin/python bench/bench_streaming.py --no-smollm2 --mmap-threshold 131072 \
        --json bench/results/streaming_mmap128k.json

With glibc's default (dynamic) mmap threshold, the freed tensors of each block (a few MB each) stay in the
heap, which fragments: streaming's peak then creeps up by about 10 MB per block here (measured: 420, 500,
661 MiB held at 8, 16, 32 blocks) although nothing is kept; with a fixed threshold of 128 KiB they are
returned to the OS and the streamed peak is flat with depth.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (WORK, _tests_on_path, fmt, job_compare, log, machine_info, main_or_child,  # noqa: E402
                     parse_bench_args, print_table, run_child, write_json)

NAME = "streaming"
WIDTH = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)
QUICK_WIDTH = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=32000)
DEPTHS = (8, 16, 32)
QUICK_DEPTHS = (2, 4)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _preload() -> None:
    """Import what both runs use before their clocks start."""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import auto_round.autoround  # noqa: F401
    import auto_round.model_free.streaming  # noqa: F401
    from auto_round.export import available_formats

    available_formats()


# ------------------------------------------------------------------------------------------ child jobs
def job_make(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(spec["folder"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16", **spec["shape"])
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size="200MB")
    _tests_on_path()
    from tokenizer_fixture import make_tokenizer

    make_tokenizer().save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return {"params": sum(p.numel() for p in model.parameters())}


def job_quantize(spec: dict) -> dict:
    import torch

    from auto_round import AutoRound

    torch.set_num_threads(1)
    _preload()
    before = _rss_mb()
    t0 = time.perf_counter()
    ar = AutoRound(spec["src"], low_cpu_mem_usage=spec["streamed"], **spec["options"])
    ar.quantize_and_save(spec["out"], format="auto_round", overwrite=True)
    blocks = ar.summary.get("blocks", [])
    return {"seconds": time.perf_counter() - t0, "rss_after_imports_mb": before, "peak_rss_mb": _rss_mb(),
            "blocks": len(blocks), "last_block_best_loss": blocks[-1]["best"] if blocks else None}


JOBS = {"make": job_make, "quantize": job_quantize, "compare": job_compare}


# ------------------------------------------------------------------------------------------ main
def _random_model(width: dict, layers: int, work: Path) -> Path:
    src = WORK / "models" / f"llama-{width['hidden_size']}x{layers}-bf16-stream"
    if not (src / ".complete").is_file():
        shutil.rmtree(src, ignore_errors=True)
        log(f"writing the random model to {src}")
        made = run_child(__file__, {"job": "make", "folder": str(src), "shape": {**width, "num_hidden_layers": layers}},
                         work, f"make-{layers}")
        if "error" in made:
            raise SystemExit(1)
    return src


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="skip the real SmolLM2-135M")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="MALLOC_MMAP_THRESHOLD_ of the runs (glibc; e.g. 131072): a fixed threshold returns each freed "
                        "block's tensors to the OS instead of leaving them in a fragmenting heap")
    args = parse_bench_args(p, argv, NAME, "2 and 4 blocks of hidden 256, no SmolLM2", {"quick_run": True})
    quick = getattr(args, "quick_run", False)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        log("note: set OMP_NUM_THREADS=1 for comparable figures (the children inherit it)")
    if args.mmap_threshold is not None:  # inherited by the measured children (bench only, never the library)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    work = WORK / NAME
    options = dict(bits=4, group_size=128, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                   batch_size=args.nsamples, dataset="auto_round:offline_corpus")
    models: Dict[str, Path] = {}
    if args.smollm2 and not quick:
        from _common import smollm2_dir

        models["SmolLM2-135M (30 blocks)"] = smollm2_dir()
    width = QUICK_WIDTH if quick else WIDTH
    for d in (QUICK_DEPTHS if quick else DEPTHS):
        models[f"llama h{width['hidden_size']} x{d}"] = _random_model(width, d, work)
    runs: Dict[str, Dict[str, Any]] = {}
    rows: List[list] = []
    for label, src in models.items():
        pair = {}
        for mode in ("in_memory", "streamed"):
            name = f"{src.name}-{mode}"
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            log(f"{label}: {mode} ...")
            pair[mode] = run_child(__file__, {"job": "quantize", "src": str(src), "out": str(out),
                                              "streamed": mode == "streamed", "options": options}, work, name)
            if "error" in pair[mode]:
                return 1
            pair[mode]["out"] = str(out)
        cmp = run_child(__file__, {"job": "compare", "a": pair["in_memory"]["out"], "b": pair["streamed"]["out"]},
                        work, f"{src.name}-compare")
        gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
        runs[label] = {"folder": str(src), "input_gb": gb, **pair, "compare": cmp}
        m, s = pair["in_memory"], pair["streamed"]
        rows.append([label, fmt(gb, ".2f"), fmt(m["seconds"], ".1f"), fmt(s["seconds"], ".1f"),
                     fmt(m["peak_rss_mb"], ".0f"), fmt(s["peak_rss_mb"], ".0f"),
                     fmt(m["peak_rss_mb"] - m["rss_after_imports_mb"], ".0f"),
                     fmt(s["peak_rss_mb"] - s["rss_after_imports_mb"], ".0f"), cmp.get("identical")])
        for mode in pair:
            shutil.rmtree(pair[mode]["out"], ignore_errors=True)
    table = print_table(["model", "input GB (bf16)", "in-memory s", "streamed s", "in-memory peak RSS MiB",
                         "streamed peak RSS MiB", "in-memory held MiB", "streamed held MiB", "byte-identical"], rows,
                        title=f"W4G128, iters={args.iters}, {args.nsamples}x{args.seqlen} calibration, 1 thread, "
                              f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default (dynamic)'} "
                              "('held' = peak RSS minus the RSS after imports)")
    write_json(NAME, {"machine": machine_info(), "options": options, "malloc_mmap_threshold": args.mmap_threshold,
                      "runs": runs, "table": table}, args.json)
    return 0 if all(r["compare"].get("identical") for r in runs.values()) else 1


if __name__ == "__main__":
    main_or_child(main, JOBS)
