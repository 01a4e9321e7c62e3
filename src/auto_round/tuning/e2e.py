"""End-to-end scale tuning: after the block-wise SignRound, every group scale of the model at once.

Block-wise tuning fits each block to its full-precision output; the errors it leaves add up along the
depth. This stage keeps every integer code as tuned and trains only the group scales (the tensors
every format stores as they are: ``scale [out, G]``), through the whole model, to make the quantized
model's next-token distribution match the full-precision model's:

- **Teacher** (:func:`teacher_targets`, one forward of the FP model before tuning): per calibration
  sample, the top-``k`` log-probabilities of every attended position, and their indices.
- **Loss** (:func:`topk_kl`): the KL divergence from the teacher to the student over those ``k``
  tokens plus one bucket holding the rest of the probability mass, averaged over attended tokens.
- **Step**: Adam on a relative change of each scale (``scale = start * (1 + delta)``, float32; the
  learning rate per bit width, see ``Settings.resolved_e2e_lr``), cosine learning-rate decay over
  ``epochs x batches`` steps, one calibration batch per step (its samples run one at a time and
  their gradients add up, so one sample's logits are the most held in memory).
- **Guard**: the mean KL over the calibration data is measured before and after (with the scales
  rounded to their stored dtype); when the stage did not lower it, the block-wise scales are kept.

The quantized layers run through :class:`_ScaledLinear`, whose backward recomputes the weight from
the uint8 codes instead of saving a weight-sized tensor per layer, so the stage holds the model,
the codes and one sample's activations. It needs the whole model in memory (not the streamed mode),
float group scales (not GGUF K-quant super-blocks) and one process.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.wrapper import load_record, set_module

logger = logging.getLogger(__name__)

TOP_K = 128  # teacher log-probabilities kept per position (the rest of the mass is one bucket)

# keys of a calibration batch that are not model inputs of a plain forward
_NOT_INPUTS = ("labels",)
# inputs laid out [batch, tokens]: a batch of only these splits into samples (an image batch may pack its
# pixels across samples, as Qwen2-VL's patches with image_grid_thw do, and runs whole)
_PER_SAMPLE = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass
class TeacherTargets:
    """The FP model's top-``k`` next-token log-probabilities, per chunk of a calibration batch.

    ``values[b][j]``: float32 ``[n_j, k]`` for chunk ``j`` of batch ``b`` (a sample of a text batch, or
    the whole of an image-text batch; its ``n_j`` attended positions, in order); ``indices[b][j]``:
    int64 ``[n_j, k]``, the token ids."""

    k: int
    values: List[List[torch.Tensor]]
    indices: List[List[torch.Tensor]]


def _chunks(batch: Mapping[str, Any], device: torch.device) -> Iterator[Tuple[Dict[str, Any], torch.Tensor]]:
    """Model inputs of ``batch`` on ``device``, one sample at a time when the batch is text only (so one
    sample's logits are the most held), and each chunk's attended-position mask ``[b, T]`` (CPU)."""
    inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    keep = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.to(torch.bool).cpu()
    if not all(k in _PER_SAMPLE for k in inputs):
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}, keep
        return
    for j in range(ids.shape[0]):
        yield {k: v[j:j + 1].to(device) for k, v in inputs.items()}, keep[j:j + 1]


def _log_probs(model: nn.Module, inputs: Mapping[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the model's logits at the attended positions, ``[n, vocab]``."""
    logits = model(**inputs).logits
    return F.log_softmax(logits[keep.to(logits.device)].float(), dim=-1)


@torch.no_grad()
def teacher_targets(model: nn.Module, batches: Sequence[Mapping[str, Any]], k: int,
                    device: torch.device) -> TeacherTargets:
    """Run the full-precision ``model`` over ``batches`` once and keep each position's top-``k`` (on CPU)."""
    if k < 1:
        raise ValueError(f"e2e top-k={k} must be at least 1")
    values: List[List[torch.Tensor]] = []
    indices: List[List[torch.Tensor]] = []
    for batch in batches:
        vs, ids = [], []
        for inputs, keep in _chunks(batch, device):
            lp = _log_probs(model, inputs, keep)
            v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
            vs.append(v.cpu())
            ids.append(i.cpu())
        values.append(vs)
        indices.append(ids)
    return TeacherTargets(k, values, indices)


def topk_kl(student_log_probs: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over the positions, on the teacher's top-k tokens plus a tail bucket.

    ``student_log_probs [n, vocab]`` (log-softmax), ``values``/``indices [n, k]`` (the teacher's top-k).
    The tail bucket compares the probability mass outside those k tokens, so the divergence is that of
    two distributions over k + 1 outcomes (exactly 0 when the student equals the teacher)."""
    q_top = student_log_probs.gather(-1, indices)
    p_top = values.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    per_position = (p_top * (values - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return per_position.sum()


def _levels(codes: torch.Tensor, zero: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes - zero`` per column (``idx``: each column's group), small integers, exact in ``dtype``."""
    return codes.to(dtype) - zero.to(dtype)[:, idx]


class _ScaledLinearFn(torch.autograd.Function):
    """``linear(x, scale * (codes - zero), bias)`` with the gradient of ``scale`` only; the weight is
    :func:`~auto_round.quant.qdq.dequantize`'s, formed in the scale's dtype (float32 here).

    The backward rebuilds the weight from the uint8 codes rather than saving it, so a layer costs its
    input activations, not a weight-sized tensor, between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor,
                group_size: int, bias: Any) -> torch.Tensor:
        ctx.save_for_backward(x, scale, codes, zero)
        ctx.group_size = group_size
        idx = torch.arange(codes.shape[1], device=codes.device) // group_size
        weight = scale[:, idx] * _levels(codes, zero, idx, scale.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, scale, codes, zero = ctx.saved_tensors
        out, in_ = codes.shape
        idx = torch.arange(in_, device=codes.device) // ctx.group_size
        levels = _levels(codes, zero, idx, scale.dtype)
        grad_x = grad @ (scale[:, idx] * levels).to(grad.dtype)
        grad_weight = grad.reshape(-1, out).to(scale.dtype).t() @ x.reshape(-1, in_).to(scale.dtype)
        grad_scale = torch.zeros_like(scale).index_add_(1, idx, grad_weight * levels)  # columns into their group
        return grad_x, grad_scale, None, None, None, None


def refuse_kquant(names: Sequence[str], epochs: int) -> None:
    """Refuse layers whose scales this stage cannot train: GGUF K-quant super-blocks (``names``)."""
    if names:
        raise ValueError(f"e2e_epochs={epochs} trains float group scales, but {len(names)} layers (e.g. "
                         f"{names[0]!r}) get GGUF K-quant super-blocks (6-bit sub-block scales): drop e2e_epochs "
                         "for K-quant formats, or export one with float scales (gguf:q4_0, auto_round, ...)")


@contextmanager
def model_on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Hold ``model`` on ``device`` for the block (the stage runs the whole model), then move it back."""
    home = next((p.device for p in model.parameters() if not p.is_meta), device)
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


class _RelativeScale(nn.Module):
    """``scale = start * (1 + delta)``: the trained ``delta`` is a relative change, so one learning rate
    moves every group by the same fraction whatever its magnitude (2-bit scales are ~3x 4-bit ones)."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("start", start, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(start))

    def forward(self) -> torch.Tensor:
        return self.start * (1 + self.delta)


class _ScaledLinear(nn.Module):
    """Stands in for one quantized ``nn.Linear`` while its scales are trained (codes shared with the record)."""

    def __init__(self, record: QuantizedWeight, scale: _RelativeScale, bias: Any, device: torch.device) -> None:
        super().__init__()
        self.scale = scale
        self.codes = record.codes.to(device)
        self.zero = record.zero.to(device)
        self.group_size = record.group_size
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledLinearFn.apply(x, self.scale(), self.codes, self.zero, self.group_size, self.bias)


@contextmanager
def _scales_trainable(model: nn.Module, records: Mapping[str, QuantizedWeight],
                      device: torch.device) -> Iterator[Dict[str, _RelativeScale]]:
    """Swap every quantized linear for a :class:`_ScaledLinear` on float32 scales; put the linears back."""
    originals: Dict[str, nn.Module] = {}
    scales: Dict[str, _RelativeScale] = {}
    try:
        for name, record in records.items():
            linear = model.get_submodule(name)
            scales[name] = _RelativeScale(record.scale.detach().float().to(device).clone())
            originals[name] = linear
            set_module(model, name, _ScaledLinear(record, scales[name], linear.bias, device))
        yield scales
    finally:
        for name, linear in originals.items():
            set_module(model, name, linear)


def _mean_kl(model: nn.Module, batches: Sequence[Mapping[str, Any]], teacher: TeacherTargets,
             device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b, batch in enumerate(batches):
            for j, (inputs, keep) in enumerate(_chunks(batch, device)):
                lp = _log_probs(model, inputs, keep)
                total += float(topk_kl(lp, teacher.values[b][j].to(device), teacher.indices[b][j].to(device)))
                count += int(keep.sum())
    return total / max(count, 1)


def tune_scales(model: nn.Module, records: Dict[str, QuantizedWeight], batches: Sequence[Mapping[str, Any]],
                teacher: TeacherTargets, epochs: int, lr: Union[float, Callable[[int], float]], seed: int,
                device: torch.device) -> Dict[str, Any]:
    """Train the group scales of ``records`` end to end; update the records and the model's weights in place.

    ``lr``: one learning rate, or a layer's learning rate from its bit width (``Settings.resolved_e2e_lr``).
    Returns what happened: the mean calibration KL before and after, whether the new scales were kept,
    the learning rate per bit width, the steps and the seconds."""
    refuse_kquant([name for name, r in records.items() if r.kquant is not None], epochs)
    if epochs < 1:
        raise ValueError(f"e2e epochs={epochs} must be at least 1")
    t0 = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen here, restored after
    for p in trainable:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * len(batches)
    history: List[float] = []
    try:
        with _scales_trainable(model, records, device) as scales:
            kl_before = _mean_kl(model, batches, teacher, device)
            lr_of = lr if callable(lr) else (lambda bits: float(lr))
            by_bits: Dict[int, List[nn.Parameter]] = {}
            for name, scale in scales.items():
                by_bits.setdefault(records[name].bits, []).append(scale.delta)
            rates = {bits: lr_of(bits) for bits in sorted(by_bits)}
            opt = torch.optim.Adam([{"params": ps, "lr": rates[bits]} for bits, ps in sorted(by_bits.items())])
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
            for _ in range(epochs):
                epoch_loss, epoch_tokens = 0.0, 0
                for b in torch.randperm(len(batches), generator=generator).tolist():
                    opt.zero_grad(set_to_none=True)
                    parts = list(_chunks(batches[b], device))
                    tokens = max(sum(int(keep.sum()) for _, keep in parts), 1)
                    for j, (inputs, keep) in enumerate(parts):
                        lp = _log_probs(model, inputs, keep)
                        loss = topk_kl(lp, teacher.values[b][j].to(device), teacher.indices[b][j].to(device)) / tokens
                        loss.backward()
                        epoch_loss += float(loss.detach()) * tokens
                    epoch_tokens += tokens
                    opt.step()
                    sched.step()
                history.append(epoch_loss / max(epoch_tokens, 1))
            with torch.no_grad():  # what is stored: the scales in their own dtype
                for name, scale in scales.items():
                    scale.start.copy_(scale().to(records[name].scale.dtype).float())
                    scale.delta.zero_()
            kl_after = _mean_kl(model, batches, teacher, device)
            tuned = {name: scale.start.clone() for name, scale in scales.items()}
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    kept = bool(math.isfinite(kl_after) and kl_after < kl_before
                and all(bool(torch.isfinite(s).all()) for s in tuned.values()))
    if kept:
        for name, scale in tuned.items():
            record = records[name]
            record.scale = scale.to(device=record.scale.device, dtype=record.scale.dtype)
            with torch.no_grad():
                load_record(model.get_submodule(name), record)
    else:
        logger.warning("e2e scale tuning did not lower the calibration KL (%.5f -> %.5f): the block-wise scales are "
                       "kept", kl_before, kl_after)
    return {"epochs": epochs, "lr": {str(bits): rate for bits, rate in rates.items()}, "steps": steps,
            "top_k": teacher.k, "kl_before": round(kl_before, 6), "kl_after": round(kl_after, 6), "epoch_kl": [round(v, 6) for v in history], "kept": kept,
            "seconds": round(time.perf_counter() - t0, 2)}
