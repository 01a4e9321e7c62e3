"""GGUF K-quant schemes: double-quantized sub-block scales (and float mins) inside 256-weight super-blocks.

llama.cpp's K types cut a row into super-blocks of 256 weights, each holding ``n = 256 / sub``
sub-blocks (the groups of :mod:`auto_round.quant.qdq`, ``group_size = sub``). Each sub-block's scale
(and min) is itself quantized to a small integer grid against the super-block's fp16 ``d`` (and
``dmin``). Two schemes (``QuantParams.scheme``), one record per K type in :data:`KQUANT_SPECS`:

- ``"asym_dq"`` (Q2_K, Q4_K, Q5_K): ``W' = d*sc * q - dmin*m`` with ``q`` in ``[0, 2^bits - 1]`` and
  ``sc``, ``m`` in ``[0, 2^scale_bits - 1]``: a float min, not an integer zero point.
- ``"sym_dq"`` (Q3_K, Q6_K): ``W' = d*sc * (q - 2^(bits-1))`` with a signed ``sc``.

The tuner sees exactly this grid: per sub-block the float scale ``s`` (and min ``mn = -lo``) come
from the clipped range as in ``asym`` / full-range ``sym``; then ``d = fp16(max s / sc_max)``,
``sc = clamp(round(s / d), 1, sc_max)`` (sign kept for sym), likewise ``dmin`` / ``m``, and the
weight is quantized with ``s' = d*sc`` and ``mn' = dmin*m`` (float32 products, exact). Every round
has a straight-through gradient, so the clip factors ``alpha``/``beta`` tune the quantized scales
and mins, and the rounding offsets ``V`` tune the codes. The record
(:class:`~auto_round.quant.types.QuantizedWeight` with ``kquant`` set) keeps ``d``, ``sc``, ``dmin``,
``m`` and the codes, which the GGUF exporter writes bit for bit; its dequantized weight is computed
in float32 in ggml's order (``(d*sc)*q - dmin*m``), so ggml's dequantization gives the same floats.

``sc >= 1`` and ``d >= 2^-24`` (fp16's smallest subnormal) keep every sub-block scale non-zero, so a
sub-block far smaller than its super-block's largest one still has a grid (ggml allows ``sc = 0``,
which would flatten it to ``-dmin*m``).

Shapes, for a layer ``[out, in_]`` with ``in_ % 256 == 0``: ``G = in_ / sub`` sub-blocks and
``S = in_ / 256`` super-blocks per row; ``d``/``dmin`` ``[out, S]``, ``sc``/``m`` ``[out, G]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Tuple

import torch

from auto_round.quant.qdq import QDQWorkspace, group_range, group_view, qdq_groups, round_ste

if TYPE_CHECKING:  # pragma: no cover
    from auto_round.quant.qdq import QuantParams
    from auto_round.quant.types import QuantizedWeight

SUPER_BLOCK = 256  # QK_K: weights per super-block in every K type
DQ_SCHEMES = ("asym_dq", "sym_dq")
FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): d and dmin never round to 0


@dataclass(frozen=True)
class KQuantSpec:
    """One ggml K type as a tuning scheme."""

    name: str  # ggml type name, lower case: "q4_k"
    bits: int  # code bits
    sub: int  # weights per sub-block (the group size)
    scale_bits: int  # bits of each sub-block scale (and min)
    scheme: str  # "asym_dq" (float min) or "sym_dq" (signed scales, zero 2^(bits-1))

    @property
    def sc_max(self) -> int:
        """Largest sub-block scale: unsigned 2^scale_bits - 1, signed 2^(scale_bits-1) - 1."""
        return 2 ** self.scale_bits - 1 if self.scheme == "asym_dq" else 2 ** (self.scale_bits - 1) - 1

    @property
    def sc_min(self) -> int:
        """Smallest sub-block scale (the signed types reach -2^(scale_bits-1))."""
        return 1 if self.scheme == "asym_dq" else -(2 ** (self.scale_bits - 1))

    @property
    def per_super(self) -> int:
        return SUPER_BLOCK // self.sub


# Layouts as ggml's block_q*_K (ggml-common.h) and gguf.quants read them.
KQUANT_SPECS: Dict[str, KQuantSpec] = {
    "q2_k": KQuantSpec("q2_k", 2, 16, 4, "asym_dq"),
    "q3_k": KQuantSpec("q3_k", 3, 16, 6, "sym_dq"),
    "q4_k": KQuantSpec("q4_k", 4, 32, 6, "asym_dq"),
    "q5_k": KQuantSpec("q5_k", 5, 32, 6, "asym_dq"),
    "q6_k": KQuantSpec("q6_k", 6, 16, 8, "sym_dq"),
}


def spec_of(bits: int, group_size: int, scheme: str) -> KQuantSpec:
    """The K type a double-quant scheme stands for; ValueError naming the valid combinations."""
    for spec in KQUANT_SPECS.values():
        if (spec.bits, spec.sub, spec.scheme) == (bits, group_size, scheme):
            return spec
    valid = ", ".join(f"{s.name}: bits={s.bits} group_size={s.sub} scheme={s.scheme!r}" for s in KQUANT_SPECS.values())
    raise ValueError(f"scheme={scheme!r} with bits={bits} group_size={group_size} is no GGUF K type; valid: {valid}")


def kquant_params(type_name: str) -> "QuantParams":
    """The :class:`QuantParams` tuning one layer as the K type ``type_name`` (``"q4_k"``, ...)."""
    from auto_round.quant.qdq import QuantParams

    spec = KQUANT_SPECS[type_name]
    return QuantParams(bits=spec.bits, group_size=spec.sub, scheme=spec.scheme, scale_dtype=torch.float16)


def is_kquant(obj: object) -> bool:
    """True for a double-quant :class:`QuantParams` or a :class:`QuantizedWeight` holding K blocks."""
    return getattr(obj, "scheme", None) in DQ_SCHEMES or getattr(obj, "kquant", None) is not None


class KScales(NamedTuple):
    """The quantized sub-block grid of a layer (see the module docstring for shapes)."""

    s: torch.Tensor  # [out, G, 1] effective sub-block scale d*sc (float32 products)
    mn: Optional[torch.Tensor]  # [out, G, 1] effective min dmin*m (asym_dq), else None
    d: torch.Tensor  # [out, S] fp16 values (held in the compute dtype)
    sc: torch.Tensor  # [out, G] integer-valued
    dmin: Optional[torch.Tensor]  # [out, S]
    m: Optional[torch.Tensor]  # [out, G]


def _double_quant(x: torch.Tensor, spec: KQuantSpec, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [out, G]`` -> super-block scale ``d [out, S]`` (fp16-rounded) and integers ``k [out, G]``."""
    out, g = x.shape
    xs = x.reshape(out, g // spec.per_super, spec.per_super)
    top = xs.abs().amax(-1) if signed else xs.amax(-1)
    d = (top / spec.sc_max).clamp(min=FP16_TINY).to(torch.float16).to(x.dtype)
    k = round_ste(xs / d.unsqueeze(-1))
    if signed:  # keep the sign, at least 1 in magnitude
        sign = torch.where(xs < 0, -torch.ones_like(xs), torch.ones_like(xs))
        k = torch.where(k.abs() < 1, sign, k).clamp(spec.sc_min, spec.sc_max)
    else:
        k = k.clamp(spec.sc_min, spec.sc_max)
    return d, k.reshape(out, g)


def _min_quant(mn: torch.Tensor, spec: KQuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mins ``[out, G]`` (>= 0) -> ``dmin [out, S]`` and ``m [out, G]`` in ``[0, sc_max]`` (0 allowed)."""
    out, g = mn.shape
    ms = mn.reshape(out, g // spec.per_super, spec.per_super)
    dmin = (ms.amax(-1) / spec.sc_max).to(torch.float16).to(mn.dtype)
    safe = torch.where(dmin > 0, dmin, torch.ones_like(dmin)).unsqueeze(-1)
    m = round_ste(ms / safe).clamp(0, spec.sc_max)
    return dmin, m.reshape(out, g)


def _expand(x: torch.Tensor, spec: KQuantSpec) -> torch.Tensor:
    """Per super-block ``[out, S]`` -> per sub-block ``[out, G]``."""
    return x.repeat_interleave(spec.per_super, dim=1)


def k_scales(lo: torch.Tensor, hi: torch.Tensor, params: "QuantParams", alpha: Optional[torch.Tensor] = None,
             beta: Optional[torch.Tensor] = None) -> KScales:
    """The double-quantized grid from the sub-block ranges ``lo``/``hi`` ``[out, G]``; differentiable
    in ``alpha``/``beta`` (straight-through rounds)."""
    spec = spec_of(params.bits, params.group_size, params.scheme)
    if lo.shape[1] % spec.per_super:
        raise ValueError(f"{spec.name} needs whole super-blocks of {SUPER_BLOCK} weights per row; this row has "
                         f"{lo.shape[1]} sub-blocks of {spec.sub}")
    if alpha is not None:
        lo = lo * alpha
    if beta is not None:
        hi = hi * beta
    if params.scheme == "asym_dq":
        d, sc = _double_quant((hi - lo) / params.maxq, spec, signed=False)
        dmin, m = _min_quant(-lo, spec)
        mn = _expand(dmin, spec) * m
    else:  # full-range sym: the larger-magnitude extreme maps to level -2^(bits-1)
        a, b = -lo, hi
        top = torch.maximum(a, b)
        d, sc = _double_quant(torch.where(a > b, top, -top) / 2 ** (params.bits - 1), spec, signed=True)
        dmin = m = mn = None
    s = _expand(d, spec) * sc
    return KScales(s.unsqueeze(-1), None if mn is None else mn.unsqueeze(-1), d, sc, dmin, m)


def scale_zero_k(lo: torch.Tensor, hi: torch.Tensor, params: "QuantParams", alpha: Optional[torch.Tensor] = None,
                 beta: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` ``[out, G, 1]`` with ``W' = s (q - z)``: ``z = 2^(bits-1)`` for sym_dq, the float
    ``z = mn / s`` for asym_dq (there ``q = clamp(round(W / s + z))``: the zero sits inside the round)."""
    k = k_scales(lo, hi, params, alpha, beta)
    if k.mn is None:
        return k.s, torch.full_like(k.s, float(2 ** (params.bits - 1)))
    return k.s, k.mn / k.s


def qdq_groups_k(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, params: "QuantParams",
                 v: Optional[torch.Tensor], alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                 work: Optional[QDQWorkspace] = None) -> torch.Tensor:
    """Quantize-dequantize ``wg [out, G, sub]`` on the K grid; straight-through gradients for ``v``
    (``wg``-shaped or None), ``alpha``, ``beta``.

    asym_dq: ``s' clamp(round((W + mn') / s' + V), 0, maxq) - mn'`` (the sym qdq of the shifted weight
    with zero 0); sym_dq: the sym qdq with ``s'`` and zero ``2^(bits-1)``.
    """
    k = k_scales(lo, hi, params, alpha, beta)
    if k.mn is None:
        z = torch.full_like(k.s, float(2 ** (params.bits - 1)))
        return qdq_groups(wg, k.s, z, v, params.maxq, work)
    return qdq_groups(wg + k.mn, k.s, torch.zeros_like(k.s), v, params.maxq, None) - k.mn


def qdq_weight_k(weight: torch.Tensor, params: "QuantParams", v: Optional[torch.Tensor] = None,
                 alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`auto_round.quant.qdq.qdq_weight` for the K schemes (``in_ % 256 == 0``, no padding)."""
    out, in_ = weight.shape
    wg = group_view(weight, params.group_size)
    vg = None if v is None else v.reshape(wg.shape).to(wg.dtype)
    return qdq_groups_k(wg, *group_range(wg), params, vg, alpha, beta).reshape(out, in_)


@torch.no_grad()
def quantize_weight_k(weight: torch.Tensor, params: "QuantParams", v: Optional[torch.Tensor] = None,
                      alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Codes and blocks with the arithmetic of :func:`qdq_groups_k`, in float32.

    Returns ``codes`` uint8 ``[out, in_]``, ``scale`` float32 ``[out, G]`` (``d*sc``), ``zero`` int32
    ``[out, G]`` (``2^(bits-1)`` for sym_dq, 0 for asym_dq) and the blocks ``{"d": fp16 [out, S],
    "sc": int16 [out, G]}`` plus ``"dmin"``/``"m"`` (fp16 / uint8) for asym_dq.
    """
    out, in_ = weight.shape
    wg = group_view(weight.float(), params.group_size)
    lo, hi = group_range(wg)
    k = k_scales(lo, hi, params, None if alpha is None else alpha.float(), None if beta is None else beta.float())
    x = wg if k.mn is None else wg + k.mn
    x = x / k.s
    if v is not None:
        x = x + v.reshape(wg.shape).float()
    half = 2 ** (params.bits - 1)
    z = half if k.mn is None else 0
    q = (torch.round(x) + z).clamp(0, params.maxq)
    codes = q.reshape(out, in_).to(torch.uint8)
    blocks = {"d": k.d.to(torch.float16), "sc": k.sc.to(torch.int16)}
    if k.mn is not None:
        blocks.update(dmin=k.dmin.to(torch.float16), m=k.m.to(torch.uint8))
    zero = torch.full(k.sc.shape, z, dtype=torch.int32)
    return codes, k.s.squeeze(-1).float(), zero, blocks


def kquant_record(weight: torch.Tensor, params: "QuantParams", v: Optional[torch.Tensor] = None,
                  alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None) -> "QuantizedWeight":
    """The :class:`QuantizedWeight` of a K-scheme layer (codes, ``d*sc`` scales and the K blocks), on CPU."""
    from auto_round.quant.types import QuantizedWeight

    codes, scale, zero, blocks = quantize_weight_k(weight, params, v, alpha, beta)
    return QuantizedWeight(codes=codes.cpu(), scale=scale.cpu(), zero=zero.cpu(), bits=params.bits,
                           group_size=params.group_size, sym=params.sym,
                           bias=None if bias is None else bias.detach().cpu(),
                           kquant={k: t.cpu() for k, t in blocks.items()})


def kquant_type(qw: "QuantizedWeight") -> KQuantSpec:
    """The K type of a record holding K blocks."""
    return spec_of(qw.bits, qw.group_size, "asym_dq" if "dmin" in (qw.kquant or {}) else "sym_dq")


def dequantize_k(qw: "QuantizedWeight") -> torch.Tensor:
    """float32 ``[out, in_]`` of a K record, in ggml's order: ``(d*sc) * q - dmin*m`` or ``(d*sc) * (q - z)``."""
    blocks = qw.kquant or {}
    spec = kquant_type(qw)
    out, in_ = qw.codes.shape
    s = (_expand(blocks["d"].float(), spec) * blocks["sc"].float()).unsqueeze(-1)
    q = qw.codes.float().reshape(out, -1, spec.sub)
    if "dmin" in blocks:
        mn = (_expand(blocks["dmin"].float(), spec) * blocks["m"].float()).unsqueeze(-1)
        return (s * q - mn).reshape(out, in_)
    return (s * (q - 2 ** (spec.bits - 1))).reshape(out, in_)
