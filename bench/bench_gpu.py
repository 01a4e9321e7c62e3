#!/usr/bin/env python3
"""GPU benchmark: our AutoRound on random Llama-shaped 1B / 8B models, vs the reference's published figure.

What it measures, one fresh process per run (``--child``, as the other bench scripts do):

- a random-weight Llama from ``transformers.LlamaConfig`` ("1b": hidden 2048, intermediate 8192, 16 layers,
  32/8 heads; "8b": hidden 4096, intermediate 14336, 32 layers, 32/8 heads; vocab 128256 for both), built
  directly on the device in bf16 (``torch.device`` context: an 8B takes seconds) and then, with
  ``--weights cpu`` (the default, like a checkpoint the reference loads on CPU), moved to host memory so the
  tuning loop moves one block at a time to the GPU; random weights time the same as real ones;
- calibration on random token ids ``[nsamples, seqlen]`` (seeded), handed over exactly as the fixed windows
  of ``bench/_worker.py`` (a subclass whose ``calibration_batches`` returns them, mask all ones);
- the default recipe of ``auto_round.config.Settings`` (W4G128 sym, iters 200, nsamples 128, seqlen 2048,
  batch_size 8), once with ``low_gpu_mem_usage`` off and once on;
- per run: process wall time, AutoRound construction + ``quantize()`` wall time, the tuning phase's time,
  ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (peaks reset after the model is built),
  per-block seconds and best losses;
- ``--blocks N``: only the first N decoder blocks are tuned (the others are cut from ``model.model.layers``
  but stay resident where the model lives, so the memory figure still holds the whole model's weights);
  times are then also reported *scaled* to all blocks (``tuning_s * layers / N``), marked as scaled;
- ``--reference PYTHON``: the reference auto-round (e.g. ``.venv-ref/bin/python``) on the same random model
  and ids in the same kind of child process (``dataset`` = list of ``[1, seqlen]`` tensors,
  ``device_map`` = the device, ``enable_torch_compile=False``); skipped cleanly when that Python is absent.

The table compares with the reference's published figure for an 8B on an A100 (12 min, 18 GB); an H200 has
about 3x an A100's bf16 rate, so the target here is at most 3 min and 18 GB for the 8B.

    python bench/bench_gpu.py --model 1b                        # all 16 blocks, low_gpu_mem_usage off/on
    python bench/bench_gpu.py --model 8b --blocks 8             # 8 of 32 blocks, times scaled x4
    python bench/bench_gpu.py --quick --device cpu --json /tmp/gpu_quick.json   # tiny, runs anywhere

``--quick``: hidden 256, 2 layers, iters 8, 4 samples of 64 tokens (writes ``bench/results/gpu_quick.json``
unless ``--json`` says otherwise). Results: ``bench/results/gpu.json`` (``gpu_<model>.json`` when not the 8B).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (stdlib only at import: the reference's Python imports this file too)

SHAPES: Dict[str, Dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "quick": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024},
}
# The reference's published figure (8B, A100) and the target on an H200 (~3x an A100's bf16 rate).
PUBLISHED = {"model": "8b", "device": "A100", "minutes": 12.0, "gb": 18.0}
TARGET = {"model": "8b", "device": "H200", "minutes": 3.0, "gb": 18.0}


# ------------------------------------------------------------------------------------------ child side
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _build(spec: Dict[str, Any]):
    """The random bf16 Llama of ``spec`` (built on ``spec['device']``, moved to ``spec['weights']``), the
    random ids, the tuned model's layer count and the held-back (untuned) layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device, shape = spec["device"], SHAPES[spec["model"]]
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, spec["seqlen"]), tie_word_embeddings=False)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), torch.no_grad():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    if spec["weights"] == "cpu" and device != "cpu":
        model = model.to("cpu")
    _sync(device)
    build_s = time.perf_counter() - t0
    layers = model.model.layers
    n_all = len(layers)
    n = min(spec.get("blocks") or n_all, n_all)
    held = None
    if n < n_all:
        held = list(layers[n:])  # kept alive (and resident) so the memory figures hold the whole model
        model.model.layers = layers[:n]
        model.config.num_hidden_layers = n
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, shape["vocab_size"], (spec["nsamples"], spec["seqlen"]), generator=gen)
    return model, ids, n, n_all, held, build_s


def _gpu_peaks(device: str) -> Dict[str, Any]:
    import torch

    if not device.startswith("cuda"):
        return {"max_memory_allocated_gb": None, "max_memory_reserved_gb": None}
    return {"max_memory_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
            "max_memory_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3)}


def _reset_peaks(device: str) -> Optional[float]:
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.memory_allocated() / 1e9, 3)


def _common_record(spec, n, n_all, build_s, resident_gb) -> Dict[str, Any]:
    import torch

    return {"spec": spec, "blocks_tuned": n, "blocks_total": n_all, "build_s": round(build_s, 2),
            "resident_before_gb": resident_gb, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if spec["device"].startswith("cuda") else None}


def job_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from auto_round import AutoRound

    if spec["device"] == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, ids, n, n_all, held, build_s = _build(spec)
    resident = _reset_peaks(spec["device"])

    class RandomIds(AutoRound):
        def calibration_batches(self):
            self.dataset_used = f"random token ids {tuple(ids.shape)}"
            dev = next(self.model.parameters()).device
            bs = self.settings.batch_size
            return [{"input_ids": ids[i:i + bs].to(dev), "attention_mask": torch.ones_like(ids[i:i + bs]).to(dev)}
                    for i in range(0, ids.shape[0], bs)]

    t0 = time.perf_counter()
    ar = RandomIds(model, None, device=spec["device"], low_gpu_mem_usage=spec["low_gpu_mem_usage"],
                   **spec["recipe"])
    ar.quantize()
    _sync(spec["device"])
    wall = time.perf_counter() - t0
    rec = _common_record(spec, n, n_all, build_s, resident)
    blocks = ar.summary.get("blocks", [])
    rec.update({
        "runner": "ours", "quantize_wall_s": round(wall, 2),
        "tuning_s": round(ar.phase_seconds.get("tuning", wall), 2),
        "phase_seconds": {k: round(v, 3) for k, v in ar.phase_seconds.items()},
        "block_seconds": [b["seconds"] for b in blocks],
        "block_losses": [b["best"] for b in blocks],
        "block_first_losses": [b["first"] for b in blocks],
        "quantized_layers": len(ar.quantized_layers), "peak_rss_mb": ar.summary.get("peak_rss_mb"),
        **_gpu_peaks(spec["device"]),
    })
    del held
    return rec


def job_reference(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs under the reference's Python (its package is also called ``auto_round``)."""
    import logging

    import torch

    import auto_round
    from auto_round import AutoRound
    from reference_runner import _LossCapture

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a tokenizer object only (the reference wants one): the calibration data are given as ids
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")

    if spec["device"] == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    capture = _LossCapture()
    logging.getLogger("autoround").addHandler(capture)
    model, ids, n, n_all, held, build_s = _build(spec)
    resident = _reset_peaks(spec["device"])
    r = spec["recipe"]
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer, bits=r["bits"], group_size=r["group_size"], sym=r["sym"],
                   iters=r["iters"], nsamples=r["nsamples"], seqlen=r["seqlen"], batch_size=r["batch_size"],
                   dataset=[ids[i:i + 1] for i in range(ids.shape[0])], seed=spec["seed"],
                   device_map=spec["device"], low_gpu_mem_usage=spec["low_gpu_mem_usage"],
                   enable_torch_compile=False)
    ar.quantize()
    _sync(spec["device"])
    wall = time.perf_counter() - t0
    rec = _common_record(spec, n, n_all, build_s, resident)
    rec.update({"runner": "reference", "reference_version": auto_round.__version__,
                "quantize_wall_s": round(wall, 2), "tuning_s": round(wall, 2),
                "block_seconds": [], "block_losses": [b["best_loss"] for b in capture.blocks],
                "block_first_losses": [b["loss_iter0"] for b in capture.blocks],
                "reference_warnings": capture.warnings[:20], **_gpu_peaks(spec["device"])})
    del held
    return rec


JOBS = {"ours": job_ours, "reference": job_reference}


# ------------------------------------------------------------------------------------------ parent side
def default_recipe() -> Dict[str, Any]:
    from dataclasses import fields

    from auto_round.config import Settings

    d = {f.name: f.default for f in fields(Settings)}
    return {k: d[k] for k in ("bits", "group_size", "sym", "iters", "nsamples", "seqlen", "batch_size")}


def run_reference_child(python: str, spec: Dict[str, Any], work: Path, name: str) -> Dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    rec = C._timed_job([python, str(Path(__file__).resolve()), "--child", str(spec_path), str(out_path)],
                       out_path, log_path, None, failed="reference")
    if "error" in rec:
        C.log(f"  {name}: reference FAILED (rc={rec['rc']}); see {log_path}")
        print(rec.get("log_tail", ""), file=sys.stderr)
    return rec


def _scaled(rec: Dict[str, Any], key: str) -> Optional[float]:
    v = rec.get(key)
    if v is None or not rec.get("blocks_tuned"):
        return None
    return v * rec["blocks_total"] / rec["blocks_tuned"]


def _report(args, recipe: Dict[str, Any], runs: List[Dict[str, Any]], ref_note: Optional[str],
            final: bool) -> None:
    """Print the table (when ``final``) and write the JSON (after every run: a killed session keeps the
    finished runs, ``complete`` false)."""
    scaled = bool(args.blocks) and any(r.get("blocks_tuned", 0) < r.get("blocks_total", 0) for r in runs)
    rows = []
    for r in runs:
        spec = r.get("spec", {})
        low = spec.get("low_gpu_mem_usage")
        if "error" in r:
            rows.append([r["runner"], {True: "on", False: "off"}.get(low, "-"), "FAILED", "-", "-", "-", "-", "-", "-", "-", r["error"][:60]])
            continue
        bs = r.get("block_seconds") or []
        losses = r.get("block_losses") or []
        rows.append([
            r["runner"], {True: "on", False: "off"}.get(low, "-"),
            f"{r['blocks_tuned']}/{r['blocks_total']}", C.fmt(r.get("process_wall_s"), ".1f"),
            C.fmt(r.get("tuning_s"), ".1f"),
            C.fmt(_scaled(r, "tuning_s") / 60 if _scaled(r, "tuning_s") is not None else None, ".2f")
            + (" (scaled)" if r["blocks_tuned"] < r["blocks_total"] else ""),
            C.fmt(sum(bs) / len(bs) if bs else None, ".2f"),
            C.fmt(r.get("max_memory_allocated_gb"), ".2f"), C.fmt(r.get("max_memory_reserved_gb"), ".2f"),
            C.fmt(losses[-1] if losses else None, ".4g"), "",
        ])
    headers = ["runner", "low_gpu_mem", "blocks", "process s", "tuning s", "all-block tuning min",
               "s/block", "max alloc GB", "max reserved GB", "last block loss", "note"]
    rows.append([f"reference published ({PUBLISHED['device']})", "-", "32/32 (8b)", "-", "-",
                 f"{PUBLISHED['minutes']:.0f}", "-", f"{PUBLISHED['gb']:.0f}", "-", "-", "their README"])
    rows.append([f"target ({TARGET['device']}, ~3x A100 bf16)", "-", "32/32 (8b)", "-", "-",
                 f"<= {TARGET['minutes']:.0f}", "-", f"<= {TARGET['gb']:.0f}", "-", "-",
                 "8b only" if args.model == "8b" else f"not comparable: this is {args.model}"])
    title = (f"AutoRound on a random Llama {args.model} ({args.device}, weights on {args.weights}; "
             f"iters {recipe['iters']}, nsamples {recipe['nsamples']}, seqlen {recipe['seqlen']}, "
             f"bs {recipe['batch_size']})" + ("; all-block minutes are SCALED from the tuned blocks "
                                              "(tuning_s x total/tuned)" if scaled else ""))
    if not final:
        C.write_json("gpu", {"complete": False, "model": args.model, "recipe": recipe, "runs": runs},
                     args.json)
        return
    table = C.print_table(headers, rows, title)
    verdict = None
    if args.model == "8b":
        ok = [r for r in runs if r.get("runner") == "ours" and "error" not in r]
        verdict = [{"low_gpu_mem_usage": r["spec"]["low_gpu_mem_usage"],
                    "minutes_all_blocks": round(_scaled(r, "tuning_s") / 60, 2),
                    "minutes_scaled": r["blocks_tuned"] < r["blocks_total"],
                    "max_memory_allocated_gb": r.get("max_memory_allocated_gb"),
                    "within_time_target": _scaled(r, "tuning_s") / 60 <= TARGET["minutes"],
                    "within_memory_target": (r.get("max_memory_allocated_gb") or 0) <= TARGET["gb"]} for r in ok]
        for v in verdict:
            C.log(f"8b vs target: {v}")
    C.write_json("gpu", {"complete": True, "machine": C.machine_info(), "model": args.model, "shape": SHAPES[args.model],
                         "recipe": recipe, "device": args.device, "weights": args.weights, "blocks": args.blocks,
                         "times_scaled": scaled, "published_reference": PUBLISHED, "target": TARGET,
                         "reference_note": ref_note, "runs": runs, "verdict_8b": verdict, "table": table},
                 args.json)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("1b", "8b"), default="8b")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu only makes sense with --quick)")
    p.add_argument("--weights", choices=("cpu", "device"), default="cpu",
                   help="where the model's weights live while tuning (cpu: blocks go to the device one at a time)")
    p.add_argument("--blocks", type=int, default=None, help="tune only the first N blocks; times also scaled")
    p.add_argument("--low-gpu", choices=("both", "off", "on"), default="both", help="low_gpu_mem_usage runs")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reference", default=None, help="the reference auto-round's Python (optional column)")
    p.add_argument("--work", type=Path, default=C.WORK / "gpu")
    args = C.parse_bench_args(p, None, "gpu", "hidden 256, 2 layers, iters 8, 4 samples of 64 tokens",
                              {"model": "quick", "iters": 8, "nsamples": 4, "seqlen": 64, "batch_size": 4})
    if args.json is None:
        args.json = C.RESULTS / ("gpu.json" if args.model == "8b" else f"gpu_{args.model}.json")

    recipe = default_recipe()
    for key in ("iters", "nsamples", "seqlen", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    recipe["batch_size"] = min(recipe["batch_size"], recipe["nsamples"])
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.low_gpu]
    base = {"model": args.model, "device": args.device, "weights": args.weights, "blocks": args.blocks,
            "seed": args.seed, "nsamples": recipe["nsamples"], "seqlen": recipe["seqlen"], "recipe": recipe}
    C.log(f"model {args.model} {SHAPES[args.model]}; recipe {recipe}; device {args.device}, weights on "
          f"{args.weights}, blocks {args.blocks or 'all'}")

    ref_python = args.reference
    ref_note = None
    if ref_python and not Path(ref_python).exists():
        ref_note = f"reference skipped: {ref_python} does not exist"
        ref_python = None
    elif not ref_python:
        ref_note = "reference not run (no --reference)"
    if ref_note:
        C.log(ref_note)

    runs: List[Dict[str, Any]] = []
    for low in modes:
        tag = f"{args.model}_{'lowmem' if low else 'default'}"
        spec = {**base, "job": "ours", "low_gpu_mem_usage": low}
        C.log(f"ours, low_gpu_mem_usage={low} ...")
        rec = C.run_child(__file__, spec, args.work, f"ours_{tag}")
        rec.setdefault("runner", "ours")
        rec.setdefault("spec", spec)
        runs.append(rec)
        _report(args, recipe, runs, ref_note, final=False)
        if ref_python:
            C.log(f"reference, low_gpu_mem_usage={low} ...")
            rrec = run_reference_child(ref_python, {**spec, "job": "reference"}, args.work, f"ref_{tag}")
            rrec.setdefault("runner", "reference")
            rrec.setdefault("spec", {**spec, "job": "reference"})
            runs.append(rrec)
            _report(args, recipe, runs, ref_note, final=False)

    _report(args, recipe, runs, ref_note, final=True)
    return 1 if any("error" in r and r.get("runner") == "ours" for r in runs) else 0


if __name__ == "__main__":
    C.main_or_child(main, JOBS)
