"""Memory, disk and time estimates of a run, from the plan and the settings alone (``--dry-run``).

Memory follows what the block loop (:mod:`auto_round.tuning.loop`) holds, and where:

- **host RAM**: the in-memory model (streamed, ``low_cpu_mem_usage``: one module of it at a time), the
  integer records of every quantized layer (uint8 codes, scales, zeros: kept until the export), and the
  block cache with ``low_gpu_mem_usage``;
- **the tuning device**: the tuned unit in float32, its tuning state and activations, and the block
  cache by default (``offload_dir``: in files, one batch on the device at a time).

With the CPU as the device both are the same memory. The block cache (:func:`loop_cache_copies`) holds
float32 copies of the block inputs (``out.float()`` in ``_forward_all``, whatever ``amp`` is; only the
first unit's inputs are the captured hidden states, in the model's dtype): while a unit tunes, the
quantized chain's inputs and the FP targets; while a unit's outputs are computed, three (the FP chain's
inputs, released once the targets exist, or the quantized outputs next to both). The tuning memory
(:func:`tuning_bytes`) is counted per tuned weight and per token of one micro-batch, calibrated against
a measured run in ``tests/test_estimate.py``.

Time is the tuning's matrix-multiply work (forward and backward of every tuned block, ``iters`` steps of
``batch_size * seqlen * gradient_accumulate_steps`` tokens; with ``e2e_epochs``, the whole model's forward
over the calibration tokens three times and its forward and backward once per epoch) at a throughput measured on the device with
one dense matmul in the tuning's dtype (autocast or float32); the quantize-dequantize of every step,
attention and data movement come on top (often 2-3x on small models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from auto_round.config import Settings
from auto_round.models import text_config
from auto_round.tuning.plan import LayerPlan, QuantPlan

MIB = 2**20

# Activations one micro-batch keeps for the backward of a decoder block (attention + gated MLP), with the
# backward's own peak (about two intermediate-wide gradients), in bytes per token per unit of (hidden,
# key/value width, intermediate). Measured on Llama blocks with saved-tensor hooks and the profiler's memory
# timeline (hidden 512, intermediate 1536, 128 -> 1024 tokens): float32 110.6 x hidden per token (these
# coefficients: 112), bf16 autocast 68.9 (70). Norms, residual sums, the output and the loss stay float32.
ACTIVATION_FP32 = (32, 8, 24)
ACTIVATION_HALF = (30, 4, 12)
# Per tuned weight: the offsets V and their gradient (4 + 4), the qdq's three weight-sized float32 tensors
# (a reused workspace on CPU, the forward's saved tensors on CUDA: 12), the best iteration's copy of V (4).
STATE_BYTES_PER_WEIGHT = 4 + 4 + 12
BEST_BYTES_PER_WEIGHT = 4  # a second one while a new best replaces the old (counted in the transient)
AUTOCAST_BYTES_PER_WEIGHT = 2  # the qdq weight cast to the autocast dtype, kept by F.linear for the backward
# Per group ([out, G] float32): alpha, beta, their gradients and two best copies (8); group min/max (2); s, z (2).
FLOATS_PER_GROUP_MINMAX, FLOATS_PER_GROUP = 12, 4


@dataclass(frozen=True)
class BlockShape:
    """The widths a block's activations scale with (text config; a config without them: 4 x hidden)."""

    hidden: int
    kv_dim: int
    intermediate: int


@dataclass(frozen=True)
class LoopCache:
    """Bytes of the block cache: held while a unit tunes, at the loop's peak, and the most ``offload_dir``
    files at once (each copy's files are deleted when the loop drops it, so the peak copies)."""

    tuning: float
    peak: float
    peak_copies: int
    files: float


@dataclass(frozen=True)
class RunEstimate:
    """Estimated sizes (MiB) and work of one run; ``seconds`` is None without a throughput.

    ``host_mib`` / ``device_mib``: the peaks of host RAM and of the tuning device's memory (``device_mib``
    is None when the device is the CPU: everything is then in ``host_mib``)."""

    model_mib: float  # the model's parameters as the run holds them (streamed: the largest module)
    records_mib: float  # integer records of the quantized layers, on the host until the export
    checkpoint_mib: float  # the exported checkpoint on disk
    cache_mib: float  # the block cache at the loop's peak (cache_copies float32 copies of the inputs)
    cache_tuning_mib: float  # the block cache while a unit tunes (quantized inputs and FP targets)
    cache_copies: int
    cache_where: str  # "device", "host RAM" or "offload_dir"
    offload_mib: float  # the most offload_dir files at once
    tuning_mib: float  # the largest tuned unit while it tunes (fp32 weights, V, clip params, grads, activations)
    host_mib: float
    device_mib: Optional[float]
    device: str
    tokens: str  # "nsamples x seqlen x hidden", what one cache copy holds
    tflops: float  # matmul work of the tuning
    seconds: Optional[float]
    flops_per_second: Optional[float]
    streamed: bool = False  # low_cpu_mem_usage: model_mib is the largest module, held one at a time

    def lines(self) -> list:
        """Human-readable lines for the dry-run output."""
        time_line = ("time      tuning not timed (no throughput measured)" if self.seconds is None else
                     f"time      about {_duration(self.seconds)} of matmul work ({self.tflops:.3g} TFLOP at "
                     f"{self.flops_per_second / 1e9:.0f} GFLOP/s measured here; qdq, attention and data movement "
                     "add to it, often 2-3x)")
        model = f"model {_mib(self.model_mib)} MiB" + (" (streamed: its largest module)" if self.streamed else "")
        lines = [f"memory    {model} + integer records {_mib(self.records_mib)} MiB (host RAM)"]
        if self.cache_copies:
            where = {"device": f"on {self.device}", "host RAM": "in host RAM",
                     "offload_dir": "in offload_dir files"}[self.cache_where]
            lines.append(f"memory    block cache {_mib(self.cache_mib)} MiB at peak {where}: {self.cache_copies} "
                         f"float32 copies of {self.tokens} while a unit's outputs are computed, "
                         f"{_mib(self.cache_tuning_mib)} MiB while it tunes (quantized inputs, FP targets)")
        if self.tuning_mib:
            lines.append(f"memory    tuning {_mib(self.tuning_mib)} MiB on {self.device} (largest unit: float32 "
                         "weights, offsets V, clip params, their gradients and best state, qdq buffers, activations "
                         "of one micro-batch)")
        peak = (f"about {_mib(self.host_mib)} MiB host RAM (the device is the CPU)" if self.device_mib is None else
                f"about {_mib(self.host_mib)} MiB host RAM and {_mib(self.device_mib)} MiB on {self.device} "
                "(+ its runtime context)")
        lines.append(f"memory    peak {peak}")
        disk = f"disk      checkpoint about {self.checkpoint_mib:.3g} MiB per format"
        if self.offload_mib:
            disk += f"; offload_dir files up to {_mib(self.offload_mib)} MiB (each freed once consumed)"
        return lines + [disk, time_line]


def _mib(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _hidden_size(model: nn.Module) -> int:
    hidden = getattr(text_config(model), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[1]) if emb is not None else 0


def block_shape(model: nn.Module) -> BlockShape:
    """Hidden, key/value and intermediate widths of ``model``'s (text) blocks."""
    cfg, hidden = text_config(model), _hidden_size(model)
    heads = getattr(cfg, "num_attention_heads", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    return BlockShape(hidden, int(kv), int(inter))


def tuned_unit_params(model: nn.Module, plan: QuantPlan) -> list:
    """Parameter counts of the quantized linear layers of each tuned unit (blocks, projectors), in order."""
    return [sum(lp.out_features * lp.in_features for lp in layers) for layers in _unit_layers(plan)]


def _unit_layers(plan: QuantPlan) -> list:
    return [plan.in_block(unit) for _, units in plan.block_lists for unit in units]


def loop_cache_copies(settings: Settings, searched: bool = True) -> Tuple[int, int]:
    """Float32 copies of the block inputs the loop holds after its first unit: (while a unit tunes, at the peak).

    Tuning (``_tune_unit``): the quantized inputs and the FP targets while it tunes; computing the targets,
    the FP chain's inputs besides, and then the quantized outputs besides (3); without
    ``enable_quanted_input`` both chains are one list (2). Optimized RTN (``_opt_rtn_unit``): its inputs, the
    FP outputs and one output per candidate (the clip search and, when ``searched``, plain RTN). Plain RTN: none.
    """
    if settings.iters > 0:
        return 2, 3 if settings.enable_quanted_input else 2
    if not getattr(settings, "disable_opt_rtn", True):
        return 0, 4 if searched else 3
    return 0, 0


def loop_cache(settings: Settings, plan: QuantPlan, units: int, copy_elems: int, capture_bytes: int) -> LoopCache:
    """Bytes of the block cache of a run of ``units`` units, one copy being ``copy_elems`` values; the first
    unit's inputs are ``capture_bytes`` wide (the model's dtype), the later ones float32."""
    from auto_round.quant.opt_rtn import SEARCHABLE

    searched = any(lp.params.scheme in SEARCHABLE for lp in plan.quantized)
    tuning, peak = loop_cache_copies(settings, searched)
    if not peak or not units:
        return LoopCache(0.0, 0.0, 0, 0.0)
    f, first = copy_elems * 4.0, copy_elems * float(capture_bytes)
    if units == 1:  # only the captured inputs, then the new copies
        tuning_b, peak_b = (first + f if tuning else 0.0), first + (peak - 1) * f
    else:
        tuning_b, peak_b = tuning * f, peak * f
    return LoopCache(tuning_b, peak_b, peak, peak_b)  # files: the copies in use (calib.store.DiskTensor)


def tuning_bytes(layers: Sequence[LayerPlan], settings: Settings, shape: BlockShape, device: torch.device,
                 autocast: bool, weight_bytes: float) -> Tuple[float, float]:
    """(held, transient) bytes of tuning one unit made of ``layers``: held for the whole tuning (its float32
    weights where they are a new copy, ``weight_bytes`` per weight; V, clip params, their gradients and best
    state; the qdq's buffers), and the larger of the activations of one micro-batch with the backward's
    per-layer weight gradient and a second best state. Optimized RTN: the float32 copies of the weights its
    candidates start from."""
    w = sum(lp.out_features * lp.in_features for lp in layers)
    if not w:
        return 0.0, 0.0
    if settings.iters == 0:
        return w * (weight_bytes + 4.0), 0.0
    groups = sum(lp.out_features * -(-lp.in_features // lp.params.group_size) for lp in layers)
    per_group = FLOATS_PER_GROUP_MINMAX if settings.enable_minmax_tuning else FLOATS_PER_GROUP
    best = 0 if settings.not_use_best_mse else BEST_BYTES_PER_WEIGHT
    held = w * (weight_bytes + STATE_BYTES_PER_WEIGHT + best + (AUTOCAST_BYTES_PER_WEIGHT if autocast else 0)) \
        + groups * per_group * 4
    coef = ACTIVATION_HALF if autocast else ACTIVATION_FP32
    tokens = settings.batch_size * settings.seqlen * settings.nblocks  # one micro-batch through each block
    acts = tokens * (coef[0] * shape.hidden + coef[1] * shape.kv_dim + coef[2] * shape.intermediate)
    # the backward's weight gradient of one layer (float32; + its autocast-dtype original; CUDA: + V's new grad)
    largest = max(lp.out_features * lp.in_features for lp in layers)
    layer_grad = largest * (4 + (2 if autocast else 0) + (0 if device.type == "cpu" else 4))
    return held, max(acts + layer_grad, best * w)


def record_bytes(lp: LayerPlan) -> float:
    """Host bytes of one layer's integer record: uint8 codes, scales (scale dtype) and int32 zeros per group."""
    groups = lp.out_features * -(-lp.in_features // lp.params.group_size)
    scale = torch.empty(0, dtype=lp.params.scale_dtype).element_size()
    return lp.out_features * lp.in_features + groups * (scale + 4)


def checkpoint_bytes(model: nn.Module, plan: QuantPlan) -> int:
    """About what one checkpoint takes on disk, following the plan layer by layer: each quantized Linear's
    weight at its own bits (packed codes, plus per group a scale in its scale dtype and a packed zero), every
    other tensor, the layers the plan keeps in full precision included, at its dtype's size."""
    packed = {}
    for lp in plan.quantized:
        weight = model.get_submodule(lp.name).weight
        groups = lp.out_features * -(-lp.in_features // lp.params.group_size)
        scale = torch.empty(0, dtype=lp.params.scale_dtype).element_size()
        bits = lp.params.bits
        packed[id(weight)] = lp.out_features * lp.in_features * bits / 8 + groups * (scale + bits / 8)
    total = sum(packed.get(id(p), p.numel() * p.element_size()) for p in model.parameters())
    return int(total)


def _placement(settings: Settings, device: torch.device) -> str:
    if settings.offload_dir:
        return "offload_dir"
    return "host RAM" if settings.low_gpu_mem_usage and device.type != "cpu" else "device"


def _resident_model(model: nn.Module, settings: Settings, largest_unit: int) -> float:
    """Bytes of the model the run holds: all of it, or streamed (``low_cpu_mem_usage``) one module at a time
    (the largest tuned unit or the embedding)."""
    if not getattr(settings, "low_cpu_mem_usage", False):
        return float(sum(p.numel() * p.element_size() for p in model.parameters()))
    first = next(model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return float(max(largest_unit * first.element_size(),
                     emb.weight.numel() * emb.weight.element_size() if emb is not None else 0))


def _device_peak(cache: LoopCache, where: str, tuning: float, unit_weights: float, batch: float) -> float:
    """The tuning device's peak: the larger of a unit tuning (its tuning memory and the cache while it tunes)
    and a unit's outputs being computed (its weights and the cache at its peak). Cache elsewhere: one batch
    in and its target (or output) on the device."""
    on_device = (cache.tuning, cache.peak) if where == "device" else ((2 * batch, 2 * batch) if cache.peak else (0, 0))
    return max(tuning + on_device[0], unit_weights + on_device[1])


def estimate_run(model: nn.Module, plan: QuantPlan, settings: Settings, checkpoint_bytes: int,
                 flops_per_second: Optional[float] = None, device: Optional[torch.device] = None) -> RunEstimate:
    """Estimate one run of ``plan`` under ``settings`` tuned on ``device`` (default: the CPU); see the module
    docstring for what is counted and where."""
    from auto_round.tuning.block import amp_dtype

    device = torch.device(device or "cpu")
    first = next(model.parameters())
    shape = block_shape(model)
    tokens = settings.nsamples * settings.seqlen
    uses_data = settings.iters > 0 or not getattr(settings, "disable_opt_rtn", True)
    layers = _unit_layers(plan)
    units = [sum(lp.out_features * lp.in_features for lp in ls) for ls in layers]
    largest = max(range(len(units)), key=units.__getitem__, default=None)
    unit_layers = layers[largest] if largest is not None else []
    streamed = bool(getattr(settings, "low_cpu_mem_usage", False))
    model_on_device = first.device.type == device.type and not streamed
    # the unit tuned in float32: a new copy on another device, in place (its dtype's bytes less) on the model's
    weight_bytes = 4.0 - (first.element_size() if model_on_device else 0)
    autocast = amp_dtype(device, settings, first.dtype) is not None
    cache, held, transient = LoopCache(0.0, 0.0, 0, 0.0), 0.0, 0.0
    if uses_data:
        cache = loop_cache(settings, plan, len(units), tokens * shape.hidden, first.element_size())
        held, transient = tuning_bytes(unit_layers, settings, shape, device, autocast, weight_bytes)
    records = sum(record_bytes(lp) for lp in (unit_layers if streamed else plan.quantized))  # streamed: written
    model_held = _resident_model(model, settings, max(units, default=0))
    where = _placement(settings, device)
    batch = settings.batch_size * settings.seqlen * shape.hidden * 4.0  # one float32 micro-batch of the cache
    dev_peak = _device_peak(cache, where, held + transient, max(units, default=0) * weight_bytes, batch)
    host = model_held + records + (cache.peak if where == "host RAM" else 0.0)
    device_mib = None
    if device.type == "cpu":
        host += dev_peak
    else:
        if model_on_device:
            host, dev_peak = host - model_held, dev_peak + model_held
        device_mib = dev_peak / MIB
    step_tokens = settings.batch_size * settings.seqlen * settings.gradient_accumulate_steps
    work = sum(units) * 2 * (3 * step_tokens * settings.iters + 2 * tokens) if uses_data else 0
    epochs = int(getattr(settings, "e2e_epochs", 0) or 0)
    if epochs:  # the teacher pass, the KL before and after (forwards), each epoch's forward and backward
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        work += linear * tokens * 2 * (3 + 3 * epochs)
        if device.type != "cpu" and not model_on_device:
            device_mib = (device_mib or 0.0) + model_held / MIB  # the stage runs the whole model there
    seconds = work / flops_per_second if flops_per_second else None
    return RunEstimate(model_held / MIB, records / MIB, checkpoint_bytes / MIB, cache.peak / MIB, cache.tuning / MIB,
                       cache.peak_copies, where, (cache.files if where == "offload_dir" else 0.0) / MIB,
                       (held + transient) / MIB, host / MIB, device_mib, str(device),
                       f"{settings.nsamples} x {settings.seqlen} x {shape.hidden}", work / 1e12, seconds,
                       flops_per_second, streamed)


def tuning_dtype(device: torch.device, settings: Settings, model: nn.Module) -> torch.dtype:
    """The dtype the tuning's matmuls run in: the autocast dtype of :func:`auto_round.tuning.block.amp_dtype`,
    else float32."""
    from auto_round.tuning.block import amp_dtype

    model_dtype = next(model.parameters()).dtype
    return amp_dtype(device, settings, model_dtype) or torch.float32


def measure_flops_per_second(device: torch.device, size: int = 1024, seconds: float = 0.3,
                             dtype: torch.dtype = torch.float32) -> float:
    """Dense ``dtype`` matmul throughput of ``device`` (FLOP/s), measured for about ``seconds``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (kernel selection, allocation)
    n, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * size**3 * n / elapsed
