"""MLLM: W4G128 of the SmolLM2-LLaVA demo VLM's language model; text vs image-text calibration,
and padded image-text batches vs the reference's forced batch size 1.

The model is ``demo.model.build_llava_with_lm`` around SmolLM2-135M-Instruct: the
language model is real, the vision tower and projector are small and random (they stay FP).
Runs (each its own process, fp32, CPU):

- ``text``: ``AutoRoundMLLM`` calibrated on the BBC calibration split (a temporary ``.jsonl``),
  ``batch_size`` per step;
- ``image-text bs4``: the built-in image-text set (``auto_round:offline_image_text``), samples of
  different lengths right-padded into batches of ``--batch-size`` with padded tokens masked out
  of the loss (ours);
- ``image-text bs1 x ga4``: the same data with ``batch_size=1, gradient_accumulate_steps=4``,
  what the reference forces for image-text data; same samples, same iterations, same tokens
  per step.

Perplexity: the language path of the VLM (``input_ids`` only) on the first ``--eval-windows``
512-token windows of the held-out BBC split, before and after. The batching comparison reports
``quantize()`` wall time, mean final (best) block loss and peak RSS; the two image-text runs are
interleaved (``--repeats`` rounds alternate their order).

    .venv/bin/python bench/bench_mllm.py            # real settings (about 10-12 min here)
    .venv/bin/python bench/bench_mllm.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (parse_bench_args, WORK, bbc_files, fmt, log, machine_info, mean, ours_block_losses, print_table,  # noqa: E402
                     run_ours, run_ppl, smollm2_dir, write_json)

NAME = "mllm"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--nsamples", type=int, default=32, help="the offline image-text set holds 43 samples")
    p.add_argument("--text-seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1, help="rounds of the two image-text runs")
    p.add_argument("--skip-text", action="store_true", help="only the image-text runs")
    return parse_bench_args(p, argv, NAME, "iters 2, 8 samples",
                            {"iters": 2, "nsamples": 8, "text_seqlen": 64, "eval_windows": 2})


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    lm_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(lm_dir)  # the VLM's tokenizer adds only <image> after these ids
    calib_file, eval_file = bbc_files(work, tok, args.eval_seqlen, args.eval_windows)

    base = {"bits": 4, "group_size": 128, "sym": True, "iters": args.iters, "nsamples": args.nsamples,
            "seed": 42, "device": "cpu"}
    runs = {
        "text": {**base, "dataset": str(calib_file), "seqlen": args.text_seqlen, "batch_size": args.batch_size},
        f"image-text bs{args.batch_size}": {**base, "dataset": "auto_round:offline_image_text",
                                            "batch_size": args.batch_size},
        f"image-text bs1 x ga{args.batch_size}": {**base, "dataset": "auto_round:offline_image_text",
                                                  "batch_size": 1, "gradient_accumulate_steps": args.batch_size},
    }
    record = {"benchmark": NAME, "lm": str(lm_dir), "runs_settings": runs, "machine": machine_info(),
              "eval": {"windows": args.eval_windows, "seqlen": args.eval_seqlen}, "runs": []}

    log("FP perplexity of the VLM's language path")
    fp = run_ppl(str(lm_dir), eval_file, work, "fp", kind="llava")
    record["fp"] = fp
    failed = bool(fp.get("error"))
    log(f"  FP ppl {fmt(fp.get('ppl'), '.3f')}")

    names = list(runs)
    order = ([names[0]] if not args.skip_text else [])
    for r in range(args.repeats):
        pair = names[1:] if r % 2 == 0 else names[:0:-1]
        order += pair
    for i, name in enumerate(order):
        tag = f"{name.replace(' ', '_')}-{i}"
        log(f"run {name}")
        rec = run_ours({"job": "quantize", "kind": "llava", "model": str(lm_dir), "options": runs[name],
                        "ppl_windows": str(eval_file)}, work, tag)
        failed |= bool(rec.get("error"))
        rec["name"] = name
        record["runs"].append(rec)
        log(f"  quantize {fmt(rec.get('quantize_s'), '.1f')} s, peak RSS {fmt(rec.get('peak_rss_mb'), '.0f')} MB, "
            f"mean best loss {fmt(mean(ours_block_losses(rec)), '.4g')}, ppl {fmt(rec.get('ppl'), '.3f')}")

    rows = [["FP", "-", "-", "", "", "", "", fmt(fp.get("ppl"), ".3f"), ""]]
    best = {}
    for name in names:
        ok = [x for x in record["runs"] if x["name"] == name and not x.get("error")]
        if not ok:
            continue
        x = min(ok, key=lambda x: x["quantize_s"])
        best[name] = x
        blocks = x.get("summary", {}).get("blocks", [])
        rows.append([name, runs[name]["batch_size"], runs[name].get("gradient_accumulate_steps", 1),
                     fmt(x["quantize_s"], ".1f") + (f" (of {len(ok)})" if len(ok) > 1 else ""),
                     fmt(x["peak_rss_mb"], ".0f"), fmt(x.get("peak_rss_quantize_mb"), ".0f"),
                     f"{fmt(mean([b['first'] for b in blocks]), '.4g')} -> {fmt(mean(ours_block_losses(x)), '.4g')}",
                     fmt(x.get("ppl"), ".3f"), x.get("summary", {}).get("dataset", "")])
    b4, b1 = best.get(names[1]), best.get(names[2])
    speedup = b1["quantize_s"] / b4["quantize_s"] if b4 and b1 else None
    record["batching_speedup_bs1ga_over_bs"] = speedup
    title = (f"SmolLM2-LLaVA (real LM, random vision), W4G128 sym of the language model, iters {args.iters}, "
             f"nsamples {args.nsamples}, CPU fp32; ppl = language path on {args.eval_windows} x "
             f"{args.eval_seqlen} held-out BBC tokens. Batching speed-up (bs1 x ga{args.batch_size} time / "
             f"bs{args.batch_size} time): {fmt(speedup, '.2f')}x")
    record["table"] = print_table(["run", "batch", "grad acc", "quantize s", "peak RSS MB", "RSS in quantize() MB",
                                   "mean block loss it0 -> best", "ppl", "data"], rows, title)
    write_json(NAME, record, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
