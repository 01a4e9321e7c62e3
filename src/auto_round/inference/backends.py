"""Inference backends for packed weight-only quantized linear layers, as data records.

Every backend is a :class:`Backend` record: where it runs, which layers it can run, how it
prepares the checkpoint tensors once (:attr:`Backend.prepare`) and how it multiplies
(:attr:`Backend.matmul`). :func:`select_backend` picks the highest-priority backend that can run a
layer, or checks an explicitly requested one and explains why it cannot.

Built-in backends (``"auto"`` tries them from the top):

- ``"cpu_int4"`` (priority 10): torch's own CPU int4 kernels
  (``aten._convert_weight_to_int4pack_for_cpu`` and ``aten._weight_int4pack_mm_for_cpu``).
  Constraints, found by experiment on torch 2.14: bits 4; group size 32, 64, 128 or 256;
  ``out_features % 16 == 0``; input dtypes bf16, fp16, fp32 (scales and zeros must have the
  input's dtype; the input must be 2-D and contiguous). The kernel needs whole groups, so a
  layer whose ``in_features`` is not a multiple of the group size (a padded last group, as
  other writers store it) has its weight padded at prepare time with codes equal to the zero
  point and its input padded with zero columns at call time. The kernel dequantizes as
  ``(q - 8) * scale + zero_term``, so ``zero_term = scale * (8 - z)``. Memory: about the packed
  size again (its own int4 copy). Calls with more tokens than :data:`CPU_INT4_MAX_TOKENS` for
  their dtype (64 for bf16, 2 for fp32; fp16 never uses the kernel: slower at any count on the
  CPU measured) go through the ``"torch"`` path.
- ``"cuda_int4"`` (priority 10, CUDA, compute capability 8.0+): torch's tinygemm kernel
  (``aten._convert_weight_to_int4pack`` / ``aten._weight_int4pack_mm``), bf16 inputs. Bits 4; group
  size 32, 64, 128 or 256; ``out_features % 8 == 0``; a padded last group is padded at prepare time as
  for ``cpu_int4``. Same ``(q - 8) * scale + zero_term`` dequantization, scales and zero terms held in
  bf16 (the kernel's dtype: the dequantized weight then differs from the ``"torch"`` path's by bf16
  rounding of the scales). fp16/fp32 inputs, which tinygemm does not take, go through the Triton
  kernel (or the ``"torch"`` path without Triton).
- ``"triton"`` (priority 5, CUDA): :mod:`auto_round.inference.triton_kernels`, a Triton kernel that
  dequantizes the checkpoint's packed words tile by tile while it multiplies; bits 2, 4 and 8, any
  group size, any ``in_features``/``out_features``; weights bit-identical to the ``"torch"`` path's,
  products summed in float32. The widths tinygemm does not cover.
  Neither CUDA backend has been run on a GPU by this project yet: their tests are marked ``gpu``
  (``tests/test_backends_cuda.py``); the Triton kernel's arithmetic is checked on CPU in Triton's
  interpreter.
- ``"torch"`` (priority 0): any device, bits 2-8, any group size, padded last groups. Each call
  unpacks and dequantizes the weight (codes turned into floats by bit tricks, in place) and runs
  ``F.linear`` in the input's dtype. On CPU, bf16/fp16 calls do this block by block of output
  features (blocks of :data:`CPU_BLOCK_WEIGHTS` weights, two scratch buffers reused: 4 MiB
  int32 plus the block in the input dtype); fp32 calls and other devices take the layer in one
  block. Memory: the checkpoint's packed buffers plus the unpacked zeros, and per call those
  temporaries. The weight equals :func:`dequantize_packed` rounded to the input dtype bit for
  bit. The output, against the former whole-layer ``F.linear(x, dequantize_packed(...)
  .to(x.dtype))``: fp32 bit-identical by construction (the same single GEMM call); bf16 within
  bf16 rounding of the output (measured equal on every shape and token count tried, MKL/oneDNN;
  a GEMM over fewer columns is not promised to round alike); fp16 within 2**-10 of the output's
  max (the ``[out, in]`` weight order it gets for speed sums in another order; see
  ``_OUT_MAJOR_DTYPES``).
- ``"torch_cached"`` (opt-in: never chosen by ``"auto"``; ask for it by name, e.g.
  ``load_quantized(path, backend="torch_cached")`` or ``QuantLinear(..., backend="torch_cached")``):
  on its first forward, dequantizes the whole weight once into that call's dtype and keeps it;
  every call is then a plain ``F.linear`` (dense matmul speed). Memory: the packed buffers plus
  a full ``[out, in]`` weight in the input dtype (a call in another dtype replaces it). Same
  weight, bit for bit, as ``"torch"``; in fp32 also its memory order, so the same outputs as the
  former whole-layer path; bf16/fp16 store it row-major (faster GEMM), outputs as for ``"torch"``
  within half-precision rounding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from auto_round.inference import triton_kernels
from auto_round.quant.pack import unpack_bits

logger = logging.getLogger(__name__)

State = Dict[str, Any]  # what a backend keeps per layer: tensors and ints
ANY_DEVICE = "*"


class PackedTensors(NamedTuple):
    """The checkpoint tensors of one quantized linear layer (``G = ceil(in / group_size)``).

    - ``qweight``: int32 ``[ceil(in*bits/32), out]``, codes packed along the input dimension.
    - ``qzeros``: int32 ``[G, ceil(out*bits/32)]``, stored zeros packed along the output dimension.
    - ``scales``: float ``[G, out]`` (fp16 on disk; may be negative).
    - ``zero_offset``: what was subtracted from the zero point before storing (1 for the GPTQ
      ``z - 1`` convention, 0 for raw zeros).
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    zero_offset: int


def unpack_codes(p: PackedTensors) -> torch.Tensor:
    """Integer codes, int32 ``[in, out]``."""
    return unpack_bits(p.qweight, p.bits, dim=0, length=p.in_features)


def unpack_zeros(p: PackedTensors) -> torch.Tensor:
    """Raw zero points ``z`` (stored value plus ``zero_offset``), int32 ``[G, out]``."""
    stored = unpack_bits(p.qzeros, p.bits, dim=1, length=p.out_features)
    # The GPTQ v1 convention stores z - 1 modulo 2**bits; undo the wrap as the writers intend.
    return (stored + p.zero_offset) & ((1 << p.bits) - 1) if p.zero_offset else stored


@dataclass(frozen=True)
class Backend:
    """One way to run a packed quantized linear layer.

    ``devices``: device types (``"cpu"``, ``"cuda"``, ...) or ``"*"`` for any.
    ``group_size_ok``: predicate on the group size, described by ``group_size_rule``.
    ``shape_check(group_size, in_features, out_features)``: None, or why the shape is refused.
    ``prepare``: checkpoint tensors -> what :attr:`matmul` needs (run once per layer).
    ``matmul(state, x)``: ``x [..., in]`` -> ``[..., out]`` without bias (it may add to
    ``state``, as the cached and dtype-cast tensors do).
    ``auto``: False for opt-in backends, which ``select_backend("auto")`` never picks.
    """

    name: str
    devices: Tuple[str, ...]
    bits: Tuple[int, ...]
    priority: int
    group_size_ok: Callable[[int], bool]
    group_size_rule: str
    shape_check: Callable[[int, int, int], Optional[str]]
    is_available: Callable[[], bool]
    prepare: Callable[[PackedTensors], State]
    matmul: Callable[[State, torch.Tensor], torch.Tensor]
    input_dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None = any float dtype
    auto: bool = True  # False: used only when asked for by name, never picked by "auto"
    description: str = ""

    def cannot_run(
        self, device_type: str, bits: int, group_size: int, in_features: int, out_features: int
    ) -> Optional[str]:
        """None when this backend can run the layer, else a human-readable reason."""
        if ANY_DEVICE not in self.devices and device_type not in self.devices:
            return f"runs on {self.devices}, not on device type {device_type!r}"
        if not self.is_available():
            return "its kernels are not available in this torch build"
        if bits not in self.bits:
            return f"supports bits {self.bits}, not bits={bits}"
        if not self.group_size_ok(group_size):
            return f"needs group_size {self.group_size_rule}, got {group_size}"
        return self.shape_check(group_size, in_features, out_features)


# ----------------------------------------------------------------------------------------------
# "torch": portable reference backend


def _torch_prepare(p: PackedTensors) -> State:
    zeros = unpack_zeros(p)
    return {
        "qweight": p.qweight,
        "zeros": zeros,
        "scales": p.scales,
        "bits": p.bits,
        "group_size": p.group_size,
        "in_features": p.in_features,
    }


def dequantize_packed(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Dequantized weight, float32 ``[out, in]``.

    ``qweight`` int32 ``[ceil(in*bits/32), out]``, raw ``zeros`` int32 ``[G, out]``, ``scales``
    ``[G, out]``. Computed in float32 so that the result rounds once into the input's dtype, as
    the in-memory fake-quantized weight does.
    """
    codes = unpack_bits(qweight, bits, dim=0, length=in_features)  # [in, out]
    groups, out_features = scales.shape
    if in_features % group_size == 0:  # broadcast over [G, group_size, out] without a gather
        codes = codes.view(groups, group_size, out_features)
        w = (codes - zeros.unsqueeze(1)).float().mul_(scales.float().unsqueeze(1))
        return w.view(in_features, out_features).t()
    idx = torch.arange(in_features, device=codes.device) // group_size
    return ((codes - zeros[idx]).float() * scales.float()[idx]).t()


# bf16/fp16 calls on CPU dequantize this many weights at a time (a block of output features), into
# two scratch buffers reused across the blocks (4 MiB int32 + the block in the input dtype): a call
# neither page-faults fresh whole-layer temporaries (where the former whole-layer dequantize spent
# most of its ~140 ms on a 4096x4096 layer) nor streams them through DRAM. Measured on one thread,
# bf16, 1 and 128 tokens, 4096x4096 and SmolLM2 shapes (576x576 .. 49152x576): 2**20 weights (256
# output features of a 4096-input layer) was fastest or within noise; 2**18 was 1.2-1.7x and 2**17
# 1.4-3x slower (per-op overhead), 2**21 no faster. Other devices take the layer in one block.
CPU_BLOCK_WEIGHTS = 1 << 20

# float32 bit pattern of 2**23: OR-ing an integer 0 <= c < 2**23 into its mantissa gives the
# float 2**23 + c exactly, so codes become floats without a conversion pass.
_F32_2POW23_BITS = 0x4B000000
_F32_2POW23 = float(1 << 23)


# Memory order of the dequantized weight handed to F.linear, per input dtype. fp32, bf16 (and
# fp64) keep the whole-layer dequantize's order, ``[in, out]`` storage seen as ``[out, in]``: MKL's
# fp32 GEMM rounds differently for the two orders (measured: half the shapes tried differ in the
# last bits), bf16 gave equal results either way, and this order dequantizes ~2x faster (the
# unpack shifts run along a long contiguous dimension). fp16 gets ``[out, in]`` storage: oneDNN's
# CPU fp16 GEMM with a transposed weight ran ~40-50x slower (one token through 4096x4096 on one
# thread: 101 ms vs 2.3 ms; 16 tokens: 1.6 s vs 32 ms), and its sums then differ from the
# transposed order's in the last fp16 bits (relative max error <= 2**-11 of the output's max).
_OUT_MAJOR_DTYPES = (torch.float16,)

# Input dtypes whose calls run block by block. fp32 (and fp64) dequantize the whole layer in one
# block, so that the single F.linear is the former path's GEMM call exactly and fp32 results are
# bit-identical to it by construction: a GEMM over fewer output columns may round differently
# (measured: out=50, in=100, 3-D input, blocks of 32 rows differed from the one call by 4e-6).
_BLOCKED_DTYPES = (torch.float16, torch.bfloat16)


def _block_rows(device: torch.device, in_features: int, out_features: int) -> int:
    """Output features per block: a multiple of 16 near ``CPU_BLOCK_WEIGHTS / in`` on CPU."""
    if device.type != "cpu":
        return out_features
    rows = max(16, (CPU_BLOCK_WEIGHTS // max(1, in_features)) // 16 * 16)
    return min(out_features, rows)


def _codes_as_floats(qweight: torch.Tensor, bits: int, in_features: int, out_major: bool,
                     scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``2**23 + code`` as float32 from input-packed words ``[ceil(in*bits/32), rows]`` (a column
    slice of a checkpoint's ``qweight``): ``[rows, in]`` when ``out_major``, else ``[in, rows]``.
    ``scratch``: an int32 buffer of at least ``words * 32 // bits * rows`` elements to write into
    (2, 4 and 8 bits)."""
    words, rows = qweight.shape
    if 32 % bits:  # 3, 5, 6, 7 bits: values cross word boundaries
        if out_major:
            codes = unpack_bits(qweight.t(), bits, dim=1, length=in_features)
        else:
            codes = unpack_bits(qweight, bits, dim=0, length=in_features)
    else:  # 2, 4, 8 bits: one broadcast shift over each word
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
        if out_major:
            src, shifts = qweight.t().unsqueeze(2), shifts.view(1, 1, -1)
            shape = (rows, words, per_word)
        else:
            src, shifts = qweight.unsqueeze(1), shifts.view(1, -1, 1)
            shape = (words, per_word, rows)
        if scratch is None:  # (an explicit out: TensorIterator would follow src's strides)
            scratch = torch.empty(math.prod(shape), dtype=torch.int32, device=qweight.device)
        codes = torch.bitwise_right_shift(src, shifts, out=scratch[: math.prod(shape)].view(shape))
        if out_major:
            codes = codes.view(rows, -1)[:, :in_features]
        else:
            codes = codes.view(-1, rows)[:in_features]
        codes.bitwise_and_((1 << bits) - 1)
    return codes.bitwise_or_(_F32_2POW23_BITS).view(torch.float32)


def dequantize_rows(state: State, start: int, stop: int, out_major: bool = False,
                    scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``start:stop`` of the dequantized weight ``W [out, in]``, float32, stored ``[rows, in]``
    (``out_major``) or as the transpose of ``[in, rows]`` storage (the order of
    :func:`dequantize_packed`).

    Bit-identical to the same rows of :func:`dequantize_packed`, i.e. ``float(code - z) * scale``
    rounded once: ``(2**23 + code) - (2**23 + z)`` is exact in float32, as ``code - z`` is there.
    ``scratch``: an int32 buffer to reuse (see :func:`_codes_as_floats`); the result then lives
    in it.
    """
    in_features, group_size = state["in_features"], state["group_size"]
    qweight = state["qweight"][:, start:stop]
    w = _codes_as_floats(qweight, state["bits"], in_features, out_major, scratch)
    zeros = state["zeros"][:, start:stop].float().add_(_F32_2POW23)  # [G, rows], small
    scales = state["scales"][:, start:stop].float()
    groups, rows = scales.shape
    full = min(groups, in_features // group_size)  # groups with all group_size inputs
    body = full * group_size
    if out_major:  # w [rows, in]
        zeros, scales = zeros.t(), scales.t()
        if full:
            grouped = w[:, :body].view(rows, full, group_size)
            grouped.sub_(zeros[:, :full, None]).mul_(scales[:, :full, None])
        if body < in_features:  # a padded last group (checkpoints of other writers)
            w[:, body:].sub_(zeros[:, full:]).mul_(scales[:, full:])
        return w
    if full:  # w [in, rows]
        w[:body].view(full, group_size, rows).sub_(zeros[:full, None]).mul_(scales[:full, None])
    if body < in_features:
        w[body:].sub_(zeros[full]).mul_(scales[full])
    return w.t()


def _cast_into(w: torch.Tensor, buffer: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``w`` (``[rows, in]``, row-major or a transposed view) in ``dtype``, same memory order,
    written into the flat ``buffer`` when one is given."""
    if w.dtype == dtype:
        return w
    if buffer is None:
        return w.to(dtype)
    if w.stride(-1) == 1:
        return buffer[: w.numel()].view(w.shape).copy_(w)
    return buffer[: w.numel()].view(w.shape[1], w.shape[0]).copy_(w.t()).t()


def _torch_matmul(state: State, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` per block of output features (rows of ``W``), each block dequantized just
    before its matmul.

    Each block's weight equals the same rows of ``dequantize_packed(...).to(x.dtype)`` bit for
    bit, in that tensor's memory order except in fp16 (see ``_OUT_MAJOR_DTYPES``). Only bf16/fp16
    calls on CPU are split (see ``_BLOCKED_DTYPES``); the blocked bf16 results have equalled the
    whole-layer ``F.linear`` for every shape, block width and token count tried (see
    tests/test_backends_speedpaths.py). Scratch buffers are reused across blocks unless autograd
    would save a block's weight for the backward pass.
    """
    in_features = state["in_features"]
    out_features = state["scales"].shape[1]
    out_major = x.dtype in _OUT_MAJOR_DTYPES
    rows = _block_rows(x.device, in_features, out_features)
    if x.dtype not in _BLOCKED_DTYPES or rows >= out_features:
        w = dequantize_rows(state, 0, out_features, out_major)
        return F.linear(x, _cast_into(w, None, x.dtype))
    scratch = cast = None
    if not (torch.is_grad_enabled() and x.requires_grad):  # reuse two buffers across blocks
        bits = state["bits"]
        if 32 % bits == 0:
            words = state["qweight"].shape[0]
            scratch = torch.empty(words * (32 // bits) * rows, dtype=torch.int32, device=x.device)
        cast = torch.empty(in_features * rows, dtype=x.dtype, device=x.device)
    blocks = []
    for start in range(0, out_features, rows):
        w = dequantize_rows(state, start, min(out_features, start + rows), out_major, scratch)
        blocks.append(F.linear(x, _cast_into(w, cast, x.dtype)))
    return torch.cat(blocks, dim=-1)


TORCH = Backend(
    name="torch",
    devices=(ANY_DEVICE,),
    bits=(2, 3, 4, 5, 6, 7, 8),
    priority=0,
    group_size_ok=lambda gs: gs > 0,
    group_size_rule="> 0",
    shape_check=lambda gs, i, o: None,
    is_available=lambda: True,
    prepare=_torch_prepare,
    matmul=_torch_matmul,
    description="blocked unpack + dequantize + F.linear; any device, packed-size memory",
)


# ----------------------------------------------------------------------------------------------
# "torch_cached": dequantize once, then plain F.linear (opt-in: memory for speed)


# The cached weight is stored ``[out, in]`` (row-major) for these dtypes: F.linear with it ran
# 3.6 ms vs 5.5 ms with the transposed order for one bf16 token through 4096x4096 on one thread.
# fp32 keeps the former order, so that its outputs stay bit-identical to the former path.
_CACHED_OUT_MAJOR_DTYPES = (torch.float16, torch.bfloat16)


def _cached_weight(state: State, dtype: torch.dtype) -> torch.Tensor:
    """The whole dequantized weight ``[out, in]`` in ``dtype``, built block by block (no
    whole-layer float32 temporary)."""
    in_features, out_features = state["in_features"], state["scales"].shape[1]
    device = state["qweight"].device
    out_major = dtype in _CACHED_OUT_MAJOR_DTYPES
    if out_major:
        weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
    else:
        weight = torch.empty(in_features, out_features, dtype=dtype, device=device).t()
    rows = _block_rows(device, in_features, out_features)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        weight[start:stop] = dequantize_rows(state, start, stop, out_major)
    return weight


def _torch_cached_matmul(state: State, x: torch.Tensor) -> torch.Tensor:
    weight = state.get("weight")
    if weight is None or weight.dtype != x.dtype:  # first call, or the input dtype changed
        state["weight"] = weight = None  # drop the old copy before building the new one
        # A normal tensor even when the first call runs under inference_mode, so that a later
        # call with autograd on may save it for the backward pass.
        with torch.inference_mode(False), torch.no_grad():
            state["weight"] = weight = _cached_weight(state, x.dtype)
    return F.linear(x, weight)


# The torch backend's layers, prepared the same way, with a matmul that keeps the dequantized weight.
TORCH_CACHED = replace(
    TORCH,
    name="torch_cached",
    priority=-10,
    matmul=_torch_cached_matmul,
    auto=False,
    description="dequantize once (first forward, its dtype) + F.linear; opt-in, weight-size memory",
)


# ----------------------------------------------------------------------------------------------
# "cpu_int4": torch's CPU int4 weight-only kernels

_CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
_CPU_INT4_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def _cpu_int4_shape(group_size: int, in_features: int, out_features: int) -> Optional[str]:
    # in_features need not divide into groups: a padded last group is padded to group_size at
    # prepare time (see _cpu_int4_prepare).
    if out_features % 16:
        return f"needs out_features % 16 == 0, got out_features={out_features}"
    return None


def _int4_kernel_operands(p: PackedTensors) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """What torch's int4 kernels (CPU and tinygemm) take: codes int32 ``[out, G * group_size]`` and
    ``[G, out, 2]`` float32 (scale, zero term), and the padded input width.

    A padded last group (G = ceil(in / group_size)): the kernels need whole groups, so the missing input
    columns get code = z (weight exactly 0 after dequantization) and the input gets zero columns at call
    time: they add nothing to any output. The kernels dequantize as ``(q - 8) * scale + zero_term``."""
    codes = unpack_codes(p).t()  # [out, in] int32
    zeros = unpack_zeros(p)  # [G, out]
    padded = p.scales.shape[0] * p.group_size  # G * group_size >= in_features
    if padded > p.in_features:
        fill = zeros[-1].unsqueeze(1).expand(p.out_features, padded - p.in_features)
        codes = torch.cat([codes, fill], dim=1)
    scales = p.scales.float()
    zero_term = scales * (8 - zeros.float())
    return codes, torch.stack([scales, zero_term], dim=-1).contiguous(), padded


def _cpu_int4_prepare(p: PackedTensors) -> State:
    codes, scales_and_zeros, padded = _int4_kernel_operands(p)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # [out, K/2]
    return {
        "packed": packed,
        "group_size": p.group_size,
        "pad_inputs": padded - p.in_features,
        "sz_float32": scales_and_zeros,
        "dequant": _torch_prepare(p),  # references the checkpoint buffers: no copy of the weight
    }


# Largest token count per call that the int4 kernel serves; above it the "torch" path
# (dequantize + F.linear) is faster. Measured against that path (bench/bench_qlinear.py
# --crossover, bench/results/qlinear.json: 4096x4096 W4G128, torch 2.14, AVX512 CPU, 1 thread,
# medians; 2 threads alike): bf16: the kernel wins up to 32 tokens (12.6 vs 20.1 ms at 32), about
# ties at 64 (27.2 vs 26.0) and loses from 96 (37.5 vs 28.2; 51.7 vs 39.8 at 128). fp16: it loses
# at every count (1 token 31.0 vs 22.1 ms, 2 tokens 69.3 vs 23.9), 0 = never. fp32, whose "torch"
# path dequantizes the layer in one block: it wins at 1 token (28.9 vs 49.9) and about ties at 2.
# (Against the former ~140 ms dequantize, the bf16/fp16 limit had been 256.)
CPU_INT4_MAX_TOKENS = {torch.bfloat16: 64, torch.float16: 0, torch.float32: 2}


def _cpu_int4_uses_kernel(x: torch.Tensor) -> bool:
    tokens = x.numel() // max(1, x.shape[-1])
    return tokens <= CPU_INT4_MAX_TOKENS.get(x.dtype, 0)


def _cpu_int4_matmul(state: State, x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _CPU_INT4_DTYPES:
        raise TypeError(
            f"backend 'cpu_int4' takes inputs of dtype {_CPU_INT4_DTYPES}, got {x.dtype}; "
            "cast the model (e.g. torch_dtype=torch.bfloat16) or use backend='torch'"
        )
    if not _cpu_int4_uses_kernel(x):
        return _torch_matmul(state["dequant"], x)
    key = f"sz_{str(x.dtype).split('.')[-1]}"
    if key not in state:  # the kernel wants scales/zeros in the input's dtype; cast once
        state[key] = state["sz_float32"].to(x.dtype)
    out_features = state["packed"].shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if state["pad_inputs"]:
        x2 = F.pad(x2, (0, state["pad_inputs"]))  # zero inputs for the padded weight columns
    x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2, state["packed"], state["group_size"], state[key]
    )
    return y.reshape(*x.shape[:-1], out_features)


CPU_INT4 = Backend(
    name="cpu_int4",
    devices=("cpu",),
    bits=(4,),
    priority=10,
    group_size_ok=lambda gs: gs in _CPU_INT4_GROUP_SIZES,
    group_size_rule=f"in {_CPU_INT4_GROUP_SIZES}",
    shape_check=_cpu_int4_shape,
    is_available=_cpu_int4_available,
    prepare=_cpu_int4_prepare,
    matmul=_cpu_int4_matmul,
    input_dtypes=_CPU_INT4_DTYPES,
    description="torch aten int4 CPU kernels; 4 bits only",
)


# ----------------------------------------------------------------------------------------------
# "triton": a Triton kernel dequantizing tile by tile (CUDA; see auto_round.inference.triton_kernels)


def _triton_available() -> bool:
    return torch.cuda.is_available() and triton_kernels.triton_available()


def _triton_prepare(p: PackedTensors) -> State:
    state = _torch_prepare(p)
    state["qweight"] = state["qweight"].contiguous()
    return state


TRITON = Backend(
    name="triton",
    devices=("cuda",),
    bits=triton_kernels.TRITON_BITS,
    priority=5,
    group_size_ok=lambda gs: gs > 0,
    group_size_rule="> 0",
    shape_check=lambda gs, i, o: None,
    is_available=_triton_available,
    prepare=_triton_prepare,
    matmul=triton_kernels.wq_matmul,
    description="Triton kernel, weights dequantized per tile in registers; CUDA, bits 2/4/8, any shape",
)


# ----------------------------------------------------------------------------------------------
# "cuda_int4": torch's CUDA int4 kernel (tinygemm: aten._weight_int4pack_mm)

_CUDA_INT4_GROUP_SIZES = (32, 64, 128, 256)


def _cuda_int4_available() -> bool:
    if not (torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack")):
        return False
    return torch.cuda.get_device_capability()[0] >= 8  # tinygemm: Ampere or newer


def _cuda_int4_shape(group_size: int, in_features: int, out_features: int) -> Optional[str]:
    # in_features are padded to whole groups at prepare time, as for cpu_int4.
    if out_features % 8:
        return f"needs out_features % 8 == 0, got out_features={out_features}"
    return None


def _inner_k_tiles(k: int) -> int:
    """tinygemm's innerKTiles: 8, 4 or 2, the largest with ``k % (16 * tiles) == 0`` (k is whole groups
    of at least 32, so 2 always fits)."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _cuda_int4_prepare(p: PackedTensors) -> State:
    codes, scales_and_zeros, padded = _int4_kernel_operands(p)
    # The CUDA conversion takes two codes per byte, the even input column in the high nibble.
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()  # [out, K/2]
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(padded))
    return {
        "packed": packed,
        "group_size": p.group_size,
        "out_features": p.out_features,
        "pad_inputs": padded - p.in_features,
        "sz_bfloat16": scales_and_zeros.to(torch.bfloat16),  # [G, out, 2]
        "dequant": _torch_prepare(p),  # other dtypes; references the checkpoint buffers
    }


def _cuda_int4_matmul(state: State, x: torch.Tensor) -> torch.Tensor:
    """bf16 inputs on tinygemm; other dtypes (tinygemm takes bf16 only) through the Triton kernel
    when there is one, else dequantize + F.linear."""
    if x.dtype != torch.bfloat16:
        if triton_kernels.triton_available() and state["dequant"]["bits"] in triton_kernels.TRITON_BITS:
            return triton_kernels.wq_matmul(state["dequant"], x)
        return _torch_matmul(state["dequant"], x)
    x2 = x.reshape(-1, x.shape[-1])
    if state["pad_inputs"]:
        x2 = F.pad(x2, (0, state["pad_inputs"]))
    y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), state["packed"], state["group_size"],
                                           state["sz_bfloat16"])
    return y.reshape(*x.shape[:-1], state["out_features"])


CUDA_INT4 = Backend(
    name="cuda_int4",
    devices=("cuda",),
    bits=(4,),
    priority=10,
    group_size_ok=lambda gs: gs in _CUDA_INT4_GROUP_SIZES,
    group_size_rule=f"in {_CUDA_INT4_GROUP_SIZES}",
    shape_check=_cuda_int4_shape,
    is_available=_cuda_int4_available,
    prepare=_cuda_int4_prepare,
    matmul=_cuda_int4_matmul,
    description="torch aten int4 CUDA kernel (tinygemm), bf16 inputs; other dtypes via Triton; 4 bits",
)


# ----------------------------------------------------------------------------------------------
# registry and selection

_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add a backend; a second backend with the same name is an error."""
    if backend.name in _BACKENDS or backend.name == "auto":
        raise ValueError(f"backend name {backend.name!r} is already taken")
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown inference backend {name!r}; valid: {['auto', *_BACKENDS]}")
    return _BACKENDS[name]


def list_backends() -> List[str]:
    """Names of the registered backends, highest priority first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type


def select_backend(
    device: Union[str, torch.device],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    requested: str = "auto",
) -> Backend:
    """The backend that runs this layer on ``device``.

    ``requested="auto"`` picks the highest-priority backend that can run the layer (``"torch"``
    can run everything), skipping opt-in backends (``auto=False``: ``"torch_cached"``). A named
    backend is returned only if it can run the layer; otherwise a ValueError says why and suggests
    ``"auto"``.
    """
    dtype = _device_type(device)
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.cannot_run(dtype, bits, group_size, in_features, out_features)
        if reason:
            raise ValueError(
                f"backend {requested!r} cannot run a layer with bits={bits}, "
                f"group_size={group_size}, in_features={in_features}, "
                f"out_features={out_features} on {dtype!r}: it {reason}. "
                "Use backend='auto' (or 'torch', which runs every layer)."
            )
        return backend
    for backend in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if not backend.auto:
            continue
        if backend.cannot_run(dtype, bits, group_size, in_features, out_features) is None:
            return backend
    raise ValueError(  # unreachable while "torch" is registered
        f"no inference backend can run bits={bits}, group_size={group_size} on {dtype!r}"
    )


register_backend(TORCH)
register_backend(TORCH_CACHED)
register_backend(CPU_INT4)
register_backend(TRITON)
register_backend(CUDA_INT4)
