"""Quality: SmolLM2-135M-Instruct perplexity on held-out BBC news, FP vs RTN vs tuned (ours).

Schemes (all sym, full-range): W4G128, W3G128, W2G64. For each: plain round-to-nearest
(``iters=0, disable_opt_rtn``), optimized RTN (``iters=0``) and SignRound tuning with the same
settings for every scheme. Calibration: the BBC calibration split (articles whose number is not
divisible by 5), written to a temporary ``.jsonl`` (one article per line) and read by our normal
data path. Evaluation: the first ``--eval-windows``
non-overlapping 512-token windows of the held-out split (articles numbered 5, 10, ...), fp32.

Note (shared/assets/ASSETS.md): SmolLM2's weights come from a Q4_1 (group 32, asym) GGUF, so
W4 results look better than on a genuinely 16-bit model; G128 sym and 3/2 bits still lose.

Each quantization runs in its own process (peak RSS per run).

    .venv/bin/python bench/bench_quality.py            # real settings (about 15-20 min here)
    .venv/bin/python bench/bench_quality.py --quick    # smoke test
    .venv/bin/python bench/bench_quality.py --schemes W4G128 --iters 200 --nsamples 128
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (parse_bench_args, WORK, bbc_files, fmt, log, machine_info, mean, ours_block_losses, print_table,  # noqa: E402
                     run_ours, run_ppl, smollm2_dir, write_json)

NAME = "quality"
SCHEMES = {"W4G128": (4, 128), "W3G128": (3, 128), "W2G64": (2, 64)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=24, help="held-out windows of --eval-seqlen tokens")
    p.add_argument("--eval-seqlen", type=int, default=512)
    return parse_bench_args(p, argv, NAME, "W4G128 only, iters 2, 4 samples of 64",
                            {"schemes": ["W4G128"], "iters": 2, "nsamples": 4, "seqlen": 64, "batch_size": 2,
                             "eval_windows": 2})


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_file, windows_file = bbc_files(work, tok, args.eval_seqlen, args.eval_windows)

    common = {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "batch_size": args.batch_size, "seed": 42, "device": "cpu", "dataset": str(calib_file)}
    record = {"benchmark": NAME, "model": str(model_dir), "settings": common,
              "eval": {"windows": args.eval_windows, "seqlen": args.eval_seqlen, "split": "BBC held-out"},
              "machine": machine_info(), "runs": {}}

    log("FP perplexity")
    fp = run_ppl(str(model_dir), windows_file, work, "fp")
    record["runs"]["fp"] = fp
    log(f"  FP ppl {fmt(fp.get('ppl'), '.3f')}")
    failed = bool(fp.get("error"))
    rows = [["FP (fp32)", "-", fmt(fp.get("ppl"), ".3f"), "", "", "", "", ""]]
    for scheme in args.schemes:
        bits, gs = SCHEMES[scheme]
        res = {}
        for method, iters, extra in (("rtn", 0, {"disable_opt_rtn": True}), ("opt-rtn", 0, {}),
                                     ("tuned", args.iters, {})):
            tag = f"{scheme}-{method}"
            log(f"run {tag}")
            opts = {**common, "bits": bits, "group_size": gs, "sym": True, "iters": iters, **extra}
            rec = run_ours({"job": "quantize", "kind": "llm", "model": str(model_dir), "model_dtype": "fp32",
                            "options": opts, "ppl_windows": str(windows_file)}, work, tag)
            record["runs"][tag] = rec
            res[method] = rec
            failed |= bool(rec.get("error"))
            log(f"  ppl {fmt(rec.get('ppl'), '.3f')}, quantize {fmt(rec.get('quantize_s'), '.1f')} s, "
                f"peak RSS {fmt(rec.get('peak_rss_mb'), '.0f')} MB")
        rtn, tuned, fpp = res["rtn"].get("ppl"), res["tuned"].get("ppl"), fp.get("ppl")
        closed = None
        if None not in (rtn, tuned, fpp) and rtn > fpp:
            closed = 100.0 * (math.log(rtn) - math.log(tuned)) / (math.log(rtn) - math.log(fpp))
        blocks = res["tuned"].get("summary", {}).get("blocks", [])
        first = mean([b["first"] for b in blocks])
        best = mean(ours_block_losses(res["tuned"]))
        record.setdefault("summary", {})[scheme] = {
            "fp_ppl": fpp, "rtn_ppl": rtn, "opt_rtn_ppl": res["opt-rtn"].get("ppl"), "tuned_ppl": tuned,
            "tuned_over_rtn": (tuned / rtn) if rtn and tuned else None,
            "log_gap_closed_pct": closed, "tuned_quantize_s": res["tuned"].get("quantize_s"),
            "rtn_quantize_s": res["rtn"].get("quantize_s"), "tuned_peak_rss_mb": res["tuned"].get("peak_rss_mb"),
            "mean_block_loss_iter0": first, "mean_block_loss_best": best}
        rows.append([f"{scheme} sym", "RTN", fmt(rtn, ".3f"), "", "", fmt(res["rtn"].get("quantize_s"), ".1f"),
                     fmt(res["rtn"].get("peak_rss_mb"), ".0f"), ""])
        rows.append([f"{scheme} sym", "optimized RTN", fmt(res["opt-rtn"].get("ppl"), ".3f"), "", "",
                     fmt(res["opt-rtn"].get("quantize_s"), ".1f"), fmt(res["opt-rtn"].get("peak_rss_mb"), ".0f"), ""])
        rows.append([f"{scheme} sym", f"tuned ({args.iters} it)", fmt(tuned, ".3f"),
                     fmt(tuned / rtn, ".3f") if rtn and tuned else "-", fmt(closed, ".0f") + "%" if closed else "-",
                     fmt(res["tuned"].get("quantize_s"), ".1f"), fmt(res["tuned"].get("peak_rss_mb"), ".0f"),
                     f"{fmt(first, '.4g')} -> {fmt(best, '.4g')}"])
    title = (f"SmolLM2-135M-Instruct, BBC held-out ppl ({args.eval_windows} x {args.eval_seqlen} tokens, fp32); "
             f"tuning: nsamples {args.nsamples}, seqlen {args.seqlen}, batch {args.batch_size}, "
             f"iters {args.iters}, CPU")
    record["table"] = print_table(["scheme", "method", "ppl", "tuned/RTN", "log-gap closed", "quantize s",
                                   "peak RSS MB", "mean block loss it0 -> best"], rows, title)
    write_json(NAME, record, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
