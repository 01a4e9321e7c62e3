"""ggml's legacy block types, written from SignRound's integer codes and scales (pure functions).

Every type stores a row of ``in`` weights as ``in / 32`` blocks of 32 consecutive inputs, i.e. one
block per SignRound group of 32; a block holds the group's fp16 scale ``d`` (and for the ``_1``
types an fp16 offset ``m``) followed by the codes. Byte layouts (little-endian, as in ggml's
``block_q*`` structs and ``gguf.quants``), with ``q[j]`` the code of the block's j-th weight:

======  =====  ==========================================================  ==================
type    bytes  layout                                                      weight
======  =====  ==========================================================  ==================
q4_0    18     d fp16 | qs[16]: byte j = q[j] | q[j+16] << 4                 d * (q - 8)
q4_1    20     d fp16 | m fp16 | qs[16] as q4_0                              d * q + m
q5_0    22     d fp16 | qh u32: bit j = q[j] >> 4 | qs[16] of q & 15          d * (q - 16)
q5_1    24     d fp16 | m fp16 | qh u32 | qs[16] as q5_0                     d * q + m
q8_0    34     d fp16 | qs[32] int8 = q - 128                                d * qs
======  =====  ==========================================================  ==================

SignRound's layer weight is ``scale * (code - zero)`` per group, so:

- ``q4_0``/``q5_0``/``q8_0`` take the sym layers (``zero = 2^(bits-1)``, both sym styles: the
  "full range" and the "gptq" grids differ only in how the scale was chosen): ``d = scale`` and the
  codes as they are. The file holds exactly the tuned weights (``d`` is the fp16 scale itself).
- ``q4_1``/``q5_1`` take the asym layers: ``d = scale`` and ``m = -scale * zero`` rounded once to
  fp16 (``scale * zero`` is exact in fp32: an 11-bit significand times a zero below 32). ggml then
  computes ``d*q + m``, which differs from ``scale * (q - zero)`` by at most the rounding of ``m``:
  ``|error| <= 2^-11 * |scale * zero|`` (half an fp16 ulp; ``2^-25`` absolute below fp16's normal
  range), i.e. under 0.75% (q4_1) / 1.6% (q5_1) of one quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from auto_round.quant.types import QuantizedWeight

BLOCK = 32  # weights per block in every legacy type


@dataclass(frozen=True)
class BlockType:
    """One ggml legacy type: what SignRound scheme it stores and how ggml/GGUF number it."""

    name: str  # "q4_0"
    bits: int
    sym: bool  # True: d*(q - 2^(bits-1)); False: d*q + m
    type_size: int  # bytes per block of 32 weights
    ggml_type: int  # GGMLQuantizationType value (tensor info)
    file_type: int  # LlamaFileType value (general.file_type)

    @property
    def scheme(self) -> str:
        return f"bits={self.bits} group_size={BLOCK} sym={self.sym}"


# Numbers as in ggml.h (GGML_TYPE_*) and llama.h (LLAMA_FTYPE_MOSTLY_*); tests check them against
# the gguf package's GGMLQuantizationType / GGML_QUANT_SIZES / LlamaFileType.
BLOCK_TYPES: Dict[str, BlockType] = {
    "q4_0": BlockType("q4_0", 4, True, 18, 2, 2),
    "q4_1": BlockType("q4_1", 4, False, 20, 3, 3),
    "q5_0": BlockType("q5_0", 5, True, 22, 6, 8),
    "q5_1": BlockType("q5_1", 5, False, 24, 7, 9),
    "q8_0": BlockType("q8_0", 8, True, 34, 8, 7),
}


def layer_problem(bt: BlockType, in_features: int, bits: int, group_size: int, sym: bool) -> Optional[str]:
    """Why a layer of this scheme cannot be stored exactly as ``bt`` (None if it can)."""
    wrong = []
    if bits != bt.bits:
        wrong.append(f"bits={bits}")
    if group_size != BLOCK:
        wrong.append(f"group_size={group_size}")
    if sym != bt.sym:
        wrong.append(f"sym={sym}")
    if wrong:
        return (f"{bt.name} blocks store {bt.scheme} exactly, not {', '.join(wrong)}; "
                f"use {bt.scheme} for gguf:{bt.name}")
    if in_features % BLOCK:
        return (f"in_features={in_features} is not a multiple of {BLOCK} (a row of {bt.name} blocks "
                f"cannot end inside a block)")
    return None


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """``[out, G]`` -> ``[out, G, 2]`` uint8, little-endian fp16."""
    return x.detach().cpu().to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` codes -> ``[..., 16]`` bytes: element j in the low nibble, j + 16 in the high."""
    low = q & 0x0F
    return low[..., :16] | (low[..., 16:] << 4)


def asym_offset(qw: QuantizedWeight) -> torch.Tensor:
    """``m = -scale * zero`` per group, rounded once to fp16 (``[out, G]``); ValueError if it overflows."""
    m = (-(qw.scale.float() * qw.zero.float())).to(torch.float16)
    if not torch.isfinite(m).all():
        raise ValueError("a group's offset -scale*zero overflows fp16; such a layer cannot be a *_1 block")
    return m


def pack_blocks(qw: QuantizedWeight, bt: BlockType) -> np.ndarray:
    """The ggml blocks of ``qw``: uint8 ``[out, in / 32 * bt.type_size]`` (one row per output).

    Raises ValueError when ``qw`` is not exactly representable (see :func:`layer_problem`, plus
    scales that are not fp16 and sym zero points other than ``2^(bits-1)``).
    """
    why = layer_problem(bt, qw.in_features, qw.bits, qw.group_size, qw.sym)
    if why:
        raise ValueError(why)
    if qw.scale.dtype != torch.float16:
        raise ValueError(f"{bt.name} stores fp16 scales, the layer has {qw.scale.dtype}; tune with scale_dtype='fp16'")
    half = 2 ** (bt.bits - 1)
    if bt.sym and not bool((qw.zero == half).all()):
        raise ValueError(f"{bt.name} needs the sym zero point {half} in every group")
    out, in_ = qw.codes.shape
    g = in_ // BLOCK
    q = qw.codes.detach().cpu().numpy().astype(np.uint8).reshape(out, g, BLOCK)
    parts = [_fp16_bytes(qw.scale)]
    if not bt.sym:
        parts.append(_fp16_bytes(asym_offset(qw)))
    if bt.bits == 8:
        parts.append((q.astype(np.int16) - half).astype(np.int8).view(np.uint8))
    else:
        if bt.bits == 5:  # the fifth bits, bit j of a little-endian uint32
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
        parts.append(_nibbles(q))
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == bt.type_size
    return np.ascontiguousarray(blocks.reshape(out, g * bt.type_size))


def permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its output rows reordered (row i of the result is row ``perm[i]``); a row's
    groups move with it, so the record stays exact."""
    perm = perm.to(qw.codes.device)
    kq = None if qw.kquant is None else {k: t[perm] for k, t in qw.kquant.items()}  # K blocks are per row too
    return QuantizedWeight(qw.codes[perm], qw.scale[perm], qw.zero[perm], qw.bits, qw.group_size, qw.sym,
                           None if qw.bias is None else qw.bias[perm], qw.data_type, kq)
