"""Recipes: time and perplexity of ``--recipe default|best|light|rtn|opt-rtn`` on SmolLM2-135M-Instruct.

Each recipe runs with its own values (:data:`auto_round.config.RECIPES`: iterations, learning rate,
sample count) at W4G128 sym; what differs from the recipes is stated in the output: the calibration
windows are ``--seqlen`` tokens (256 here, instead of 2048, to fit a CPU run) and the batch is the
reference's 8. Calibration: the BBC calibration split through our normal text data path;
evaluation: ``--eval-windows`` held-out 512-token windows (fp32). One process per run, in the order
given (``--recipes``), so a run's time is its own.

    .venv/bin/python bench/bench_recipes.py                       # rtn, opt-rtn, light, default
    .venv/bin/python bench/bench_recipes.py --recipes best        # 1000 iterations on 512 samples (long)
    .venv/bin/python bench/bench_recipes.py --quick               # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (WORK, bbc_files, fmt, log, machine_info, parse_bench_args, print_table, run_ours,  # noqa: E402
                     run_ppl, smollm2_dir, write_json)

NAME = "recipes"
ORDER = ("rtn", "opt-rtn", "light", "default", "best")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["rtn", "opt-rtn", "light", "default"], choices=ORDER)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256, help="calibration window (the recipes' own is 2048)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--iters-override", type=int, default=None, help="smoke tests only: replace every recipe's iters")
    p.add_argument("--nsamples-override", type=int, default=None, help="smoke tests only")
    return parse_bench_args(p, argv, NAME, "rtn and light, 2 iterations on 4 samples of 64 tokens",
                            {"recipes": ["rtn", "light"], "iters_override": 2, "nsamples_override": 4, "seqlen": 64,
                             "batch_size": 2, "eval_windows": 2})


def recipe_options(recipe: str, args: argparse.Namespace) -> dict:
    """The keywords of one run: the recipe's values, then the bench's stated overrides."""
    from auto_round.config import RECIPES, Settings

    opts = {"iters": Settings.iters, "nsamples": Settings.nsamples, **RECIPES[recipe]}
    opts.pop("low_gpu_mem_usage", None)  # a GPU memory setting: no effect on a CPU run
    if args.iters_override is not None and opts["iters"]:
        opts["iters"] = args.iters_override
    if args.nsamples_override is not None:
        opts["nsamples"] = args.nsamples_override
    return {**opts, "bits": args.bits, "group_size": args.group_size, "sym": True, "seqlen": args.seqlen,
            "batch_size": min(args.batch_size, opts["nsamples"]), "seed": 42, "device": "cpu"}


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_file, windows_file = bbc_files(work, tok, args.eval_seqlen, args.eval_windows)
    record = {"benchmark": NAME, "model": str(model_dir), "scheme": f"W{args.bits}G{args.group_size} sym",
              "eval": {"windows": args.eval_windows, "seqlen": args.eval_seqlen, "split": "BBC held-out"},
              "machine": machine_info(), "runs": {}}
    log("FP perplexity")
    fp = run_ppl(str(model_dir), windows_file, work, "fp")
    record["runs"]["fp"] = fp
    failed = bool(fp.get("error"))
    rows = [["FP (fp32)", "-", "-", "-", fmt(fp.get("ppl"), ".3f"), "-", "-", "-"]]
    for recipe in args.recipes:
        opts = {**recipe_options(recipe, args), "dataset": str(calib_file)}
        log(f"run {recipe}: {opts}")
        rec = run_ours({"job": "quantize", "kind": "llm", "model": str(model_dir), "model_dtype": "fp32",
                        "options": opts, "ppl_windows": str(windows_file)}, work, recipe)
        rec["options"] = opts
        record["runs"][recipe] = rec
        failed |= bool(rec.get("error"))
        gap = (rec["ppl"] - fp["ppl"]) if rec.get("ppl") and fp.get("ppl") else None
        log(f"  ppl {fmt(rec.get('ppl'), '.3f')}, quantize {fmt(rec.get('quantize_s'), '.1f')} s")
        rows.append([recipe, opts["iters"], (opts.get("lr") or "1/iters") if opts["iters"] else "-", opts["nsamples"] if opts["iters"] or
                     not opts.get("disable_opt_rtn") else "-", fmt(rec.get("ppl"), ".3f"), fmt(gap, "+.2f"),
                     fmt(rec.get("quantize_s"), ".1f"), fmt(rec.get("peak_rss_mb"), ".0f")])
    title = (f"SmolLM2-135M-Instruct W{args.bits}G{args.group_size} sym per recipe; calibration windows of "
             f"{args.seqlen} tokens, batch {args.batch_size}; BBC held-out ppl ({args.eval_windows} x "
             f"{args.eval_seqlen}, fp32); CPU, load average at start {fmt(machine_info()['load_average'][0], '.1f')}")
    record["table"] = print_table(["recipe", "iters", "lr", "samples", "ppl", "vs FP", "quantize s",
                                   "peak RSS MB"], rows, title)
    write_json(NAME, record, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
