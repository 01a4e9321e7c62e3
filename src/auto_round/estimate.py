"""Rough memory and time estimates of a run, from the plan and the settings alone (``--dry-run``).

These are order-of-magnitude figures, not promises: the time is the tuning's matrix-multiply work
(forward and backward of every tuned block, ``iters`` steps of ``batch_size * seqlen`` tokens) at a
throughput measured on the device with one dense matmul in the tuning's dtype (autocast or
float32); the quantize-dequantize of every step, attention and data movement come on top (often 2-3x
on small models).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from auto_round.config import Settings
from auto_round.tuning.plan import QuantPlan

MIB = 2**20


@dataclass(frozen=True)
class RunEstimate:
    """Estimated sizes (MiB) and work of one run; ``seconds`` is None without a throughput."""

    model_mib: float  # the loaded model's parameters
    checkpoint_mib: float  # the exported checkpoint on disk
    cache_mib: float  # cached block inputs and their full-precision targets
    tuning_mib: float  # the largest tuned unit while it is tuned (fp32 weights, offsets, gradients, activations)
    tflops: float  # matmul work of the tuning
    seconds: Optional[float]
    flops_per_second: Optional[float]

    def lines(self) -> list:
        """Human-readable lines for the dry-run output."""
        time_line = ("time      tuning not timed (no throughput measured)" if self.seconds is None else
                     f"time      about {_duration(self.seconds)} of matmul work ({self.tflops:.3g} TFLOP at "
                     f"{self.flops_per_second / 1e9:.0f} GFLOP/s measured here; qdq, attention and data movement "
                     "add to it, often 2-3x)")
        peak = self.model_mib + self.tuning_mib + self.cache_mib
        return [f"memory    model {self.model_mib:.0f} MiB + block cache {self.cache_mib:.0f} MiB + tuning "
                f"{self.tuning_mib:.0f} MiB: about {peak:.0f} MiB at peak",
                f"disk      checkpoint about {self.checkpoint_mib:.3g} MiB per format", time_line]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text, "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.weight.shape[1]) if emb is not None else 0


def tuned_unit_params(model: nn.Module, plan: QuantPlan) -> list:
    """Parameter counts of the quantized linear layers of each tuned unit (blocks, projectors), in order."""
    counts = []
    for _, units in plan.block_lists:
        for unit in units:
            counts.append(sum(lp.out_features * lp.in_features for lp in plan.in_block(unit)))
    return counts


def estimate_run(model: nn.Module, plan: QuantPlan, settings: Settings, checkpoint_bytes: int,
                 flops_per_second: Optional[float] = None) -> RunEstimate:
    """Estimate one run of ``plan`` under ``settings`` (see the module docstring for what is counted)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = _hidden_size(model)
    act_bytes = 2 if settings.amp else 4
    tokens = settings.nsamples * settings.seqlen
    uses_data = settings.iters > 0 or not getattr(settings, "disable_opt_rtn", True)
    cache = 2 * tokens * hidden * act_bytes if uses_data else 0  # inputs + FP targets of the current block
    units = tuned_unit_params(model, plan)
    largest = max(units, default=0)
    step_tokens = settings.batch_size * settings.seqlen * settings.gradient_accumulate_steps
    # fp32 weight + rounding offsets + their gradients and sign-SGD state; activations ~16 hidden-wide per token
    tuning = (largest * 4 * 4 + step_tokens * hidden * 4 * 16) if settings.iters > 0 else 0
    work = sum(units) * 2 * (3 * step_tokens * settings.iters + 2 * tokens) if uses_data else 0
    seconds = work / flops_per_second if flops_per_second else None
    return RunEstimate(param_bytes / MIB, checkpoint_bytes / MIB, cache / MIB, tuning / MIB, work / 1e12, seconds,
                       flops_per_second)


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
