"""Quantization cost on CPU: wall time and peak RSS, ours vs the reference (auto-round 0.16.1).

Two random Llama models, same settings for both implementations:

- tiny: hidden 64, intermediate 128, 2 layers, vocab 512, group_size 32 (its layers are 64 wide),
  with the test suite's byte-level BPE tokenizer;
- mid: hidden 1024, intermediate 2816, 8 layers, 16 heads, with the SmolLM2 tokenizer (vocab 49152,
  the tokenizer's size; 32000 rows could not embed SmolLM2's ids), group_size 128.

Both are saved as fp32 folders and loaded in fp32 by both sides. Calibration: the offline corpus
shipped with our package. Ours reads it through its normal data path
(``dataset='auto_round:offline_corpus'``); the reference gets the same corpus text through
``bench/reference_runner.py --calib-mode windows`` (first ``nsamples`` windows of the
tokenized text). Same number of samples and tokens per sample on both sides.

Each run is its own process (peak RSS per run). Runs are interleaved (ours, reference, ours, ...)
so machine noise hits both. Timings compared: ours ``quantize()`` +
``save_quantized('auto_round', inplace=True)`` vs the reference's
``quantize_and_save(format='auto_round')`` (inplace by default): both pack the in-memory model into
a checkpoint and exclude model loading; the reference's excludes its tokenization, ours includes
building the samples. (The reference's ``fake`` format is not used here: from an fp32 source
folder its save step "restores" the source's fp32 tensors over the quantized weights, see
bench_vs_reference.py.) Our "RSS in quantize()" column is the peak during ``quantize()`` alone
(``VmHWM`` reset after loading); "peak RSS" covers load + quantize + save on both sides.

    .venv/bin/python bench/bench_quant_cost.py            # real settings (about 5 min here)
    .venv/bin/python bench/bench_quant_cost.py --quick    # smoke test (about 2 min)
    .venv/bin/python bench/bench_quant_cost.py --models mid --iters 50 --nsamples 32 --batch-size 8
    .venv/bin/python bench/bench_quant_cost.py --models mid --compile --repeats 2 \
        --json bench/results/quant_cost_compile.json   # + ours with enable_torch_compile, same rounds
    .venv/bin/python bench/bench_quant_cost.py --models mid --no-reference --model-dtype bf16 \
        --json bench/results/quant_cost_bf16.json   # our RSS with the model held in bf16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (parse_bench_args, WORK, fmt, log, machine_info, mean, mid_llama_dir, ours_block_losses,  # noqa: E402
                     param_count, print_table, ref_block_losses, run_ours, run_reference, tiny_llama_dir,
                     write_json)

NAME = "quant_cost"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="rounds of (ours, reference) per model")
    p.add_argument("--no-reference", action="store_true", help="measure ours only")
    p.add_argument("--compile", action="store_true",
                   help="also ours with enable_torch_compile=True (side 'ours-compiled'), in the same rounds")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype ours loads the model in (the reference always gets the fp32 folder)")
    return parse_bench_args(p, argv, NAME, "iters 2, nsamples 4, seqlen 64, batch 2",
                            {"iters": 2, "nsamples": 4, "seqlen": 64, "batch_size": 2})


def main(argv=None) -> int:
    args = parse_args(argv)
    from importlib import resources

    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "offline_corpus.txt"
    corpus.write_text(resources.files("auto_round.calib").joinpath("data/offline_corpus.txt").read_text("utf-8"),
                      encoding="utf-8")
    models = {}
    for m in args.models:
        log(f"preparing model {m}")
        folder = tiny_llama_dir() if m == "tiny" else mid_llama_dir()
        models[m] = {"dir": folder, "group_size": 32 if m == "tiny" else 128, "params": param_count(folder)}

    settings = {"bits": args.bits, "sym": True, "iters": args.iters, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "batch_size": args.batch_size, "seed": 42}
    record = {"benchmark": NAME, "settings": settings, "model_dtype_ours": args.model_dtype, "machine": machine_info(),
              "models": {k: {"dir": str(v["dir"]), "group_size": v["group_size"], "params": v["params"]}
                         for k, v in models.items()}, "runs": []}
    for r in range(args.repeats):
        for m, info in models.items():
            sides = ["ours"] + (["ours-compiled"] if args.compile else []) + ([] if args.no_reference else ["reference"])
            if r % 2:
                sides.reverse()
            for side in sides:
                tag = f"{m}-{side}-r{r}"
                log(f"run {tag}")
                out_dir = work / "out" / tag
                shutil.rmtree(out_dir, ignore_errors=True)
                if side.startswith("ours"):
                    extra = {"enable_torch_compile": True} if side == "ours-compiled" else {}
                    # a cold compile every compiled run (inductor caches compiled kernels on disk across processes)
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor" / tag)
                    shutil.rmtree(work / "inductor" / tag, ignore_errors=True)
                    rec = run_ours({"job": "quantize", "kind": "llm", "model": str(info["dir"]), "model_dtype": args.model_dtype,
                                    "save_dir": str(out_dir), "save_inplace": True,
                                    "options": {**settings, "group_size": info["group_size"], "device": "cpu",
                                                "dataset": "auto_round:offline_corpus", **extra}}, work, tag)
                    row = {"quantize_s": rec.get("quantize_s"), "save_s": rec.get("save_s"),
                           "quantize_save_s": (rec["quantize_s"] + rec["save_s"]) if "save_s" in rec else None,
                           "load_s": rec.get("load_s"), "peak_rss_mb": rec.get("peak_rss_mb"),
                           "peak_rss_quantize_mb": rec.get("peak_rss_quantize_mb"),
                           "mean_best_loss": mean(ours_block_losses(rec))}
                else:
                    rec = run_reference(str(info["dir"]), corpus, out_dir, work, tag, bits=args.bits,
                                        group_size=info["group_size"], sym=True, iters=args.iters,
                                        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                                        fmt="auto_round")
                    # The reference logs mean MSE divided by the batch's unmasked token count; scale back.
                    factor = args.batch_size * (args.seqlen - 1)
                    row = {"quantize_s": None, "save_s": None, "quantize_save_s": rec.get("quantize_and_save_s"),
                           "load_s": rec.get("load_s"), "peak_rss_mb": rec.get("peak_rss_mb"),
                           "peak_rss_quantize_mb": None,
                           "mean_best_loss": (mean(ref_block_losses(rec)) or 0) * factor
                           if ref_block_losses(rec) else None}
                shutil.rmtree(out_dir, ignore_errors=True)
                row.update({"model": m, "side": side, "round": r, "process_wall_s": rec.get("process_wall_s"),
                            "load_avg_1min_before": rec.get("load_avg_1min_before"), "error": rec.get("error"),
                            "raw": rec})
                record["runs"].append(row)
                log(f"  {side}: quantize+save {fmt(row['quantize_save_s'])} s, peak RSS {fmt(row['peak_rss_mb'], '.0f')} MB")

    rows, summary = [], {}
    for m in models:
        for side in ("ours", "ours-compiled", "reference"):
            runs = [x for x in record["runs"] if x["model"] == m and x["side"] == side and not x["error"]]
            if not runs:
                continue
            best = min(runs, key=lambda x: x["quantize_save_s"] or float("inf"))
            summary[(m, side)] = best
        o, oc, rf = summary.get((m, "ours")), summary.get((m, "ours-compiled")), summary.get((m, "reference"))
        speedup = (rf["quantize_save_s"] / o["quantize_save_s"]) if o and rf else None
        rss_ratio = (rf["peak_rss_mb"] / o["peak_rss_mb"]) if o and rf else None
        if oc:
            record.setdefault("compile", {})[m] = {
                "eager_over_compiled": o["quantize_save_s"] / oc["quantize_save_s"] if o else None,
                "ref_over_compiled": rf["quantize_save_s"] / oc["quantize_save_s"] if rf else None}
        for side, x in (("ours", o), ("ours-compiled", oc), ("reference", rf)):
            if x is None:
                continue
            rows.append([f"{m} ({models[m]['params'] / 1e6:.1f}M, G{models[m]['group_size']})", side,
                         fmt(x["load_s"]), fmt(x["quantize_save_s"], ".1f"), fmt(x["process_wall_s"], ".1f"),
                         fmt(x["peak_rss_mb"], ".0f"), fmt(x["peak_rss_quantize_mb"], ".0f"),
                         fmt(x["mean_best_loss"], ".4g"),
                         (fmt(speedup, ".2f") + "x" if side == "ours" and speedup else
                          fmt(record["compile"][m]["ref_over_compiled"], ".2f") + "x"
                          if side == "ours-compiled" and rf else ""),
                         fmt(rss_ratio, ".2f") + "x" if side == "ours" and rss_ratio else ""])
        record.setdefault("speedup", {})[m] = {"time_ref_over_ours": speedup, "rss_ref_over_ours": rss_ratio}
    title = (f"W{args.bits} sym, iters {args.iters}, nsamples {args.nsamples}, seqlen {args.seqlen}, "
             f"batch {args.batch_size}, CPU, ours loads {args.model_dtype}, offline corpus (best of {args.repeats} round(s))")
    record["table"] = print_table(["model", "impl", "load s", "quantize+save s", "process s", "peak RSS MB",
                                   "RSS in quantize() MB", "mean best loss", "speed-up", "RSS ref/ours"], rows, title)
    write_json(NAME, record, args.json)
    return 0 if all(not x["error"] for x in record["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
