"""On-disk layouts of packed integer weights, as data (REFERENCE.md section 4, and the files the
reference and AutoAWQ write).

Every packed checkpoint stores, per quantized Linear with ``G = in / group_size`` groups:

========== ======= =========================================== ===========================================
tensor     dtype   ``gptq`` / ``raw`` layouts                   ``awq`` layout (4-bit only)
========== ======= =========================================== ===========================================
qweight    int32   ``[in * bits / 32, out]``, codes packed      ``[in, out / 8]``, codes packed along the
                   along the input dimension                    output dimension, AWQ word order
qzeros     int32   ``[G, out * bits / 32]``, packed along out   ``[G, out / 8]``, AWQ word order
scales     scale_  ``[G, out]``                                 ``[G, out]`` (fp16 for AWQ engines)
           dtype
bias       fp16    ``[out]`` when the layer has one             same
========== ======= =========================================== ===========================================

Zero points are stored as ``z - 1`` (``gptq``: GPTQ v1's convention, modulo ``2**bits``) or as ``z``
(``raw``, ``awq``). Within a word the ``gptq``/``raw`` layouts are little-endian bitstreams (see
:mod:`auto_round.quant.pack`); AWQ puts output column ``8c + AWQ_ORDER[i]`` in nibble ``i`` of word ``c``.

``packing_format`` names (``quantization_config.packing_format``) map to layouts in
:data:`PACKING_FORMATS`; transformers renames GPTQ and AWQ checkpoints it hands to the auto-round
loader ``auto_round:gptq`` / ``auto_round:awq``. :func:`to_canonical` turns any layout into the
``gptq``-style tensors the inference backends run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from auto_round.quant.pack import PACK_BITS, pack_bits, packed_length, unpack_bits

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
_AWQ_INVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))


@dataclass(frozen=True)
class PackedLayout:
    """How one family of packing formats lays out ``qweight``/``qzeros`` (see the module table)."""

    name: str
    zero_offset: int  # subtracted from z before storing
    along_out: bool  # qweight packed along the output dimension (AWQ)
    bits: Tuple[int, ...]

    def qweight_shape(self, in_features: int, out_features: int, bits: int) -> Tuple[int, int]:
        if self.along_out:
            return in_features, packed_length(out_features, bits)
        return packed_length(in_features, bits), out_features

    def qzeros_shape(self, groups: int, out_features: int, bits: int) -> Tuple[int, int]:
        return groups, packed_length(out_features, bits)

    def cannot_store(self, bits: int, out_features: int) -> Optional[str]:
        """Why this layout cannot hold a layer, or None."""
        if bits not in self.bits:
            return f"the {self.name!r} layout stores bits {self.bits}, not bits={bits}"
        if self.along_out and out_features % 8:
            return f"the {self.name!r} layout packs 8 output columns per word; out_features={out_features} is not a multiple of 8"
        return None


GPTQ = PackedLayout("gptq", zero_offset=1, along_out=False, bits=PACK_BITS)
RAW = PackedLayout("raw", zero_offset=0, along_out=False, bits=PACK_BITS)
AWQ = PackedLayout("awq", zero_offset=0, along_out=True, bits=(4,))

PACKING_FORMATS: Dict[str, PackedLayout] = {
    "auto_round": RAW,
    "auto_round:auto_gptq": GPTQ,
    "auto_round:gptq": GPTQ,
    "auto_round:auto_awq": AWQ,
    "auto_round:awq": AWQ,
}


def layout_for(packing_format: str) -> PackedLayout:
    """The layout of ``packing_format``; ValueError listing the known names."""
    if packing_format not in PACKING_FORMATS:
        raise ValueError(f"unknown packing_format {packing_format!r}; valid: {sorted(PACKING_FORMATS)}")
    return PACKING_FORMATS[packing_format]


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` 4-bit values -> int32 ``[rows, cols / 8]`` in AWQ word order."""
    rows, cols = values.shape
    ordered = values.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols)
    return pack_bits(ordered, 4, dim=1)


def _awq_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    ordered = unpack_bits(packed, 4, dim=1, length=cols)
    return ordered.reshape(rows, cols // 8, 8)[:, :, list(_AWQ_INVERSE)].reshape(rows, cols)


def pack(layout: PackedLayout, codes: torch.Tensor, zero: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` and raw zero points ``[out, G]`` -> ``(qweight, qzeros)`` of ``layout``."""
    stored = (zero.to(torch.int64) - layout.zero_offset) & ((1 << bits) - 1)
    if layout.along_out:
        return _awq_pack(codes.t()), _awq_pack(stored.t())
    return pack_bits(codes.t(), bits, dim=0), pack_bits(stored.t(), bits, dim=1)


def unpack(layout: PackedLayout, qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int,
           out_features: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, qzeros)`` of ``layout`` -> codes int32 ``[in, out]`` and raw zeros int32 ``[G, out]``."""
    if layout.along_out:
        codes, stored = _awq_unpack(qweight, out_features), _awq_unpack(qzeros, out_features)
    else:
        codes = unpack_bits(qweight, bits, dim=0, length=in_features)
        stored = unpack_bits(qzeros, bits, dim=1, length=out_features)
    zeros = (stored + layout.zero_offset) & ((1 << bits) - 1) if layout.zero_offset else stored
    return codes, zeros


def to_canonical(layout: PackedLayout, qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int,
                 out_features: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Any layout -> the ``(qweight, qzeros, zero_offset)`` of the input-packed layouts the backends run
    (no copy for ``gptq``/``raw``)."""
    if not layout.along_out:
        return qweight, qzeros, layout.zero_offset
    codes, zeros = unpack(layout, qweight, qzeros, bits, in_features, out_features)
    return pack_bits(codes, bits, dim=0), pack_bits(zeros, bits, dim=1), 0
