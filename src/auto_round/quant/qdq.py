"""Quantize-dequantize of weight groups with learnable rounding and clipping (SignRound).

Groups run along the input dimension. A weight ``[out, in_]`` is zero-padded on the right to
``[out, G * group_size]`` and viewed as ``[out, G, group_size]``; padding never changes a group's
range because the range always includes 0 (``lo = min(0, min W)``, ``hi = max(0, max W)``).

Three schemes (``QuantParams.scheme``):

- ``"asym"``: ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``.
- ``"sym"`` (full range, the default): ``M = max(A, B)`` with ``A = -lo``, ``B = hi``;
  ``s = M / 2^(b-1)`` if ``A > B`` else ``-M / 2^(b-1)``, ``z = 2^(b-1)``; all ``2^b`` levels used.
- ``"sym_gptq"``: ``s = 2 max(|lo|, hi) / (2^b - 1)``, ``z = 2^(b-1)``.

Then ``q = clamp(round(W / s + V) + z, 0, 2^b - 1)`` and ``W' = s (q - z)``, with a straight-through
gradient for every ``round``. ``lo``/``hi`` are multiplied by the learnable per-group clip factors
``alpha``/``beta`` first.

Two more schemes, ``"asym_dq"`` / ``"sym_dq"``, are GGUF's K-quants (sub-block scales, and for
asym_dq float mins, themselves quantized per 256-weight super-block): see
:mod:`auto_round.quant.kquant`, which :func:`scale_zero_from_range`, :func:`qdq_weight` and
:func:`quantize_weight` hand them to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

SCHEMES = ("sym", "asym", "sym_gptq", "asym_dq", "sym_dq")  # *_dq: GGUF K-quants (quant/kquant.py)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class QuantParams:
    """How one layer's weight is quantized.

    ``group_size`` is the resolved group length (never -1: use ``in_features`` for per-row).
    """

    bits: int = 4
    group_size: int = 128
    scheme: str = "sym"
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer here")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is not one of {SCHEMES}")
        if self.scheme.endswith("_dq"):
            from auto_round.quant.kquant import spec_of

            spec_of(self.bits, self.group_size, self.scheme)  # ValueError naming the K types

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def sym(self) -> bool:
        return self.scheme not in ("asym", "asym_dq")


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(x)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (the last one padded)."""
    return math.ceil(in_features / group_size)


def group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in_]`` -> ``[out, G, group_size]``, zero-padding the last group.

    >>> group_view(torch.ones(2, 5), 4).shape
    torch.Size([2, 2, 4])
    """
    out, in_ = weight.shape
    g = n_groups(in_, group_size)
    pad = g * group_size - in_
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out, g, group_size)


def _signed_clamp_min(s: torch.Tensor, min_abs: float) -> torch.Tensor:
    """Clamp ``|s|`` to at least ``min_abs`` keeping the sign (0 counts as positive)."""
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    return sign * s.abs().clamp(min=min_abs)


def group_range(wg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per group of ``wg [out, G, gs]``: ``lo = min(0, min W)``, ``hi = max(0, max W)``."""
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def scale_zero_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    params: QuantParams,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group from the group range ``lo``/``hi`` ``[out, G]``.

    Differentiable in ``alpha``/``beta`` (``[out, G]`` or None = 1). Returns ``scale [out, G, 1]``
    (already cast through ``scale_dtype``, as exported) and ``zero [out, G, 1]`` (float holding
    integers; for ``asym_dq`` the float ``mn / s``, see :func:`auto_round.quant.kquant.scale_zero_k`).
    """
    if params.scheme.endswith("_dq"):
        from auto_round.quant.kquant import scale_zero_k

        return scale_zero_k(lo, hi, params, alpha, beta)
    if alpha is not None:
        lo = lo * alpha
    if beta is not None:
        hi = hi * beta
    half = 2 ** (params.bits - 1)
    if params.scheme == "asym":
        s = (hi - lo) / params.maxq
    elif params.scheme == "sym":
        a, b = -lo, hi
        m = torch.maximum(a, b)
        s = torch.where(a > b, m, -m) / half
    else:  # sym_gptq
        s = 2 * torch.maximum(-lo, hi) / params.maxq
    s = _signed_clamp_min(s, MIN_SCALE)
    s = s.to(params.scale_dtype).to(lo.dtype)
    if params.scheme == "asym":
        z = round_ste(-lo / s).clamp(0, params.maxq)
    else:
        z = torch.full_like(s, float(half))
    return s.unsqueeze(-1), z.unsqueeze(-1)


def scale_zero(
    wg: torch.Tensor,
    params: QuantParams,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group of ``wg [out, G, gs]``; see :func:`scale_zero_from_range`."""
    return scale_zero_from_range(*group_range(wg), params, alpha, beta)


class _QDQGroups(torch.autograd.Function):
    """``s * (clamp(round(wg / s + v) + z, 0, maxq) - z)`` with straight-through rounding.

    The same value as the op-by-op autograd expression, with its gradients written out so a tuning
    step makes a few cheap full-size passes over the weight instead of dozens (the qdq dominated
    CPU steps). With ``q`` the clamped code and ``m = [0 < round(x) + z < maxq]`` (``torch.clamp``
    passes no gradient on its bounds, so codes at 0 or ``maxq`` get none, as op by op):

    - ``d/dv = s * m`` and ``d/dwg = m``;
    - ``d/ds = sum_group (q - z) - m * wg / s``;
    - ``d/dz = sum_group s * (m - 1)``.

    ``m`` is kept as a float 0/1 tensor built with float ops: boolean masks cost 5-30x more per
    element on CPU (``masked_fill_`` 5.2 ms vs ``mul`` 0.15 ms on a 2816x1024 weight here).
    Intermediates are reused in place, so a forward allocates three weight-sized tensors, and it makes
    eleven passes over them (the mask from one clamp and one compare, ``d/ds`` in one ``addcmul``).
    """

    @staticmethod
    def forward(ctx, wg, v, s, z, maxq, work):  # type: ignore[override]
        need_wg, need_v, need_s, need_z = ctx.needs_input_grad[:4]
        ctx.inplace = work is not None  # the backward may then consume its saved buffers
        b_ws, b_r, b_m = (work.ws, work.r, work.m) if work is not None else (None, None, None)
        ws = torch.div(wg, s, out=b_ws) if b_ws is not None else wg / s
        if v is not None:
            r = torch.add(ws, v, out=b_r) if b_r is not None else ws + v
        else:
            r = b_r.copy_(ws) if b_r is not None else ws.clone()
        r.round_().add_(z)
        # m = [0 < r < maxq] as float: codes are integers, so clamping to [1, maxq - 1] leaves exactly those
        # unchanged (one scalar clamp, one compare written into float storage; a clamp with z folded into
        # tensor bounds would save the two passes that add and remove z, but runs 8x slower per element).
        m = torch.clamp(r, 1, maxq - 1, out=b_m) if b_m is not None else r.clamp(1, maxq - 1)
        torch.eq(m, r, out=m)
        q = r.clamp_(0, maxq).sub_(z)
        # d/ds per element: (q - z) - m * wg / s, in ws's storage (one fused pass).
        t = torch.addcmul(q, ws, m, value=-1.0, out=ws) if need_s else None
        del ws
        sm = m.mul_(s) if (need_v or need_z or need_wg) else None  # s * m, in m's storage
        out = q.mul_(s)
        ctx.save_for_backward(sm, s, t)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sm, s, t = ctx.saved_tensors
        need_wg, need_v, need_s, need_z = ctx.needs_input_grad[:4]
        g_wg = g_v = g_s = g_z = None
        if need_wg:
            g_wg = grad * (sm / s)
        if need_s:
            g_s = (torch.mul(grad, t, out=t) if ctx.inplace else grad * t).sum(-1, keepdim=True)
        if need_v or need_z:
            g_v = torch.mul(grad, sm, out=sm) if ctx.inplace else grad * sm
            if need_z:  # sum s * (m - 1) * grad = sum(s * m * grad) - s * sum(grad)
                g_z = g_v.sum(-1, keepdim=True) - s * grad.sum(-1, keepdim=True)
            if not need_v:
                g_v = None
        return g_wg, g_v, g_s, g_z, None, None


class QDQWorkspace:
    """Buffers shaped like a grouped weight that :func:`qdq_groups` computes in, step after step.

    On CPU, fresh weight-sized tensors cost page faults on every step (a measurable part of a
    tuning step here); reusing buffers avoids them. The buffers hold the saved tensors of the
    last forward and its backward consumes them in place: one forward, then its backward, then
    the next forward (never ``retain_graph``). A second forward before the first one's backward
    overwrites them, which autograd's version check turns into an error, not wrong gradients.
    The gradient of ``v`` is handed back in one of the buffers: give ``v`` an allocated ``.grad``
    first, so autograd adds into it instead of adopting the buffer.
    """

    def __init__(self, wg: torch.Tensor) -> None:
        self.ws, self.r, self.m = torch.empty_like(wg), torch.empty_like(wg), torch.empty_like(wg)


def qdq_groups(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, v: Optional[torch.Tensor], maxq: int,
               work: Optional[QDQWorkspace] = None) -> torch.Tensor:
    """Quantize-dequantize grouped weights ``wg [out, G, gs]`` with scale/zero ``[out, G, 1]`` and
    rounding offsets ``v`` (same shape as ``wg``, or None = 0); straight-through gradients.

    ``work``: a :class:`QDQWorkspace` to compute in (the result is one of its buffers).
    """
    return _QDQGroups.apply(wg, v, s, z, maxq, work)


def _scaled_groups(weight, params, v, alpha, beta) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W / s + V, s, z)`` per group: the common first half of qdq and of code extraction."""
    wg = group_view(weight, params.group_size)
    s, z = scale_zero(wg, params, alpha, beta)
    x = wg / s
    if v is not None:
        x = x + v.reshape(wg.shape).to(x.dtype)
    return x, s, z


def qdq_weight(
    weight: torch.Tensor,
    params: QuantParams,
    v: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quantize-dequantize ``weight [out, in_]``; differentiable in ``v``, ``alpha``, ``beta``.

    ``v`` has the padded shape ``[out, G * group_size]`` (or is None = 0).
    """
    if params.scheme.endswith("_dq"):
        from auto_round.quant.kquant import qdq_weight_k

        return qdq_weight_k(weight, params, v, alpha, beta)
    out, in_ = weight.shape
    wg = group_view(weight, params.group_size)
    s, z = scale_zero(wg, params, alpha, beta)
    vg = None if v is None else v.reshape(wg.shape).to(wg.dtype)
    return qdq_groups(wg, s, z, vg, params.maxq).reshape(out, -1)[:, :in_]


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor,
    params: QuantParams,
    v: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of ``weight`` with the same arithmetic as :func:`qdq_weight`.

    Returns ``codes`` uint8 ``[out, in_]``, ``scale [out, G]`` in ``params.scale_dtype`` and
    ``zero`` int32 ``[out, G]``, such that ``dequantize(codes, scale, zero)`` equals
    ``qdq_weight(...)`` up to float rounding. The K schemes (``*_dq``) give ``scale = d*sc`` float32 and
    ``zero`` 0 (asym_dq, whose mins this tuple lacks) or ``2^(bits-1)``: their full record, with the
    super-block scales, is :func:`auto_round.quant.kquant.kquant_record`.
    """
    if params.scheme.endswith("_dq"):
        from auto_round.quant.kquant import quantize_weight_k

        return quantize_weight_k(weight, params, v, alpha, beta)[:3]
    out, in_ = weight.shape
    x, s, z = _scaled_groups(weight.float(), params, v, alpha, beta)
    q = (torch.round(x) + z).clamp(0, params.maxq)
    codes = q.reshape(out, -1)[:, :in_].to(torch.uint8)
    return codes, s.squeeze(-1).to(params.scale_dtype), z.squeeze(-1).to(torch.int32)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``scale[o, g] * (codes[o, i] - zero[o, g])`` with ``g = i // group_size``, as float32.

    ``codes [out, in_]``, ``scale``/``zero`` ``[out, G]``.
    """
    in_ = codes.shape[1]
    idx = torch.arange(in_, device=codes.device) // group_size
    s = scale.float()[:, idx]
    z = zero.float()[:, idx]
    return s * (codes.float() - z)
