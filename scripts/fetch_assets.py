#!/usr/bin/env python3
"""Fetch the offline assets (SmolLM2-135M-Instruct as an HF folder, the BBC News corpus).

Thin wrapper over :mod:`demo.assets`. Idempotent: finished assets are skipped.

    python scripts/fetch_assets.py                       # both, into .cache/assets
    python scripts/fetch_assets.py --only bbc
    python scripts/fetch_assets.py --ppl --max-windows 40   # also report fp perplexity
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # works without `pip install -e .` too
sys.path.insert(0, str(REPO))  # the demo package (demo/assets.py) lives beside src/, outside the library

from demo import assets  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "assets")
    parser.add_argument("--only", choices=("smollm2", "bbc"), help="fetch just one asset")
    parser.add_argument("--ppl", action="store_true",
                        help="report the perplexity of the SmolLM2 folder on held-out BBC texts")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--categories", nargs="*", help="BBC categories for --ppl (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.only in (None, "bbc"):
            t0 = time.time()
            print(f"bbc corpus: {assets.fetch_bbc_corpus(args.cache_dir)} ({time.time() - t0:.1f}s)")
        if args.only in (None, "smollm2"):
            t0 = time.time()
            print(f"smollm2:    {assets.fetch_smollm2(args.cache_dir)} ({time.time() - t0:.1f}s)")
    except (assets.AssetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    if args.ppl:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = assets.fetch_smollm2(args.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        _, heldout = assets.bbc_split(args.cache_dir, args.categories)
        t0 = time.time()
        ppl = assets.perplexity(model, tokenizer, heldout, seqlen=args.seqlen, max_windows=args.max_windows)
        cats = ",".join(args.categories) if args.categories else "all"
        print(f"perplexity {ppl:.3f}  (SmolLM2 {args.dtype}, BBC held-out [{cats}], "
              f"{args.max_windows} x {args.seqlen} tokens, {time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
