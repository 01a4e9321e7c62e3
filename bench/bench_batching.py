"""Padded image-text batches vs the reference's forced batch_size=1, in one process, back to back.

Same model (SmolLM2-LLaVA), same image-text samples, same iterations and tokens per step: padded
batches of 4 with a loss mask, against batch 1 with 4 accumulation steps. Prints and writes
bench/results/batching.json. Usage: .venv/bin/python bench/bench_batching.py [--iters 10 --nsamples 16]
"""

import argparse
import json
import logging
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the demo package (demo/) beside src/

import torch


def run(args, batch_size: int, accumulate: int) -> dict:
    from auto_round import AutoRoundMLLM
    from demo.assets import fetch_smollm2
    from demo.model import build_llava_with_lm

    model, tok, proc = build_llava_with_lm(fetch_smollm2(args.cache_dir))
    ar = AutoRoundMLLM(model, tok, proc, bits=4, group_size=128, iters=args.iters, nsamples=args.nsamples,
                       batch_size=batch_size, gradient_accumulate_steps=accumulate,
                       dataset="auto_round:offline_image_text", device="cpu")
    t0 = time.perf_counter()
    ar.quantize()
    blocks = ar.summary["blocks"]
    return {"batch_size": batch_size, "gradient_accumulate_steps": accumulate,
            "quantize_s": round(time.perf_counter() - t0, 2),
            "tuning_s": round(sum(b["seconds"] for b in blocks), 2),
            "mean_best_loss": sum(b["best"] for b in blocks) / len(blocks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=".cache/assets")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nsamples", type=int, default=16)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [run(args, 4, 1), run(args, 1, 4)]
    speedup = rows[1]["tuning_s"] / rows[0]["tuning_s"]
    print(f"iters {args.iters}, nsamples {args.nsamples}, W4G128, SmolLM2-LLaVA, image-text data, CPU")
    print("| batching | tuning s (all blocks) | quantize() s | mean best loss |")
    print("|---|---|---|---|")
    for r in rows:
        name = "padded batch 4 + loss mask" if r["batch_size"] == 4 else "batch 1 x 4 accumulation (reference)"
        print(f"| {name} | {r['tuning_s']} | {r['quantize_s']} | {r['mean_best_loss']:.4g} |")
    print(f"speed-up of padded batches: {speedup:.2f}x")
    out = Path("bench/results/batching.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"iters": args.iters, "nsamples": args.nsamples, "rows": rows,
                               "speedup": speedup, "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
