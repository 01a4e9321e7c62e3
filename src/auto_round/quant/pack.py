"""Bit packing of small unsigned integers into int32 words.

Layout: along the packed dimension the values form a little-endian bitstream. Element ``j``
occupies stream bits ``[bits*j, bits*(j+1))``; word ``w`` holds stream bits ``[32w, 32w+32)``,
lowest stream bit in the word's lowest bit. For 2, 4 and 8 bits this is the usual "element ``j``
of a word sits in bits ``[bits*j, bits*(j+1))``"; for 3, 5, 6 and 7 bits values cross word
boundaries (for 3 bits this is GPTQ's layout: 32 values in 3 words).

>>> hex(pack_bits(torch.arange(1, 9), 4, dim=0).item() & 0xFFFFFFFF)
'0x87654321'

The packed length of ``n`` values is ``ceil(n * bits / 32)``. Words are int32 and may be negative
(bit 31 set); both functions work on the 32-bit pattern, in int32 arithmetic throughout (no
widening to int64, so a 4096x4096 layer packs or unpacks without large temporaries).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

PACK_BITS = (2, 3, 4, 5, 6, 7, 8)
_WORD = 32


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return math.ceil(n * bits / _WORD)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits} cannot be packed; use one of {PACK_BITS}")


def _period(bits: int) -> Tuple[int, int]:
    """``(values, words)`` of the smallest run of values that ends exactly on a word boundary."""
    g = math.gcd(bits, _WORD)
    return _WORD // g, bits // g


def _layout(bits: int) -> List[Tuple[int, int, bool]]:
    """Per position ``j`` of one period: ``(word index, bit shift in that word, spills)``.

    A value whose bits do not fit in its word (``shift + bits > 32``) spills its high bits into
    the low bits of the next word.
    """
    n_vals, _ = _period(bits)
    return [
        ((bits * j) // _WORD, (bits * j) % _WORD, (bits * j) % _WORD + bits > _WORD)
        for j in range(n_vals)
    ]


def _split(shape: torch.Size, dim: int) -> Tuple[int, int, int]:
    """``(prod(shape[:dim]), shape[dim], prod(shape[dim+1:]))``."""
    dim = dim % len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along ``dim`` into int32 words.

    ``values``: any integer dtype, shape ``[..., n, ...]`` (``n`` along ``dim``).
    Returns int32 of the same shape with ``n`` replaced by ``ceil(n * bits / 32)``.

    >>> pack_bits(torch.full((8,), 7), 4, dim=0).item() == 0x77777777
    True
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex():
        raise TypeError(f"pack_bits needs an integer tensor, got dtype {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(
            f"values must lie in [0, {(1 << bits) - 1}] for bits={bits}; "
            f"got range [{int(values.min())}, {int(values.max())}]"
        )
    pre, n, post = _split(values.shape, dim)
    n_vals, n_words = _period(bits)
    n_periods = math.ceil(n / n_vals)
    v = values.to(torch.int32).reshape(pre, n, post)
    v = torch.nn.functional.pad(v, (0, 0, 0, n_periods * n_vals - n))
    v = v.reshape(pre, n_periods, n_vals, post)
    words = torch.zeros(pre, n_periods, n_words, post, dtype=torch.int32, device=v.device)
    # int32 shifts wrap: a value shifted into bit 31 gives the negative int32 with that pattern.
    for j, (word, shift, spill) in enumerate(_layout(bits)):
        words[:, :, word] |= v[:, :, j] << shift
        if spill:
            words[:, :, word + 1] |= v[:, :, j] >> (_WORD - shift)
    words = words.reshape(pre, n_periods * n_words, post)[:, : packed_length(n, bits)]
    out_shape = list(values.shape)
    out_shape[dim] = words.shape[1]
    return words.reshape(out_shape).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words along ``dim`` -> ``length`` values.

    ``packed``: int32 ``[..., ceil(length * bits / 32), ...]``. Returns int32 ``[..., length, ...]``
    with values in ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_bits needs int32 words, got dtype {packed.dtype}")
    pre, n_in, post = _split(packed.shape, dim)
    need = packed_length(length, bits)
    if n_in < need:
        raise ValueError(
            f"{n_in} words along dim {dim} hold fewer than length={length} values of "
            f"{bits} bits (need {need} words)"
        )
    n_vals, n_words = _period(bits)
    n_periods = math.ceil(n_in / n_words)
    w = packed.reshape(pre, n_in, post)
    w = torch.nn.functional.pad(w, (0, 0, 0, n_periods * n_words - n_in))
    w = w.reshape(pre, n_periods, n_words, post)
    mask = (1 << bits) - 1
    if n_words == 1:  # 2, 4, 8 bits: one broadcast shift over the whole period
        shifts = torch.arange(0, _WORD, bits, dtype=torch.int32, device=w.device)
        v = (w >> shifts.view(1, 1, -1, 1)).bitwise_and_(mask)
    else:
        parts = []
        for word, shift, spill in _layout(bits):
            # >> is arithmetic on int32: keep only the bits that came from this word.
            low = (w[:, :, word] >> shift) & (((1 << (_WORD - shift)) - 1) if spill else mask)
            if spill:
                low = low | ((w[:, :, word + 1] << (_WORD - shift)) & mask)
            parts.append(low)
        v = torch.stack(parts, dim=2)
    v = v.reshape(pre, n_periods * n_vals, post)[:, :length]
    out_shape = list(packed.shape)
    out_shape[dim] = length
    return v.reshape(out_shape).contiguous()
