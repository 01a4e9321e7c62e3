"""Disk offload of the calibration cache (``offload_dir``) vs the in-memory cache: peak RSS and wall time of
``quantize()``, and whether the two checkpoints are byte-identical.

The block loop caches every block's inputs, FP targets and quantized-chain outputs (float32, ``[B, T, hidden]``
per batch). In memory (CPU tuning: on the CPU) up to three such copies are alive at once at iters > 0 (a unit's
quantized-chain inputs, its FP targets, then its outputs; the FP chain's inputs are released once the targets
exist) and four at iters 0 (the inputs, the FP outputs and two candidate outputs, the clip search's and plain
RTN's). With ``offload_dir`` each tensor goes to its own file as it is made and is read back per batch
(:class:`auto_round.calib.store.TensorStore`); the capture still holds one copy in memory until the loop stores it.

Cases (each configuration is its own process: ``ru_maxrss`` is that run's peak; ``OMP_NUM_THREADS=1``, one
torch thread; the runs of a case are interleaved, ``--repeats`` rounds alternating the order, and the table
reports the minimum over the rounds):

- ``llm``: a random Llama (hidden 1024, intermediate 2816, 16 heads / 4 kv heads, 3 blocks, vocab 4096, fp32,
  made once under ``.cache/bench/models``) calibrated on ``--nsamples`` random ``--seqlen``-token windows:
  one cached copy is ``nsamples * seqlen * hidden * 4`` bytes (256 MiB by default);
- ``vlm``: a LLaVA-1.5-shaped VLM built from a transformers config (``AutoRoundMLLM``; text Llama hidden 1024,
  2 blocks; a 2-layer CLIP of hidden 32 at 448 px: 1024 image tokens per sample) on the built-in image-text set
  (``auto_round:offline_image_text``): the image tokens are most of every cached sequence.

Both at ``iters=0`` (optimized RTN) and a few iterations (``--iters``), W4G128, ``format=auto_round``.

    .venv/bin/python bench/bench_offload.py            # two rounds at 128 samples: not timed (see the next line)
    .venv/bin/python bench/bench_offload.py --repeats 1 --nsamples 64   # 33 min on 2 cores shared with other work
    .venv/bin/python bench/bench_offload.py --quick    # hidden 256, small cache (3 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (WORK, _tests_on_path, fmt, job_compare, log, machine_info, main_or_child,  # noqa: E402
                     parse_bench_args, print_table, run_child, write_json)

NAME = "offload"
LLM_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                 num_hidden_layers=3, vocab_size=4096)
QUICK_LLM_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=4096)
VLM_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                num_hidden_layers=2)
QUICK_VLM_TEXT = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2)
MIB = 2 ** 20


def _status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmHWM``: peak RSS, ``VmRSS``: RSS now) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------ child jobs
def job_make(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(spec["folder"])
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **spec["shape"])
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    _tests_on_path()
    from tokenizer_fixture import make_tokenizer

    make_tokenizer().save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return {"params": sum(p.numel() for p in model.parameters())}


def _tiny_llava(text: dict, side: int):
    """LLaVA-1.5 layout as ``tests/tiny_vlms.tiny_llava`` builds it, with a wider language model and a
    ``side``-pixel image: ``(side / 14) ** 2`` image tokens per sample."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _tests_on_path()
    from tiny_vlms import _chat_template, _finish, _ids, _tok_ids, _tokenizer, _vocab

    tok = _tokenizer("<image>")
    (img_id,) = _ids(tok, "<image>")
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", **text, max_position_embeddings=4096, vocab_size=_vocab(tok),
                         **_tok_ids(tok)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=side, patch_size=14, projection_dim=32),
        image_token_index=img_id, image_seq_length=(side // 14) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = _finish(LlavaForConditionalGeneration(cfg), tok)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_chat_template("<image>"))
    return model, tok, proc


def _preload() -> None:
    """Import what every run uses before its clock starts."""
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration  # noqa: F401

    import auto_round.autoround  # noqa: F401
    import auto_round.mllm.autoround_mllm  # noqa: F401
    from auto_round.export import available_formats

    available_formats()


def job_quantize(spec: dict) -> dict:
    import torch

    from auto_round import AutoRound, AutoRoundMLLM
    from auto_round.device import peak_rss_mb

    torch.set_num_threads(1)
    _preload()
    shapes: List[List[int]] = []  # [B, T] of every calibration batch: the cache's size

    if spec["kind"] == "llm":
        class Calibrated(AutoRound):
            def calibration_batches(self):  # random token windows: as many tokens as asked, no corpus needed
                s = self.settings
                g = torch.Generator().manual_seed(s.seed)
                ids = torch.randint(0, self.model.config.vocab_size, (s.nsamples, s.seqlen), generator=g)
                self.dataset_used, self.samples_used = f"random windows {tuple(ids.shape)}", s.nsamples
                windows = [ids[i:i + s.batch_size] for i in range(0, s.nsamples, s.batch_size)]
                batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
                shapes.extend(list(b["input_ids"].shape) for b in batches)
                return batches

        ar = Calibrated(spec["src"], **spec["options"])
        hidden = ar.model.config.hidden_size
    else:
        class CalibratedMLLM(AutoRoundMLLM):
            def calibration_batches(self):
                batches = super().calibration_batches()
                shapes.extend(list(b["input_ids"].shape) for b in batches)
                return batches

        model, tok, proc = _tiny_llava(spec["text"], spec["side"])
        ar = CalibratedMLLM(model, tok, proc, **spec["options"])
        hidden = spec["text"]["hidden_size"]
    after_load = _status_mb("VmRSS")
    t0 = time.perf_counter()
    ar.quantize(format="auto_round")
    seconds = time.perf_counter() - t0
    peak, hwm = peak_rss_mb(), _status_mb("VmHWM")
    ar.save_quantized(spec["out"], format="auto_round", overwrite=True)
    blocks = ar.summary.get("blocks", [])
    copy_mb = sum(b * t for b, t in shapes) * hidden * 4 / MIB
    return {"seconds": seconds, "peak_rss_mb": peak, "vm_hwm_mb": hwm, "rss_after_load_mb": after_load,
            "cache_copy_mb": copy_mb, "batches": shapes, "tokens_used": ar.tokens_used,
            "blocks": len(blocks), "last_block_best_loss": blocks[-1]["best"] if blocks else None}


JOBS = {"make": job_make, "quantize": job_quantize, "compare": job_compare}


# ------------------------------------------------------------------------------------------ main
def _llm_model(shape: dict, work: Path) -> Path:
    src = WORK / "models" / f"llama-{shape['hidden_size']}x{shape['num_hidden_layers']}-v{shape['vocab_size']}-fp32"
    if not (src / ".complete").is_file():
        shutil.rmtree(src, ignore_errors=True)
        log(f"writing the random model to {src}")
        if "error" in run_child(__file__, {"job": "make", "folder": str(src), "shape": shape}, work, "make-llm"):
            raise SystemExit(1)
    return src


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, nargs="+", default=[0, 5], help="iteration counts measured (0: optimized RTN)")
    p.add_argument("--nsamples", type=int, default=128, help="LLM calibration samples")
    p.add_argument("--seqlen", type=int, default=512, help="LLM calibration tokens per sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vlm-nsamples", type=int, default=43, help="the offline image-text set holds 43 samples")
    p.add_argument("--vlm-side", type=int, default=448, help="image side in pixels: (side/14)^2 image tokens")
    p.add_argument("--vlm-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every configuration")
    p.add_argument("--cases", nargs="+", default=["llm", "vlm"], choices=["llm", "vlm"])
    args = parse_bench_args(p, argv, NAME, "hidden 256, 32x128 LLM samples, 8 VLM samples at 224 px, iters 0 and 2",
                            {"quick_run": True, "nsamples": 32, "seqlen": 128, "vlm_nsamples": 8, "vlm_side": 224,
                             "iters": [0, 2], "repeats": 1})
    quick = getattr(args, "quick_run", False)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        log("note: set OMP_NUM_THREADS=1 for comparable figures (the children inherit it)")
    work = WORK / NAME
    offload_root = work / "offload_dir"  # on the work disk, not a tmpfs: the files must not be RAM themselves
    base = dict(bits=4, group_size=128, seed=42)
    cases: Dict[str, Dict[str, Any]] = {}
    if "llm" in args.cases:
        shape = QUICK_LLM_SHAPE if quick else LLM_SHAPE
        expected = args.nsamples * args.seqlen * shape["hidden_size"] * 4 / MIB
        log(f"llm: one cached copy = {args.nsamples} x {args.seqlen} x {shape['hidden_size']} x 4 B = "
            f"{expected:.0f} MiB (in memory up to 4 copies = {4 * expected:.0f} MiB)")
        cases["llm"] = {"spec": {"kind": "llm", "src": str(_llm_model(shape, work))},
                        "options": dict(base, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size),
                        "label": f"llama h{shape['hidden_size']} x{shape['num_hidden_layers']}, "
                                 f"{args.nsamples}x{args.seqlen} random tokens", "expected_copy_mb": expected}
    if "vlm" in args.cases:
        text = QUICK_VLM_TEXT if quick else VLM_TEXT
        n_img = (args.vlm_side // 14) ** 2
        log(f"vlm: {n_img} image tokens per sample, {args.vlm_nsamples} samples: one cached copy >= "
            f"{args.vlm_nsamples * n_img * text['hidden_size'] * 4 / MIB:.0f} MiB of image tokens alone")
        cases["vlm"] = {"spec": {"kind": "vlm", "text": text, "side": args.vlm_side},
                        "options": dict(base, nsamples=args.vlm_nsamples, seqlen=4096, batch_size=args.vlm_batch_size,
                                        dataset="auto_round:offline_image_text"),
                        "label": f"llava text h{text['hidden_size']} x{text['num_hidden_layers']}, "
                                 f"{args.vlm_nsamples} image-text samples at {args.vlm_side} px ({n_img} image tokens)",
                        "expected_copy_mb": None}
    runs: Dict[str, List[Dict[str, Any]]] = {}
    reference: Dict[str, str] = {}  # (case, iters) -> the first in-memory checkpoint
    for r in range(args.repeats):
        for case, c in cases.items():
            for iters in args.iters:
                modes = ("memory", "offload") if r % 2 == 0 else ("offload", "memory")
                for mode in modes:
                    key = f"{case}-it{iters}-{mode}"
                    name = f"{key}-r{r}"
                    out = work / f"out-{name}"
                    shutil.rmtree(out, ignore_errors=True)
                    options = dict(c["options"], iters=iters)
                    if mode == "offload":
                        options["offload_dir"] = str(offload_root)
                    log(f"{c['label']}: iters={iters} {mode} (round {r + 1}/{args.repeats}) ...")
                    rec = run_child(__file__, {"job": "quantize", **c["spec"], "out": str(out), "options": options},
                                    work, name)
                    if "error" in rec:
                        return 1
                    ref_key = f"{case}-it{iters}"
                    if ref_key not in reference:
                        reference[ref_key] = str(out)
                        rec["identical"] = True if mode == "memory" else None
                    else:
                        cmp = run_child(__file__, {"job": "compare", "a": reference[ref_key], "b": str(out)}, work,
                                        f"{name}-compare")
                        rec["compare"] = cmp
                        rec["identical"] = cmp.get("identical")
                        shutil.rmtree(out, ignore_errors=True)
                    log(f"  {name}: {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MiB, "
                        f"cache copy {rec['cache_copy_mb']:.0f} MiB, identical to the first in-memory run: "
                        f"{rec['identical']}")
                    runs.setdefault(key, []).append(rec)
    for ref in reference.values():
        shutil.rmtree(ref, ignore_errors=True)
    shutil.rmtree(offload_root, ignore_errors=True)
    rows, summary = [], {}
    for case, c in cases.items():
        for iters in args.iters:
            mem, off = runs[f"{case}-it{iters}-memory"], runs[f"{case}-it{iters}-offload"]
            copy_mb = mem[0]["cache_copy_mb"]
            figures = {}
            for mode, recs in (("memory", mem), ("offload", off)):
                figures[mode] = {"peak_rss_mb": min(x["peak_rss_mb"] for x in recs),
                                 "seconds": min(x["seconds"] for x in recs),
                                 "held_mb": min(x["peak_rss_mb"] - x["rss_after_load_mb"] for x in recs),
                                 "identical": all(x["identical"] is not False for x in recs)}
            saved = figures["memory"]["peak_rss_mb"] - figures["offload"]["peak_rss_mb"]
            cost = 100 * (figures["offload"]["seconds"] / figures["memory"]["seconds"] - 1)
            summary[f"{case}-it{iters}"] = {**figures, "cache_copy_mb": copy_mb, "saved_mb": saved,
                                            "saved_cache_copies": saved / copy_mb, "time_cost_pct": cost}
            for mode in ("memory", "offload"):
                f = figures[mode]
                rows.append([c["label"], iters, mode, fmt(copy_mb, ".0f"), fmt(f["peak_rss_mb"], ".0f"),
                             fmt(f["held_mb"], ".0f"), fmt(f["seconds"], ".1f"),
                             f"{saved:.0f} ({saved / copy_mb:.1f} copies)" if mode == "offload" else "-",
                             f"{cost:+.1f}%" if mode == "offload" else "-", f["identical"]])
    table = print_table(["case", "iters", "cache", "one copy MiB", "peak RSS MiB", "held MiB", "quantize s",
                         "saved MiB", "time cost", "identical"], rows,
                        title=f"W4G128, 1 thread, min over {args.repeats} interleaved round(s); 'held' = peak RSS "
                              "minus the RSS after imports and model load; 'identical' = checkpoint tensors and "
                              "configs byte-identical to the in-memory run's")
    write_json(NAME, {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "json"},
                      "cases": {k: {kk: vv for kk, vv in c.items()} for k, c in cases.items()},
                      "summary": summary, "runs": runs, "table": table}, args.json)
    return 0 if all(s["memory"]["identical"] and s["offload"]["identical"] for s in summary.values()) else 1


if __name__ == "__main__":
    main_or_child(main, JOBS)
