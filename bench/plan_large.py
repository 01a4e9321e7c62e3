"""A plan on paper for 72B and 405B: what each mode needs (RAM, GPU memory, disk, time), and the command.

Nothing is downloaded and no weight is allocated: each model is built from its config on the meta device
(``with torch.device("meta"): LlamaForCausalLM(cfg)``), planned with the facade's own
``AutoRound(model, ...).resolve_plan(read_weights=False)`` (as model-free mode plans on a skeleton), and
its work and the estimator's figures come from :func:`auto_round.estimate.estimate_run` (what ``--dry-run``
prints). Models: Qwen2-72B, Llama-3.1-405B and Llama-3.1-8B (a sanity row whose figures the reference's
published A100 numbers can be held against).

Where each figure comes from (every constant is printed and written to the JSON with its source):

- **GPU memory of each mode**: :func:`auto_round.estimate.estimate_run` for the mode's settings on a CUDA
  device (bf16 autocast): the tuned unit's float32 weights, V, clip params, their gradients and best state,
  the qdq's buffers and the activations of one micro-batch (per weight and per token, calibrated against a
  measured run in ``tests/test_estimate.py``), with the block cache the loop holds
  (:func:`auto_round.estimate.loop_cache_copies`: 2 float32 copies while a unit tunes, 3 while its outputs
  are computed), at the larger of the two moments; checked against ``bench/results/offload_quick.json``
  (cache copies that ``offload_dir`` saved);
- **the estimator against a measured block** (``--measure``, the default): one Llama block tuned 2
  iterations on CPU in a fresh process (glibc mmap threshold fixed, as tensors of these sizes are mapped),
  its peak RSS over its RSS before, at 64 and 1024 tokens, beside ``estimate_run`` for the same run;
- **in-memory RAM per block, streamed RAM flat in depth**: ``bench/results/streaming_trim.json``;
- **model-free RTN speed and memory**: ``bench/results/model_free.json``;
- **time**: the tuning's matmul work (``estimate_run().tflops``) over an *assumed* GPU throughput: the
  H100/H200 dense bf16 peak times an assumed matmul efficiency, divided by the step-over-matmul ratio
  measured on this CPU (``bench/results/step.json``); plus data movement at assumed bandwidths. Cross-check:
  the reference implementation's published A100 times (12 min for Llama-3.1-8B, 120 min for Llama-3.1-70B
  W4G128 default, torch 2.6 + compile: intel/auto-round docs/step_by_step.md, "Quantization Costs"),
  scaled by FLOPs from its 8B figure. No GPU figure was measured in this project.

    .venv/bin/python bench/plan_large.py               # about 1 min (the block measurement)
    .venv/bin/python bench/plan_large.py --no-measure  # the recorded per-weight figures, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, machine_info, print_table, write_json  # noqa: E402

GIB = 2**30
MIB = 2**20

# ------------------------------------------------------------------------------------------ the models
MODELS = {
    "Qwen2-72B": dict(cls="qwen2", hub="Qwen/Qwen2-72B-Instruct", hidden_size=8192, intermediate_size=29568,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                      max_position_embeddings=32768),
    "Llama-3.1-405B": dict(cls="llama", hub="meta-llama/Llama-3.1-405B-Instruct", hidden_size=16384,
                           intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072),
    "Llama-3.1-8B": dict(cls="llama", hub="meta-llama/Llama-3.1-8B-Instruct", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072),
}
# Only for the cross-check of the FLOP scaling against the reference's published 70B time (not a row).
LLAMA_70B = dict(cls="llama", hub="meta-llama/Llama-3.1-70B-Instruct", hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=131072)
QUANT = dict(bits=4, group_size=128)
RECIPES = {"default": {}, "light": {"recipe": "light"}}  # W4G128, iters 200 / 50, 128 x 2048, batch 8
WORLD = 8  # torchrun --nproc-per-node 8

# ------------------------------------------------------------------------------------------ assumptions
# Every figure below that was not measured in this project. Printed, and written to the JSON.
ASSUMED = {
    "GPU_PEAK_BF16_TFLOPS": (989.0, "H100 SXM dense bf16 peak (no sparsity); H200 has the same compute"),
    "GPU_MATMUL_EFFICIENCY": (0.5, "share of that peak the tuning's matmuls reach (not measured here)"),
    "H100_GPU_GIB": (79.6, "H100 SXM 80 GB as nvidia-smi reports it (81559 MiB)"),
    "H200_GPU_GIB": (140.4, "H200 141 GB as nvidia-smi reports it (143771 MiB)"),
    "CUDA_CONTEXT_GIB": (0.6, "CUDA context + cuBLAS workspace per process"),
    "PCIE_H2D_GBPS": (12.0, "host<->GPU copies of the (pageable, not pinned) CPU cache, GB/s"),
    "NVLINK_ALLREDUCE_BUSBW_GBPS": (350.0, "NCCL all-reduce bus bandwidth on 8 NVLink GPUs, GB/s "
                                           "(nccl-tests on 8x H100 SXM report ~400-480)"),
    "DISK_READ_GBPS": (2.0, "NVMe read, GB/s (checkpoint in, offload_dir files back)"),
    "DISK_WRITE_GBPS": (1.5, "NVMe write, GB/s (checkpoint out, offload_dir files)"),
    "HOST_CORES": (32, "CPU cores of the GPU server, used by model-free RTN and the in-memory capture "
                       "(this CPU's measured per-core figures scaled linearly)"),
    "REF_A100_8B_MIN": (12.0, "reference, Llama-3.1-8B W4G128 default, A100 80G, torch 2.6 + compile "
                              "(intel/auto-round docs/step_by_step.md, Quantization Costs)"),
    "REF_A100_8B_GPU_GB": (18.0, "same table: its GPU memory (10 GB with low_gpu_mem_usage)"),
    "REF_A100_70B_MIN": (120.0, "same table, Llama-3.1-70B: 120 min, 42 GB (140 min, 25 GB low_gpu_mem_usage)"),
    "A100_PEAK_BF16_TFLOPS": (312.0, "A100 dense bf16 peak, to put the reference's times on an H100 scale"),
}
# Counted from the code (src/), not measured: named so that a change of the code shows here.
FROM_CODE = {
    "LOOP_CACHE_COPIES": (None, "estimate.loop_cache_copies (tuning/loop.py _tune_unit): at the peak, q_in, targets "
                                "and q_out while q_out is computed (the FP chain's inputs are released once the "
                                "targets exist); float32 (store.put(out.float())); only the first unit's inputs are "
                                "the captured bf16 hidden states; filled in by main()"),
    "LOOP_CACHE_COPIES_TUNING": (None, "estimate.loop_cache_copies: q_in and targets while a unit tunes"),
    "STREAMED_BLOCK_BYTES_PER_WEIGHT": (3.52, "streamed unit on CPU: bf16 weights read (2) + uint8 codes of "
                                              "its records (1) + packed int4 + scales/zeros (0.52)"),
    "COPY_CHUNK_MIB": (64, "model_free/core.py COPY_CHUNK_BYTES: kept tensors copied in 64 MiB row chunks"),
    "PACKED_BYTES_PER_WEIGHT": (None, "bits/8 + (fp16 scale + bits-wide zero) per group: the auto_round "
                                      "format's qweight/scales/qzeros"),
}
# The recorded block measurement (this CPU, 2 threads, Llama block h1024/i3584, float32: this CPU has no native
# bf16, so amp does not autocast), used with --no-measure.
RECORDED_BLOCK = {"tuning_bytes_per_weight_cpu": 27.62, "activation_bytes_per_token_hidden": 123.6,
                  "estimated_over_measured": {"64": 1.067, "1024": 0.997},
                  "source": "plan_large.py --measure, 2026-12, this 2-core CPU, MALLOC_MMAP_THRESHOLD_=131072"}
STREAMING_WIDTH = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
                       vocab_size=32000)  # bench/bench_streaming.py WIDTH
MODEL_FREE_SHAPE_KEY = "shape"  # model_free.json: the shape of the model it quantized


NOTES = [
    "torchrun: batch_size stays the samples per step; each of the 8 processes runs batch_size / 8 of them (1 at the "
    "default 8) and the gradients are summed (tuning/parallel.py). low_cpu_mem_usage is refused under torchrun "
    "(autoround.py _check_parallel): every process holds the whole model in RAM.",
    "in-memory: the capture runs the first calibration batch through every block but the last on the CPU the "
    "model lives on (calib/cache.py, pass-throughs from the second batch); streamed runs stand in on the meta device.",
    "offload_dir: a DiskTensor's file is deleted when the loop drops the copy it belongs to (calib/store.py), so "
    "the files on disk are the cached copies in use at the loop's peak (3 float32 copies while tuning).",
    "not counted: attention's seqlen^2 FLOPs (~8% at 8B, ~2% at 405B), the clip-search initialisation, "
    "torch.compile, attention masks held in the cache; GPU time at batch 1 (torchrun) is taken at the same "
    "efficiency as batch 8.",
]


def a(name: str) -> float:
    return ASSUMED[name][0]


# ------------------------------------------------------------------------------------------ measured inputs
def _load(name: str) -> Dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _fit_slope(xs: List[float], ys: List[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _block_params(hidden: int, inter: int, heads: int, kv: int) -> int:
    kv_dim = hidden // heads * kv
    return hidden * (2 * hidden + 2 * kv_dim) + 3 * hidden * inter


def measured_inputs() -> Dict[str, Any]:
    """The figures read from bench/results (which file, which field), and what is derived from them."""
    step = _load("step.json")["models"]["mid"]
    mf = _load("model_free.json")
    st = _load("streaming_trim.json")
    # a local result of bench_offload.py --quick (not committed): the cross-check is left out without it
    off = _load("offload_quick.json")["summary"]["llm-it2"] if (RESULTS / "offload_quick.json").exists() else \
        {"saved_cache_copies": None}
    vs = _load("vs_reference.json")["models"]["smollm2"]["summary"]
    w = STREAMING_WIDTH
    block_mib = (_block_params(w["hidden_size"], w["intermediate_size"], w["num_attention_heads"],
                               w["num_key_value_heads"]) + 2 * w["hidden_size"]) * 2 / MIB
    runs = st["runs"]
    depth = [int(k.split("x")[-1]) for k in runs]
    held = lambda mode: [runs[k][mode]["peak_rss_mb"] - runs[k][mode]["rss_after_imports_mb"] for k in runs]
    slope_mem, slope_str = _fit_slope(depth, held("in_memory")), _fit_slope(depth, held("streamed"))
    mfr = mf["runs"]["model_free"]
    return {
        "step.json": {"model": "mid (hidden 1024, intermediate 2816)", "step_over_matmuls": step["step_over_matmuls"],
                      "step_gflops_per_s": step["step_gflops_per_s"],
                      "matmul_gflops_per_s": step["matmul_gflops_per_s"], "threads": 2},
        "model_free.json": {"input_gb": mf["model"]["input_gb"], "output_gb": mf["model"]["output_gb"],
                            "shape": mf["model"][MODEL_FREE_SHAPE_KEY], "cpu_s": mfr["cpu_s"],
                            "gb_per_cpu_s": mf["model"]["input_gb"] / mfr["cpu_s"],
                            "held_mib": mfr["peak_rss_mb"] - mfr["rss_after_imports_mb"]},
        "streaming_trim.json": {"depths": depth, "in_memory_held_mib": held("in_memory"),
                                "streamed_held_mib": held("streamed"), "block_bf16_mib": block_mib,
                                "in_memory_mib_per_block": slope_mem, "streamed_mib_per_block": slope_str,
                                "in_memory_ram_per_model_byte": slope_mem / block_mib,
                                "streamed_fixed_mib": max(held("streamed")),
                                "rss_after_imports_mib": max(runs[k]["streamed"]["rss_after_imports_mb"]
                                                             for k in runs)},
        "offload_quick.json": {"llm-it2 saved_cache_copies": off["saved_cache_copies"]},
        "vs_reference.json": {"smollm2 speedup_ref_over_ours (CPU)": vs["speedup_ref_over_ours"]},
    }


_BLOCK_PROBE = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from auto_round.config import build_settings
from auto_round.tuning.plan import resolve_plan
from auto_round.tuning.loop import quantize_model
from auto_round.estimate import estimate_run
torch.set_num_threads(2)
tokens = int(sys.argv[1])
cfg = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=256, max_position_embeddings=4096)
m = LlamaForCausalLM(cfg).eval()  # float32: the block is already in the tuning dtype, no copy is made
s = build_settings(bits=4, group_size=128, iters=2, nsamples=1, seqlen=tokens, batch_size=1, device="cpu")
plan = resolve_plan(m, s, ["model.layers"])
params = sum(lp.out_features * lp.in_features for lp in plan.in_block("model.layers.0"))
ids = torch.randint(0, 256, (1, tokens))
est = estimate_run(m, plan, s, 0, device=torch.device("cpu"))
estimated = int((est.host_mib - est.model_mib) * 2**20)  # records + block cache + tuning: what the run adds
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS:")
quantize_model(m, plan, s, lambda: [{"input_ids": ids}], torch.device("cpu"), progress=False)
print(params, status("VmHWM:") - before, estimated)
"""


def measure_block() -> Dict[str, Any]:
    """Tune one Llama block (hidden 1024, intermediate 3584: the 8B's ratio) 2 iterations on CPU, in a fresh
    process per token count (through /bin/sh, so it starts with its own peak RSS; glibc's mmap threshold fixed
    at 128 KiB, as every tensor of a 72B block is mapped, so freed activations leave the RSS): bytes per weight
    at 64 tokens, bytes per token x hidden from the slope to 1024 tokens (the 3 cache copies, 12 B, included),
    and ``estimate_run``'s records + block cache + tuning for the same run (float32: no native bf16 here)."""
    out = {}
    for tokens in (64, 1024):
        cmd = f"MALLOC_MMAP_THRESHOLD_=131072 {sys.executable} - {tokens}; exit $?"
        r = subprocess.run(["/bin/sh", "-c", cmd], input=_BLOCK_PROBE, capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"block probe failed: {r.stderr[-2000:]}")
        out[tokens] = tuple(map(int, r.stdout.split()[-3:]))
    (p, d64, _), (_, d1k, _) = out[64], out[1024]
    return {"tuning_bytes_per_weight_cpu": round(d64 / p, 2),
            "activation_bytes_per_token_hidden": round((d1k - d64) / (1024 - 64) / 1024, 1),
            "estimated_over_measured": {str(k): round(v[2] / v[1], 3) for k, v in out.items()},
            "raw": {str(k): {"params": v[0], "peak_delta_bytes": v[1], "estimated_bytes": v[2]}
                    for k, v in out.items()},
            "source": "measured now (plan_large.py --measure): Llama block h1024/i3584, 2 iters, float32, CPU, "
                      "MALLOC_MMAP_THRESHOLD_=131072"}


# ------------------------------------------------------------------------------------------ per-model figures
def build_meta(spec: Dict[str, Any]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if spec["cls"] == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(**{k: v for k, v in spec.items() if k not in ("cls", "hub")}, tie_word_embeddings=False,
                  torch_dtype="bfloat16")
    with torch.device("meta"):
        return model_cls(cfg).to(torch.bfloat16)


def packed_bytes_per_weight(bits: int, group: int) -> float:
    return bits / 8 + (2 + bits / 8) / group


# What each mode changes in the default recipe's settings, for the estimator's GPU figure (the dp8 process:
# its share of the samples and of each step's batch).
MODE_SETTINGS = {
    "inmem_gpu": {}, "inmem_cpu": {"low_gpu_mem_usage": True}, "stream_gpu": {"low_cpu_mem_usage": True},
    "stream_cpu": {"low_cpu_mem_usage": True, "low_gpu_mem_usage": True},
    "stream_cpu_ga": {"low_cpu_mem_usage": True, "low_gpu_mem_usage": True, "batch_size": 1,
                      "gradient_accumulate_steps": 8},
    "stream_disk": {"low_cpu_mem_usage": True, "offload_dir": "/nvme/ar_cache"},
    "dp8": {"per_process": True},
}


def mode_estimates(model, plan, settings) -> Dict[str, Dict[str, float]]:
    """``estimate_run`` on a CUDA device (on paper) for each mode's settings: bytes of the GPU peak and its parts."""
    from dataclasses import replace

    import torch

    from auto_round.estimate import estimate_run

    out = {}
    for key, over in MODE_SETTINGS.items():
        over = dict(over)
        if over.pop("per_process", False):
            over.update(batch_size=settings.batch_size // WORLD, nsamples=settings.nsamples // WORLD)
        est = estimate_run(model, plan, replace(settings, **over), 0, device=torch.device("cuda"))
        out[key] = {k: getattr(est, k) * MIB for k in ("device_mib", "tuning_mib", "cache_tuning_mib", "cache_mib")}
        out[key]["cache_where"] = est.cache_where
    return out


def plan_model(name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """The plan and the estimator's figures for each recipe, plus the sizes the modes need."""
    import torch

    from auto_round.autoround import AutoRound
    from auto_round.estimate import estimate_run, tuned_unit_params

    model = build_meta(spec)
    per_recipe = {}
    for rname, extra in RECIPES.items():
        ar = AutoRound(model, None, device="cpu", **QUANT, **extra)
        plan = ar.resolve_plan(["auto_round"], read_weights=False)
        est = estimate_run(model, plan, ar.settings, ar.estimated_checkpoint_bytes(), device=torch.device("cuda"))
        s = ar.settings
        per_recipe[rname] = {"iters": s.iters, "lr": s.resolved_lr, "nsamples": s.nsamples, "seqlen": s.seqlen,
                             "batch_size": s.batch_size, "amp": s.amp,
                             "estimate": {"model_mib": est.model_mib, "records_mib": est.records_mib,
                                          "checkpoint_mib": est.checkpoint_mib, "cache_mib": est.cache_mib,
                                          "cache_tuning_mib": est.cache_tuning_mib, "tuning_mib": est.tuning_mib,
                                          "host_mib": est.host_mib, "device_mib": est.device_mib,
                                          "tflops": est.tflops}}
        if rname == "default":
            modes = mode_estimates(model, plan, s)
    units = tuned_unit_params(model, plan)
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(lp.out_features * lp.in_features for lp in plan.quantized)
    largest_linear = max(lp.out_features * lp.in_features for lp in plan.quantized)
    h = spec["hidden_size"]
    return {"hub": spec["hub"], "shape": {k: v for k, v in spec.items() if k not in ("cls", "hub")},
            "params": total, "quantized_params": quantized, "kept_fp": [lp.name for lp in plan.kept_fp],
            "blocks": len(units), "block_params": max(units), "largest_linear": largest_linear,
            "input_bytes": total * 2, "embed_bytes": spec["vocab_size"] * h * 2,
            "output_bytes": quantized * packed_bytes_per_weight(QUANT["bits"], QUANT["group_size"])
            + (total - quantized) * 2,
            "plan": plan.summary_lines(), "recipes": per_recipe, "mode_estimates": modes}


# ------------------------------------------------------------------------------------------ the modes
MODES = [  # key, label, flags
    ("inmem_gpu", "(a) in-memory, cache on GPU", ""),
    ("inmem_cpu", "(c) in-memory, cache on CPU", " --low_gpu_mem_usage"),
    ("stream_gpu", "(b) streamed, cache on GPU", " --low_cpu_mem_usage"),
    ("stream_cpu", "(b+c) streamed, cache on CPU", " --low_cpu_mem_usage --low_gpu_mem_usage"),
    ("stream_cpu_ga", "(b+c) streamed, cache CPU, bs1 x ga8", " --low_cpu_mem_usage --low_gpu_mem_usage "
                                                              "--batch_size 1 --gradient_accumulate_steps 8"),
    ("stream_disk", "(d) streamed, cache in offload_dir", " --low_cpu_mem_usage --offload_dir /nvme/ar_cache"),
    ("dp8", "(e) torchrun x8, in-memory, bs 1/process", ""),
    ("rtn", "(f) model-free RTN (no data)", ""),
]


def mode_figures(m: Dict[str, Any], key: str, meas: Dict[str, Any], gpu_flops: float) -> Dict[str, Any]:
    """RAM, GPU memory, disk and time of one mode, with the time's parts."""
    st, mf = meas["streaming_trim.json"], meas["model_free.json"]
    r = m["recipes"]["default"]
    h, tokens = m["shape"]["hidden_size"], r["nsamples"] * r["seqlen"]
    step_tokens = r["batch_size"] * r["seqlen"]
    copy = tokens * h * 4  # one float32 copy of the cached activations
    base = (st["rss_after_imports_mib"] + st["streamed_fixed_mib"]) * MIB  # process + its measured fixed part
    chunk = FROM_CODE["COPY_CHUNK_MIB"][0] * MIB
    copies = FROM_CODE["LOOP_CACHE_COPIES"][0]
    world = WORLD if key == "dp8" else 1
    cache_on = "disk" if key == "stream_disk" else ("cpu" if key.endswith(("_cpu", "_cpu_ga")) else "gpu")
    micro = step_tokens // (8 if key == "stream_cpu_ga" else 1) // (world if key == "dp8" else 1)
    out = {"cache_on": cache_on}
    bw = lambda n: n / 1e9  # bytes -> GB for bandwidths in GB/s
    read_s, write_s = bw(m["input_bytes"]) / a("DISK_READ_GBPS"), bw(m["output_bytes"]) / a("DISK_WRITE_GBPS")
    if key == "rtn":
        out["ram"] = st["rss_after_imports_mib"] * MIB + mf["held_mib"] * MIB + m["largest_linear"] * (
            1 + packed_bytes_per_weight(QUANT["bits"], QUANT["group_size"])) + chunk
        out["gpu"] = 0.0
        out["disk"] = m["input_bytes"] + m["output_bytes"]
        cpu_s = bw(m["input_bytes"]) / (mf["gb_per_cpu_s"] * a("HOST_CORES"))
        out["parts_s"] = {"quantize (CPU, measured GB per CPU-s x HOST_CORES)": cpu_s,
                          "disk (read in + write out)": read_s + write_s}
        out["time_s"] = {"default": max(cpu_s, read_s + write_s)}
        return out
    # -- RAM
    cache_ram = copies * copy / world if cache_on == "cpu" else 0.0
    capture_ram = tokens * h * 2 / world if cache_on in ("cpu", "disk") else 0.0  # captured bf16 hidden states
    if key.startswith("stream"):
        unit = m["block_params"] * FROM_CODE["STREAMED_BLOCK_BYTES_PER_WEIGHT"][0]
        batch_io = 2 * step_tokens * h * 4 if cache_on == "disk" else 0.0
        out["ram"] = base + chunk + max(m["embed_bytes"] + capture_ram, unit + cache_ram + batch_io)
    else:  # the whole model in RAM, at the per-byte factor measured per block (records and export included)
        per_proc = st["rss_after_imports_mib"] * MIB + m["input_bytes"] * st["in_memory_ram_per_model_byte"] \
            + max(capture_ram, cache_ram)
        out["ram"] = per_proc * world
        out["ram_per_process"] = per_proc
    # -- GPU (per process): the estimator for this mode's settings (mode_estimates)
    e = m["mode_estimates"][key]
    on_gpu = e["cache_where"] == "device"
    out["gpu"] = a("CUDA_CONTEXT_GIB") * GIB + e["device_mib"]
    out["gpu_parts"] = {"tuning (fp32 unit, V, clip params, grads, best state, qdq, activations of one micro-batch)":
                        e["tuning_mib"],
                        "cache on GPU while a unit tunes": e["cache_tuning_mib"] if on_gpu else 2 * micro * h * 4,
                        "cache on GPU while a unit's outputs are computed": e["cache_mib"] if on_gpu else
                        2 * micro * h * 4, "peak (the larger moment) + CUDA context": out["gpu"]}
    # -- disk
    offload = 0.0
    if cache_on == "disk":  # the copies in use; each file is deleted when its copy is dropped (calib/store.py)
        offload = copies * copy
    out["disk"] = m["input_bytes"] + m["output_bytes"] + offload
    out["offload_disk"] = offload
    # -- time, per recipe
    out["time_s"], out["parts_s"] = {}, {}
    for rname, rr in m["recipes"].items():
        iters = rr["iters"]
        parts = {"tuning matmuls / assumed GPU throughput": rr["estimate"]["tflops"] * 1e12 / gpu_flops / world}
        if key.startswith("stream"):
            parts["read blocks from the shards"] = read_s
        else:
            parts["load the model"] = read_s
            # the capture runs the first batch through every block but the last, on the CPU the model lives on
            first = (1 if key == "dp8" else r["batch_size"]) * r["seqlen"]
            parts["capture: first batch through the model on CPU"] = 2 * m["block_params"] * (m["blocks"] - 1) * \
                first / (meas["step.json"]["matmul_gflops_per_s"] / 2 * a("HOST_CORES") * 1e9)
        moved = m["blocks"] * (iters * 2 * step_tokens / world + 4 * tokens / world) * h * 4  # bytes per run
        if cache_on == "cpu":
            parts["cache host<->GPU copies"] = bw(moved) / a("PCIE_H2D_GBPS")
        if cache_on == "disk":
            rd = m["blocks"] * (iters * 2 * step_tokens + 2 * tokens) * h * 4
            wr = m["blocks"] * 2 * tokens * h * 4
            parts["offload_dir reads + writes"] = bw(rd) / a("DISK_READ_GBPS") + bw(wr) / a("DISK_WRITE_GBPS")
        if key == "dp8":
            grads = m["block_params"] * 4 + 2 * m["block_params"] / QUANT["group_size"] * 4
            parts["all-reduce of offsets + clip grads"] = m["blocks"] * iters * bw(grads) * 2 * (WORLD - 1) / WORLD \
                / a("NVLINK_ALLREDUCE_BUSBW_GBPS")
        parts["write the checkpoint"] = write_s
        out["parts_s"][rname] = parts
        out["time_s"][rname] = sum(parts.values())
    return out


def command(m: Dict[str, Any], key: str, label_flags: str) -> str:
    q = f"--bits {QUANT['bits']} --group_size {QUANT['group_size']} --format auto_round"
    if key == "rtn":
        return f"auto-round --model {m['hub']} --model_free {q}"
    if key == "dp8":
        return f"torchrun --nproc-per-node {WORLD} -m auto_round --model {m['hub']} {q}"
    return f"auto-round --model {m['hub']}{label_flags} {q}"


# ------------------------------------------------------------------------------------------ output
def gib(n: float) -> str:
    v = n / GIB
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="use the recorded block figures instead of measuring them (about 1 min)")
    p.add_argument("--json", type=Path, default=RESULTS / "plan_large.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    from auto_round.config import build_settings
    from auto_round.estimate import loop_cache_copies

    tuning_copies, peak_copies = loop_cache_copies(build_settings(**QUANT))
    FROM_CODE["LOOP_CACHE_COPIES"] = (peak_copies, FROM_CODE["LOOP_CACHE_COPIES"][1])
    FROM_CODE["LOOP_CACHE_COPIES_TUNING"] = (tuning_copies, FROM_CODE["LOOP_CACHE_COPIES_TUNING"][1])
    meas = measured_inputs()
    block = measure_block() if args.measure else dict(RECORDED_BLOCK)
    step = meas["step.json"]
    gpu_flops = a("GPU_PEAK_BF16_TFLOPS") * 1e12 * a("GPU_MATMUL_EFFICIENCY") / step["step_over_matmuls"]
    derived = {"GPU_EFFECTIVE_TFLOPS": gpu_flops / 1e12,
               "formula": "GPU_PEAK_BF16_TFLOPS x GPU_MATMUL_EFFICIENCY / step_over_matmuls (step.json, measured)"}

    lines = ["constants ASSUMED (not measured in this project):"]
    lines += [f"  {k} = {v} : {why}" for k, (v, why) in ASSUMED.items()]
    lines += ["counted FROM_CODE:"] + [f"  {k} = {v} : {why}" for k, (v, why) in FROM_CODE.items()]
    lines += ["MEASURED:"] + [f"  {f}: {json.dumps({k: v for k, v in d.items() if k != 'shape'})}"
                              for f, d in meas.items()]
    lines += [f"  block probe: {json.dumps({k: v for k, v in block.items() if k != 'raw'})}",
              f"DERIVED: GPU throughput {gpu_flops / 1e12:.0f} TFLOP/s effective = {derived['formula']}"]
    print("\n".join(lines), flush=True)

    # cross-checks of the derived figures against what was measured
    shape = meas["model_free.json"]["shape"]
    bp = _block_params(shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                       shape["num_key_value_heads"]) * shape["num_hidden_layers"]
    mf_out = bp * packed_bytes_per_weight(4, 128) + (meas["model_free.json"]["input_gb"] * 1e9 - bp * 2)
    checks = {"model_free.json output_gb: formula vs measured": [mf_out / 1e9, meas["model_free.json"]["output_gb"]],
              "offload_quick.json cache copies saved by offload_dir (loop count: "
              f"{FROM_CODE['LOOP_CACHE_COPIES'][0]})": meas["offload_quick.json"]["llm-it2 saved_cache_copies"]}
    if "estimated_over_measured" in block:
        checks["block probe h1024/i3584 on CPU: estimate_run over the measured peak RSS delta, by tokens"] = \
            block["estimated_over_measured"]

    models, rows, est_rows = {}, [], []
    for name, spec in MODELS.items():
        m = plan_model(name, spec)
        m["modes"] = {}
        for key, label, flags in MODES:
            f = mode_figures(m, key, meas, gpu_flops)
            f["label"], f["command"] = label, command(m, key, flags)
            m["modes"][key] = f
        models[name] = m
    ref_8b = models["Llama-3.1-8B"]["recipes"]["default"]["estimate"]["tflops"]
    tfl_70b = plan_model("Llama-3.1-70B", LLAMA_70B)["recipes"]["default"]["estimate"]["tflops"]
    m8 = models["Llama-3.1-8B"]["modes"]
    checks["reference Llama-3.1-70B A100 min: scaled by FLOPs from its 8B vs published"] = [
        a("REF_A100_8B_MIN") * tfl_70b / ref_8b, a("REF_A100_70B_MIN")]
    checks["reference's implied A100 throughput, TFLOP/s (8B)"] = ref_8b / (a("REF_A100_8B_MIN") * 60)
    checks["Llama-3.1-8B GPU GiB, ours (a) / (c) vs the reference's 18 / 10 GB"] = [
        m8["inmem_gpu"]["gpu"] / GIB, m8["inmem_cpu"]["gpu"] / GIB]
    print("checks: " + json.dumps(checks), flush=True)
    for name, m in models.items():
        tfl = m["recipes"]["default"]["estimate"]["tflops"]
        m["reference_scaled_a100_s"] = a("REF_A100_8B_MIN") * 60 * tfl / ref_8b
        for key, label, _ in MODES:
            f = m["modes"][key]
            fits = "-" if f["gpu"] == 0 else ("H100" if f["gpu"] <= a("H100_GPU_GIB") * GIB else
                                              "H200" if f["gpu"] <= a("H200_GPU_GIB") * GIB else "neither")
            light = f["time_s"].get("light")
            rows.append([name, label, gib(f["ram"]), gib(f["gpu"]), fits, gib(f["disk"]), dur(f["time_s"]["default"]),
                         "-" if light is None else dur(light),
                         "-" if key == "rtn" else dur(m["reference_scaled_a100_s"] / (WORLD if key == "dp8" else 1))])
        e = m["recipes"]["default"]["estimate"]
        h, r = m["shape"]["hidden_size"], m["recipes"]["default"]
        # the CPU block probe scaled (float32 activations: above a bf16-autocast GPU run's), as a cross-check
        micro = r["batch_size"] * r["seqlen"]
        probe = m["block_params"] * (block["tuning_bytes_per_weight_cpu"] + 4 - 1) + micro * h * (
            block["activation_bytes_per_token_hidden"] - FROM_CODE["LOOP_CACHE_COPIES"][0] * 4)
        est_rows.append([name, f"{m['params'] / 1e9:.1f}", m["blocks"], f"{m['block_params'] / 1e9:.2f}",
                         f"{e['tflops'] / 1e3:,.1f}", f"{e['model_mib'] / 1024:,.0f}",
                         f"{e['records_mib'] / 1024:,.0f}",
                         f"{e['cache_mib'] / 1024:.0f} / {e['cache_tuning_mib'] / 1024:.0f}",
                         f"{e['tuning_mib'] / 1024:.0f} vs {probe / GIB:.0f}",
                         f"{e['checkpoint_mib'] / 1024:.0f} vs {m['output_bytes'] / GIB:.0f}",
                         dur(e["tflops"] * 1e12 / (step["step_gflops_per_s"] * 1e9))])
    print()
    table = print_table(["model", "mode", "RAM GiB", "GPU GiB", "fits", "disk GiB", "time default", "time light",
                         "ref A100 scaled"], rows,
                        f"W4G128; default = iters 200, light = iters 50; 128 x 2048 tokens, batch 8; one "
                        f"{a('GPU_PEAK_BF16_TFLOPS'):.0f}-TFLOP/s-peak GPU at {gpu_flops / 1e12:.0f} TFLOP/s effective "
                        f"(torchrun: {WORLD}); RAM/GPU are peaks (torchrun RAM: all {WORLD} processes); disk = bf16 in "
                        "+ W4 out (+ offload files); 'fits' = GPU memory within H100 80 GB / H200 141 GB")
    print()
    est_table = print_table(["model", "params B", "blocks", "block params B", "PFLOP (default)", "est. model GiB",
                             "records GiB", "cache GiB peak / tuning", "tuning GiB est. (GPU) vs CPU probe",
                             "checkpoint GiB est. vs exact", "this CPU (measured step GFLOP/s)"], est_rows,
                            "the estimator (estimate_run on CUDA, bf16 autocast; estimated_checkpoint_bytes) against "
                            "the block probe scaled (CPU, float32 activations) and the exact packed size")
    print()
    for name, m in models.items():
        print(f"{name}:")
        for key, label, _ in MODES:
            print(f"  {label:40s} {m['modes'][key]['command']}")
    print("\nnotes:\n" + "\n".join(f"- {n}" for n in NOTES))
    record = {"benchmark": "plan_large", "notes": NOTES, "machine": machine_info(),
              "assumed": {k: {"value": v, "why": w} for k, (v, w) in ASSUMED.items()},
              "from_code": {k: {"value": v, "why": w} for k, (v, w) in FROM_CODE.items()}, "measured": meas,
              "block_probe": block, "derived": derived, "checks": checks, "quant": QUANT, "world": WORLD,
              "models": models, "table": table, "estimator_table": est_table,
              "seconds": time.perf_counter() - t0}
    write_json("plan_large", record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
