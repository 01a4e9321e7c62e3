"""Ours vs the reference with another CPU-bound process on the machine: who loses more?

SmolLM2-135M-Instruct W4G128 sym, identical BBC calibration windows (as ``bench_vs_reference.py``), each
side quiet and beside a competitor, interleaved over ``--rounds``, each run its own process:

- ``ours``: our default thread count (the cores this process may use) with ``OMP_WAIT_POLICY=PASSIVE``,
  as the ``auto-round`` commands set it (``auto_round._entry``);
- ``ours-1t``: ``threads=1`` (what ``--threads 1`` gives);
- ``reference``: auto-round 0.16.1 (``make ref-venv``) at its defaults (torch's thread count).

The competitor is a separate process running 2-thread float32 matmuls of 1024 x 1024 without pause
(other work a user runs beside the quantizer); it is started before and stopped after each loaded
run. Reported per side: quantize+save wall seconds quiet and loaded (min over rounds), the slowdown
(loaded / quiet), CPU-seconds, and the competitor's matmul rate during the run (how much each side
took from it). Target (issue 13): ours' loaded time below the reference's, and a slowdown no larger.

    .venv/bin/python bench/bench_under_load.py                # about 30 min on 2 cores
    .venv/bin/python bench/bench_under_load.py --quick        # tiny settings, one round
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (WORK, fmt, identical_windows, log, machine_info, parse_bench_args, print_table,  # noqa: E402
                     run_ours, run_reference, smollm2_dir, write_json)

NAME = "under_load"
SIDES = ("ours", "ours-1t", "reference")

COMPETITOR = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
n, t0, out = 0, time.perf_counter(), sys.argv[1]
while True:
    a @ b
    n += 1
    if n % 20 == 0:
        with open(out, "w") as fh:
            fh.write(f"{n} {time.perf_counter() - t0}\n")
"""


class Competitor:
    """A CPU-bound process beside a run; ``rate()`` is its matmuls per second over its life."""

    def __init__(self, work: Path, threads: int) -> None:
        self.script, self.stats = work / "competitor.py", work / "competitor.txt"
        self.script.write_text(COMPETITOR)
        self.threads = threads
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Competitor":
        self.stats.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.stats), str(self.threads)], env=env)
        time.sleep(3)  # imported and running
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait()

    def rate(self) -> Optional[float]:
        try:
            n, seconds = self.stats.read_text().split()
            return int(n) / float(seconds)
        except (OSError, ValueError):
            return None


def run_side(side: str, folder: Path, text_file: Path, win_file: Path, work: Path, tag: str,
             args: argparse.Namespace) -> Dict[str, Any]:
    out_dir = work / "out" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    settings = dict(bits=4, sym=True, group_size=128, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                    batch_size=args.batch_size, seed=42)
    if side == "reference":
        rec = run_reference(str(folder), text_file, out_dir, work, tag, bits=4, group_size=128, sym=True,
                            iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size)
        seconds = rec.get("quantize_and_save_s")
    else:
        old = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # what our console entry points set
        try:
            opts = {**settings, "device": "cpu", **({"threads": 1} if side == "ours-1t" else {})}
            rec = run_ours({"job": "quantize", "kind": "llm", "model": str(folder), "model_dtype": "fp32",
                            "calib_windows": str(win_file), "save_dir": str(out_dir), "save_inplace": True,
                            "options": opts}, work, tag)
        finally:
            if old is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = old
        seconds = rec["quantize_s"] + rec["save_s"] if "save_s" in rec else None
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"side": side, "seconds": seconds, "process_cpu_s": rec.get("process_cpu_s"),
            "process_wall_s": rec.get("process_wall_s"), "error": rec.get("error"),
            "torch_threads": rec.get("torch_threads"), "load_avg_1min_before": rec.get("load_avg_1min_before")}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--competitor-threads", type=int, default=2)
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    args = parse_bench_args(p, argv, NAME, "iters 2, 8 x 64, one round", dict(iters=2, nsamples=8, seqlen=64,
                                                                              rounds=1))
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    text_file, win_file, _ = identical_windows(work, tok, args.nsamples, args.seqlen)
    comp = Competitor(work, args.competitor_threads)
    with comp:  # the competitor alone, for its quiet rate
        time.sleep(10)
    alone = comp.rate()
    records: List[Dict[str, Any]] = []
    for r in range(args.rounds):
        order = list(args.sides) if r % 2 == 0 else list(reversed(args.sides))
        for loaded in (False, True):
            for side in order:
                tag = f"{side}-{'loaded' if loaded else 'quiet'}-r{r}"
                log(f"run {tag}")
                if loaded:
                    with comp:
                        rec = run_side(side, folder, text_file, win_file, work, tag, args)
                    rec["competitor_rate"] = comp.rate()
                else:
                    rec = run_side(side, folder, text_file, win_file, work, tag, args)
                rec.update(loaded=loaded, round=r)
                records.append(rec)
                log(f"  {fmt(rec['seconds'], '.1f')} s, {fmt(rec['process_cpu_s'], '.0f')} CPU-s"
                    + (f", competitor {fmt(rec.get('competitor_rate'), '.1f')}/s (alone {fmt(alone, '.1f')}/s)"
                       if loaded else "") + (f"  ERROR {rec['error']}" if rec["error"] else ""))
    rows, summary = [], {}
    for side in args.sides:
        def best(loaded: bool) -> Optional[Dict[str, Any]]:
            ok = [x for x in records if x["side"] == side and x["loaded"] == loaded and x["seconds"] is not None]
            return min(ok, key=lambda x: x["seconds"]) if ok else None

        q, l = best(False), best(True)
        slow = l["seconds"] / q["seconds"] if q and l else None
        summary[side] = {"quiet_s": q and q["seconds"], "loaded_s": l and l["seconds"], "slowdown": slow,
                         "loaded_cpu_s": l and l["process_cpu_s"], "competitor_rate": l and l.get("competitor_rate")}
        rows.append([side, fmt(q and q["seconds"], ".1f"), fmt(l and l["seconds"], ".1f"), fmt(slow, ".2f") + "x",
                     fmt(q and q["process_cpu_s"], ".0f"), fmt(l and l["process_cpu_s"], ".0f"),
                     fmt(l and l.get("competitor_rate"), ".1f")])
    table = print_table(["side", "quiet s", "loaded s", "slowdown", "quiet CPU-s", "loaded CPU-s",
                         "competitor matmul/s"], rows,
                        f"SmolLM2 W4G128 iters {args.iters}, {args.nsamples} x {args.seqlen}, batch {args.batch_size}; "
                        f"competitor: {args.competitor_threads}-thread 1024^2 matmuls, {fmt(alone, '.1f')}/s alone; "
                        f"min over {args.rounds} round(s)")
    write_json(NAME, {"machine": machine_info(), "settings": vars(args), "competitor_alone_rate": alone,
                      "records": records, "summary": summary, "table": table}, args.json)
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
