"""Ours vs the reference (auto-round 0.16.1), side by side on identical calibration windows.

Models: the tiny random Llama (hidden 64, 2 layers, vocab 512; group size 32 because its layers
are 64 wide; test-suite tokenizer; saved in bf16, see below) and SmolLM2-135M-Instruct (bf16
folder) at W4G128 sym. Both sides load them in fp32.

Calibration: the first BBC calibration-split articles, joined by blank lines, written to a text
file. The reference gets it through ``bench/reference_runner.py --calib-mode windows`` (the whole
file tokenized without special tokens, the first ``nsamples`` ``seqlen``-token windows). Ours
gets the very same ids: this script tokenizes the file the runner's way, checks in the
reference venv that its tokenizer gives the same ids (sha256), and hands the windows to our
worker, which calibrates on exactly them (a subclass of ``AutoRound`` whose
``calibration_batches`` returns these windows, ``batch_size`` per batch, mask all ones).

Remaining differences, by design of each implementation (not of the data):

- batches: ours cuts the windows into fixed batches and visits them in a seeded shuffled order;
  the reference draws ``batch_size`` sample indices per step with its own sampler;
- the reference masks the last position of every window (and pad-token ids, none here) out of
  the attention mask and the loss; ours uses every position;
- both run the block forwards under bf16 autocast on this CPU (``amp=True``, the default of
  both); the reference also holds its model in bf16 while tuning, ours keeps the fp32 weights
  (the qdq math is fp32);
- logged losses: the reference logs the mean squared error divided again by the number of
  unmasked tokens in the batch; this script multiplies it back by ``batch_size * (seqlen - 1)``
  so both columns are a mean squared error per hidden element;
- timings: ours ``quantize()`` + ``save_quantized('auto_round')`` (packed) vs the reference's
  ``quantize_and_save(format='fake')``; both exclude loading the model.

Perplexity: first ``--eval-windows`` 512-token windows of the BBC held-out split, fp32; ours on
the in-memory fake-quantized model (also after rounding its weights to bf16: the reference's
fake folder stores the source dtype, bf16), the reference on its saved fake-quant folder loaded
with plain transformers. Why the tiny folder is bf16: from an fp32 source folder, the reference's
``fake`` save step "restores" the source's fp32 tensors over the saved ones, quantized weights
included (log: "Restored 21 tensor(s) from FP16/BF16 to their original FP32 values"), so its
folder would hold the unquantized model. Runs alternate ours/reference (each in its own process).

    .venv/bin/python bench/bench_vs_reference.py --seeds 42 1 2   # real settings (about 45 min here)
    .venv/bin/python bench/bench_vs_reference.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (parse_bench_args, WORK, check_reference_tokenizes_alike, fmt, identical_windows, log,  # noqa: E402
                     machine_info, mean, ours_block_losses, print_table, ref_block_losses, run_ours, run_ppl,
                     run_reference, smollm2_dir, tiny_llama_dir, write_json)

NAME = "vs_reference"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tiny-group-size", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="one round of (ours, reference) per seed, both sides with that seed; the table shows "
                        "the mean over seeds (a single SmolLM2 run's perplexity moves by about 0.5 with the "
                        "seed at these settings)")
    return parse_bench_args(p, argv, NAME, "iters 2, 4 samples of 64 tokens",
                            {"iters": 2, "nsamples": 4, "seqlen": 64, "batch_size": 2, "eval_windows": 2})


def _aggregate(runs):
    """Means over the seeds' runs of one side (None when every run failed)."""
    if not runs:
        return None

    def avg(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    ppls = [r["ppl"] for r in runs if r.get("ppl") is not None]
    return {"n": len(runs), "time_s": avg("time_s"), "peak_rss_mb": avg("peak_rss_mb"),
            "peak_rss_quantize_mb": avg("peak_rss_quantize_mb"), "ppl": avg("ppl"),
            "ppl_bf16_weights": avg("ppl_bf16_weights"), "ppl_range": [min(ppls), max(ppls)] if ppls else None,
            "first": mean([mean(r["block_first"]) for r in runs if r["block_first"]]),
            "best": mean([mean(r["block_best"]) for r in runs if r["block_best"]]),
            "seeds": [r["seed"] for r in runs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    settings = {"bits": 4, "sym": True, "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "batch_size": args.batch_size, "seed": 42}
    record = {"benchmark": NAME, "settings": settings, "machine": machine_info(), "models": {}, "runs": []}
    rows, failed = [], False
    for m in args.models:
        folder = tiny_llama_dir(dtype="bf16") if m == "tiny" else smollm2_dir()
        gs = args.tiny_group_size if m == "tiny" else 128
        tok = AutoTokenizer.from_pretrained(folder)
        text_file, win_file, eval_file = identical_windows(work, tok, args.nsamples, args.seqlen, args.eval_windows,
                                                          args.eval_seqlen, tag=f"_{m}")
        windows = torch.load(win_file)
        same = check_reference_tokenizes_alike(str(folder), text_file, args.seqlen, args.nsamples, windows)
        log(f"{m}: calibration windows {tuple(windows.shape)}; reference venv tokenizes identically: "
            f"{same['identical']}")
        minfo = {"dir": str(folder), "group_size": gs, "calib_text": str(text_file),
                 "windows_identical_in_reference_venv": same}
        record["models"][m] = minfo
        log(f"{m}: FP perplexity")
        fp = run_ppl(str(folder), eval_file, work, f"{m}-fp")
        minfo["fp_ppl"] = fp.get("ppl")
        failed |= bool(fp.get("error"))

        results = {"ours": [], "reference": []}
        for r, seed in enumerate(args.seeds):
            for side in (["ours", "reference"] if r % 2 == 0 else ["reference", "ours"]):
                tag = f"{m}-{side}-r{r}"
                out_dir = work / "out" / tag
                shutil.rmtree(out_dir, ignore_errors=True)
                log(f"run {tag}")
                if side == "ours":
                    rec = run_ours({"job": "quantize", "kind": "llm", "model": str(folder), "model_dtype": "fp32",
                                    "calib_windows": str(win_file), "save_dir": str(out_dir),
                                    "ppl_windows": str(eval_file), "ppl_bf16_weights": True,
                                    "options": {**settings, "seed": seed, "group_size": gs, "device": "cpu"}},
                                   work, tag)
                    row = {"time_s": (rec["quantize_s"] + rec["save_s"]) if "save_s" in rec else None,
                           "peak_rss_mb": rec.get("peak_rss_mb"), "block_best": ours_block_losses(rec),
                           "peak_rss_quantize_mb": rec.get("peak_rss_quantize_mb"),
                           "block_first": [b["first"] for b in rec.get("summary", {}).get("blocks", [])],
                           "ppl": rec.get("ppl"), "ppl_bf16_weights": rec.get("ppl_bf16_weights")}
                else:
                    rec = run_reference(str(folder), text_file, out_dir, work, tag, bits=4, group_size=gs, sym=True,
                                        iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                                        batch_size=args.batch_size, seed=seed)
                    factor = args.batch_size * (args.seqlen - 1)
                    row = {"time_s": rec.get("quantize_and_save_s"), "peak_rss_mb": rec.get("peak_rss_mb"),
                           "block_best": [x * factor for x in ref_block_losses(rec)],
                           "block_first": [b["loss_iter0"] * factor for b in rec.get("block_losses", [])],
                           "quantized_layers": [f"{b['quantized_layers']}/{b['layers']}"
                                                for b in rec.get("block_losses", [])]}
                    if not rec.get("error"):
                        log("  perplexity of the reference's fake-quant folder")
                        pp = run_ppl(str(out_dir), eval_file, work, f"{tag}-ppl")
                        row["ppl"] = pp.get("ppl")
                        row["ppl_error"] = pp.get("error")
                        failed |= bool(pp.get("error"))
                    shutil.rmtree(out_dir, ignore_errors=True)
                shutil.rmtree(out_dir, ignore_errors=True)
                row.update({"model": m, "side": side, "round": r, "seed": seed, "error": rec.get("error"),
                            "process_wall_s": rec.get("process_wall_s"),
                            "load_avg_1min_before": rec.get("load_avg_1min_before"), "raw": rec})
                failed |= bool(rec.get("error"))
                record["runs"].append(row)
                results[side].append(row)
                log(f"  {side}: {fmt(row['time_s'], '.1f')} s, peak RSS {fmt(row['peak_rss_mb'], '.0f')} MB, "
                    f"mean best loss {fmt(mean(row['block_best']), '.4g')}, ppl {fmt(row.get('ppl'), '.3f')}")
        agg = {side: _aggregate([x for x in v if not x["error"]]) for side, v in results.items()}
        o, rf = agg["ours"], agg["reference"]
        speed = rf["time_s"] / o["time_s"] if o and rf and o["time_s"] and rf["time_s"] else None
        label = f"{m} W4G{gs}"
        rows.append([label, "FP", "", "", "", "", "", fmt(fp.get("ppl"), ".3f"), "", ""])
        for side, x in (("ours", o), ("reference", rf)):
            if x is None:
                rows.append([label, side, "FAILED", "", "", "", "", "", "", ""])
                continue
            ppl = fmt(x.get("ppl"), ".3f")
            if x["n"] > 1 and x.get("ppl_range"):
                ppl += f" ({x['ppl_range'][0]:.2f}-{x['ppl_range'][1]:.2f})"
            rows.append([label, side, fmt(x["time_s"], ".1f"), fmt(x["peak_rss_mb"], ".0f"),
                         fmt(x.get("peak_rss_quantize_mb"), ".0f"),
                         fmt(x["first"], ".4g"), fmt(x["best"], ".4g"), ppl,
                         fmt(x.get("ppl_bf16_weights"), ".3f") if side == "ours" else "",
                         f"{speed:.2f}x" if side == "ours" and speed else ""])
        minfo["summary"] = {"speedup_ref_over_ours": speed, "seeds": args.seeds, "ours": o, "reference": rf}
    title = (f"W4 sym, iters {args.iters}, nsamples {args.nsamples}, seqlen {args.seqlen}, batch {args.batch_size}, "
             f"identical BBC calibration windows, CPU, fp32 model, amp on both sides; ppl on {args.eval_windows} x "
             f"{args.eval_seqlen} held-out BBC tokens; means over seeds {args.seeds} (ppl range in brackets)")
    record["table"] = print_table(["model", "impl", "quantize+save s", "peak RSS MB", "RSS in quantize() MB", "mean loss it0",
                                   "mean best loss", "ppl", "ppl bf16 weights", "speed-up"], rows, title)
    write_json(NAME, record, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
