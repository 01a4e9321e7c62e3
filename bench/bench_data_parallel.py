"""Data-parallel tuning (``torchrun``, :mod:`auto_round.tuning.parallel`) against one process, same samples.

A random Llama (hidden 1024, intermediate 2816, 8 blocks, the test suite's tokenizer, fp32 safetensors made
once under ``.cache/bench/models``) is quantized W4G128, ``batch_size`` samples per step. Three runs,
interleaved ``--repeats`` times, each its own process tree:

- ``one-2t``: one process, 2 torch threads;
- ``one-1t``: the same with 1 thread;
- ``dp-2x1t``: ``torchrun --nproc-per-node 2``, gloo, 1 thread each: each process runs half of every
  step's samples; the gradients are summed.

Every step of all three sees the same samples; the one-process checkpoints must be byte-identical
(checked), the data-parallel one agrees up to float rounding (bf16 autocast matmuls at half the batch
round differently, and sign descent makes other, equally good choices of them: compared by block loss).
The figures are the tuning wall time (from the run report) and each process's peak RSS (the cached
activations of a process are half of one process's). On a 2-core machine this measures how the two
cores are best used; on a GPU node the same command puts one process on each GPU.

    .venv/bin/python bench/bench_data_parallel.py            # about 5 min on 2 quiet cores
    .venv/bin/python bench/bench_data_parallel.py --quick    # 2 blocks of hidden 256, 2 iters
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, WORK, _tests_on_path, compare_checkpoints, fmt, log, machine_info,  # noqa: E402
                     parse_bench_args, print_table, write_json)

NAME = "data_parallel"
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16)
QUICK_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def model_dir(shape: Dict[str, int]) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = WORK / "models" / f"dp-llama-h{shape['hidden_size']}-l{shape['num_hidden_layers']}"
    if (folder / ".complete").is_file():
        return folder
    _tests_on_path()
    from tokenizer_fixture import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, **shape)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return folder


def _command(kind: str, src: Path, out: Path, args: argparse.Namespace) -> List[str]:
    opts = ["--model", str(src), "--output_dir", str(out), "--bits", "4", "--group_size", "128", "--iters",
            str(args.iters), "--nsamples", str(args.nsamples), "--batch_size", str(args.batch_size),
            "--seqlen", str(args.seqlen), "--dataset", "auto_round:offline_corpus", "--device", "cpu"]
    if kind == "dp-2x1t":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "auto_round", *opts, "--threads", "1"]
    threads = "2" if kind == "one-2t" else "1"
    return [sys.executable, "-m", "auto_round", *opts, "--threads", threads]


def run_one(kind: str, src: Path, work: Path, args: argparse.Namespace, rep: int) -> Dict[str, Any]:
    out = work / f"{kind}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1" if kind != "one-2t" else "2"}
    t0 = time.perf_counter()
    done = subprocess.run(_command(kind, src, out, args), env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    text = done.stdout + done.stderr
    (work / f"{kind}-{rep}.log").write_text(text)
    rec: Dict[str, Any] = {"kind": kind, "rep": rep, "rc": done.returncode, "process_wall_s": round(wall, 2)}
    if done.returncode != 0:
        rec["error"] = text[-2000:]
        return rec
    folder = next(p.parent for p in out.rglob("quantization_config.json"))
    report = json.loads((folder / "quantization_report.json").read_text())
    rec.update(folder=str(folder), tuning_s=report["seconds"]["tuning"],
               peak_rss_mb=[float(m) for m in re.findall(r"quantized \d+ layers in [\d.]+s; peak RSS (\d+) MiB", text)],
               mean_best_loss=sum(b["best"] for b in report["blocks"]) / len(report["blocks"]))
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    args = parse_bench_args(p, argv, NAME, "2 blocks of hidden 256, 2 iters, seqlen 64",
                            dict(iters=2, seqlen=64, repeats=1, shape=QUICK_SHAPE))
    shape = getattr(args, "shape", SHAPE)
    src = model_dir(shape)
    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    kinds = ["one-2t", "dp-2x1t", "one-1t"]
    records = []
    for rep in range(args.repeats):
        for kind in kinds:
            log(f"{kind} (repeat {rep + 1}/{args.repeats})")
            records.append(run_one(kind, src, work, args, rep))
            if "error" in records[-1]:
                log(f"  FAILED: {records[-1]['error'][-500:]}")
                return 1
    same = compare_checkpoints(Path(records[0]["folder"]), Path(records[1]["folder"]))
    same_1t = compare_checkpoints(Path(records[0]["folder"]), Path(records[2]["folder"]))
    rows, summary = [], {}
    for kind in kinds:
        mine = [r for r in records if r["kind"] == kind]
        best = min(mine, key=lambda r: r["tuning_s"])
        summary[kind] = {"tuning_s_min": best["tuning_s"], "peak_rss_mb": best["peak_rss_mb"],
                         "mean_best_loss": best["mean_best_loss"]}
        rows.append([kind, fmt(best["tuning_s"], ".1f"), " / ".join(fmt(x, ".0f") for x in best["peak_rss_mb"]),
                     fmt(best["mean_best_loss"], ".4g")])
    print_table(["run", "tuning s (min)", "peak RSS MiB per process", "mean best block loss"], rows,
                f"W4G128 iters {args.iters}, {args.nsamples} samples of {args.seqlen}, batch {args.batch_size}, hidden "
                f"{shape['hidden_size']}, {shape['num_hidden_layers']} blocks")
    log(f"checkpoints identical: one-1t vs one-2t {same_1t['identical']}; dp vs one-2t {same['identical']} (float "
        "rounding: compare the block losses)")
    write_json(NAME, {"machine": machine_info(), "shape": shape, "settings": vars(args) | {"shape": shape},
                      "records": records, "summary": summary, "identical_dp_vs_one": same,
                      "identical_threads": same_1t}, args.json)
    return 0 if same_1t["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
