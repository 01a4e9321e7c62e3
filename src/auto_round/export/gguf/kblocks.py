"""ggml's K-quant super-blocks, packed from a K record's tuned codes, sub-block scales, mins and d/dmin.

A row of ``in`` weights is ``in / 256`` super-blocks; ``q[e]`` is the code of the super-block's e-th
weight, ``sc[i]``/``m[i]`` the integer scale/min of its i-th sub-block (as tuned,
:mod:`auto_round.quant.kquant`). Byte layouts (little-endian; ggml's ``block_q*_K`` structs, and
what ``gguf.quants`` reads):

====  =====  ==========================================================================================
type  bytes  layout
====  =====  ==========================================================================================
q2_k  84     scales[16]: sc[i] | m[i] << 4 | qs[64]: e -> byte 32*(e//128) + e%32, bits 2*((e%128)//32)
             | d fp16 | dmin fp16.  w = d*sc*q - dmin*m, 16 sub-blocks of 16
q3_k  110    hmask[32]: bit e//32 of byte e%32 = q[e] >> 2 | qs[64] (low 2 bits, as q2_k)
             | scales[12]: sc+32 as 6 bits, low nibbles in bytes 0-7 (i%8, nibble i//8), high 2 bits in
             bytes 8-11 (i%4, bits 2*(i//4)) | d fp16.  w = d*sc*(q - 4), 16 sub-blocks of 16
q4_k  144    d fp16 | dmin fp16 | scales[12] (below) | qs[128]: e -> byte 32*(e//64) + e%32, nibble
             (e//32)%2.  w = d*sc*q - dmin*m, 8 sub-blocks of 32
q5_k  176    d | dmin | scales[12] | qh[32]: bit e//32 of byte e%32 = q[e] >> 4 | qs[128] as q4_k
q6_k  210    ql[128]: e -> byte 64*(e//128) + e%64, nibble (e%128)//64 | qh[64]: e -> byte
             32*(e//128) + e%32, bits 2*((e%128)//32) = q >> 4 | scales[16] int8 | d fp16.
             w = d*sc*(q - 32), 16 sub-blocks of 16
====  =====  ==========================================================================================

The 12 scale bytes of q4_k/q5_k hold eight 6-bit scales and mins: for ``j < 4`` byte ``j`` = ``sc[j] |
(sc[j+4] >> 4) << 6``, byte ``4+j`` = ``m[j] | (m[j+4] >> 4) << 6``, byte ``8+j`` = ``(sc[j+4] & 15) |
(m[j+4] & 15) << 4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from auto_round.quant.kquant import KQUANT_SPECS, SUPER_BLOCK, kquant_type
from auto_round.quant.types import QuantizedWeight


@dataclass(frozen=True)
class KBlockType:
    """One ggml K type: its block bytes and how ggml/GGUF number it."""

    name: str  # "q4_k"
    type_size: int  # bytes per super-block of 256 weights
    ggml_type: int  # GGMLQuantizationType value


# Numbers as in ggml.h (GGML_TYPE_Q*_K); tests check them against gguf's GGML_QUANT_SIZES.
K_BLOCK_TYPES: Dict[str, KBlockType] = {
    "q2_k": KBlockType("q2_k", 84, 10),
    "q3_k": KBlockType("q3_k", 110, 11),
    "q4_k": KBlockType("q4_k", 144, 12),
    "q5_k": KBlockType("q5_k", 176, 13),
    "q6_k": KBlockType("q6_k", 210, 14),
}


def _fp16(x: torch.Tensor) -> np.ndarray:
    """``[R, S]`` -> ``[R, S, 2]`` uint8 (little-endian fp16)."""
    return x.detach().cpu().to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit fields ``[..., 256]`` -> ``[..., 64]``: weight e in byte ``32*(e//128) + e%32`` at bits
    ``2*((e%128)//32)``."""
    q = q.reshape(*q.shape[:-1], 2, 4, 32).astype(np.uint8)
    return (q[..., 0, :] | q[..., 1, :] << 2 | q[..., 2, :] << 4 | q[..., 3, :] << 6).reshape(*q.shape[:-3], 64)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """1-bit fields ``[..., 256]`` -> ``[..., 32]``: weight e is bit ``e//32`` of byte ``e%32``."""
    b = bits.reshape(*bits.shape[:-1], 8, 32).astype(np.uint8)
    out = np.zeros(b.shape[:-2] + (32,), dtype=np.uint8)
    for k in range(8):
        out |= b[..., k, :] << k
    return out


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    """4-bit fields ``[..., 256]`` -> ``[..., 128]``: sub-blocks of 32 paired, even in the low nibble."""
    q = q.reshape(*q.shape[:-1], 4, 2, 32).astype(np.uint8)
    return (q[..., 0, :] | q[..., 1, :] << 4).reshape(*q.shape[:-3], 128)


def _scales_6bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[..., 8]`` -> the 12 bytes of q4_k/q5_k."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo_sc, hi_sc, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return np.concatenate([lo_sc | (hi_sc >> 4) << 6, lo_m | (hi_m >> 4) << 6, (hi_sc & 15) | (hi_m & 15) << 4], -1)


def _scales_q3(sc: np.ndarray) -> np.ndarray:
    """Sixteen signed scales in ``[-32, 31]`` ``[..., 16]`` -> q3_k's 12 bytes (stored as ``sc + 32``)."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    low = u & 15
    lows = low[..., :8] | low[..., 8:] << 4
    hi = (u >> 4) & 3
    highs = hi[..., 0:4] | hi[..., 4:8] << 2 | hi[..., 8:12] << 4 | hi[..., 12:16] << 6
    return np.concatenate([lows, highs], -1)


def pack_k_blocks(qw: QuantizedWeight) -> np.ndarray:
    """The ggml blocks of a K record: uint8 ``[out, in / 256 * type_size]`` (one row per output).

    ValueError for a record without K blocks or whose row is not whole super-blocks.
    """
    if qw.kquant is None:
        raise ValueError("this layer was not tuned as a GGUF K-quant (no super-block scales); tune it with the "
                         "gguf:*_k format's scheme")
    spec = kquant_type(qw)
    out, in_ = qw.codes.shape
    if in_ % SUPER_BLOCK:
        raise ValueError(f"in_features={in_} is not a multiple of {SUPER_BLOCK}: {spec.name} rows are whole super-blocks")
    n_sb = in_ // SUPER_BLOCK
    kb = K_BLOCK_TYPES[spec.name]
    q = qw.codes.detach().cpu().numpy().astype(np.uint8).reshape(out, n_sb, SUPER_BLOCK)
    blocks = qw.kquant
    sc = blocks["sc"].cpu().numpy().reshape(out, n_sb, spec.per_super)
    d = _fp16(blocks["d"])
    if spec.name == "q2_k":
        m = blocks["m"].cpu().numpy().reshape(out, n_sb, 16)
        parts = [(sc.astype(np.uint8) | m.astype(np.uint8) << 4), _crumbs(q & 3), d, _fp16(blocks["dmin"])]
    elif spec.name == "q3_k":
        parts = [_bit_planes(q >> 2), _crumbs(q & 3), _scales_q3(sc), d]
    elif spec.name in ("q4_k", "q5_k"):
        m = blocks["m"].cpu().numpy().reshape(out, n_sb, 8)
        parts = [d, _fp16(blocks["dmin"]), _scales_6bit_pairs(sc, m)]
        if spec.name == "q5_k":
            parts.append(_bit_planes(q >> 4))
        parts.append(_nibbles_k(q & 15))
    else:  # q6_k
        low = (q & 15).reshape(out, n_sb, 2, 2, 64)
        ql = (low[..., 0, :] | low[..., 1, :] << 4).reshape(out, n_sb, 128)
        qh = _crumbs(q >> 4)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    packed = np.concatenate(parts, axis=-1)
    assert packed.shape[-1] == kb.type_size, (spec.name, packed.shape)
    return np.ascontiguousarray(packed.reshape(out, n_sb * kb.type_size))


assert set(K_BLOCK_TYPES) == set(KQUANT_SPECS)
