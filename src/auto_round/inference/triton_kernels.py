"""A Triton kernel for packed weight-only quantized matmuls: ``y = x @ W^T`` with ``W`` dequantized
tile by tile inside the kernel, never as a whole tensor in memory.

It reads the checkpoint layout the ``"torch"`` backend reads (:class:`~auto_round.inference.backends.
PackedTensors` after ``_torch_prepare``): ``qweight`` int32 ``[ceil(in*bits/32), out]`` with codes packed
along the input dimension (``32 // bits`` per word, lowest bits first), raw ``zeros`` int32 ``[G, out]``
and ``scales`` ``[G, out]``, ``G = ceil(in / group_size)``. So it runs the widths torch's tinygemm
kernel does not (bits 2 and 8, any group size, ``in_features`` that do not divide into groups, odd
``out_features``). Each weight is ``(code - z) * scale`` in float32, rounded once to the input's dtype
(the value :func:`~auto_round.inference.backends.dequantize_packed` gives, in the dtype the ``"torch"``
backend multiplies in); products accumulate in float32, fp32 inputs in IEEE fp32 (no TF32).

Triton is imported on first use only (:func:`triton_available`); with ``TRITON_INTERPRET=1`` set before
that, the same kernel runs on CPU tensors in Triton's interpreter, which is how the test suite checks it
without a GPU (``tests/test_backends_cuda.py``).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, Dict

import torch

# Tile sizes: rows of x (tokens), output features, input features per step. tl.dot needs every
# dimension >= 16. Not tuned on a GPU yet (no device lent so far): bench/bench_qlinear.py --device
# cuda measures them against tinygemm and dequantize + cuBLAS.
BLOCK_N = 64
BLOCK_K = 32
TRITON_BITS = (2, 4, 8)  # codes never cross a 32-bit word


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it ships with torch's CUDA wheels on Linux)."""
    return importlib.util.find_spec("triton") is not None


def _block_m(tokens: int) -> int:
    return 16 if tokens <= 16 else 32 if tokens <= 32 else 64


@functools.lru_cache(maxsize=1)
def _kernel() -> Callable[..., Any]:
    """The jitted kernel, built on first use (so TRITON_INTERPRET set by then takes effect)."""
    import triton
    import triton.language as tl

    @triton.jit
    def wq_matmul(x_ptr, qw_ptr, z_ptr, s_ptr, y_ptr, M, N, K,
                  sxm, sxk, sqk, sqn, szg, szn, ssg, ssn, sym, syn,
                  GROUP: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            kn_ok = k_ok[:, None] & n_ok[None, :]
            words = tl.load(qw_ptr + (rk // PER)[:, None] * sqk + rn[None, :] * sqn, mask=kn_ok, other=0)
            codes = (words >> ((rk % PER) * BITS)[:, None]) & MASK
            g = rk // GROUP
            z = tl.load(z_ptr + g[:, None] * szg + rn[None, :] * szn, mask=kn_ok, other=0)
            s = tl.load(s_ptr + g[:, None] * ssg + rn[None, :] * ssn, mask=kn_ok, other=0.0)
            w = ((codes - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)  # [BK, BN], masked to 0
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return wq_matmul


def wq_matmul(state: Dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """``x [..., in] @ W^T -> [..., out]`` in ``x``'s dtype; ``state`` as ``"torch"``'s prepare gives it
    (``qweight``, raw ``zeros``, ``scales``, ``bits``, ``group_size``, ``in_features``), on ``x``'s device."""
    import triton

    bits = state["bits"]
    if bits not in TRITON_BITS:
        raise ValueError(f"the Triton kernel reads bits {TRITON_BITS}, not bits={bits}; use backend='torch'")
    qweight, zeros, scales = state["qweight"], state["zeros"], state["scales"]
    k, n = state["in_features"], scales.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] != k:
        raise ValueError(f"input has {x2.shape[1]} features, the layer takes in_features={k}")
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bm = _block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    _kernel()[grid](x2, qweight, zeros, scales, y, m, n, k,
                    x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
                    zeros.stride(0), zeros.stride(1), scales.stride(0), scales.stride(1),
                    y.stride(0), y.stride(1),
                    GROUP=state["group_size"], BITS=bits, IEEE=x.dtype == torch.float32,
                    BM=bm, BN=BLOCK_N, BK=BLOCK_K)
    return y.reshape(*x.shape[:-1], n)
