"""Inference backends for packed weight-only quantized linear layers, as data records.

Every backend is a :class:`Backend` record: where it runs, which layers it can run, how it
prepares the checkpoint tensors once (:attr:`Backend.prepare`) and how it multiplies
(:attr:`Backend.matmul`). :func:`select_backend` picks the highest-priority backend that can run a
layer, or checks an explicitly requested one and explains why it cannot.

Built-in backends:

- ``"torch"``: unpack, dequantize, ``F.linear`` in the input's dtype. Any device, bits 2-8, any
  group size.
- ``"cpu_int4"``: torch's own CPU int4 kernels (``aten._convert_weight_to_int4pack_for_cpu`` and
  ``aten._weight_int4pack_mm_for_cpu``). Constraints, found by experiment on torch 2.14:
  bits 4; group size 32, 64, 128 or 256; ``in_features % group_size == 0``;
  ``out_features % 16 == 0``; input dtypes bf16, fp16, fp32 (scales and zeros must have the
  input's dtype; the input must be 2-D and contiguous). The kernel dequantizes as
  ``(q - 8) * scale + zero_term``, so ``zero_term = scale * (8 - z)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

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
    ``matmul(state, x)``: ``x [..., in]`` -> ``[..., out]`` without bias.
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


def _torch_matmul(state: State, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_packed(
        state["qweight"],
        state["zeros"],
        state["scales"],
        state["bits"],
        state["group_size"],
        state["in_features"],
    )
    return F.linear(x, w.to(x.dtype))


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
    description="unpack + dequantize + F.linear; any device, slow, low memory",
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
    if in_features % group_size:
        return f"needs in_features % group_size == 0, got {in_features} % {group_size}"
    if out_features % 16:
        return f"needs out_features % 16 == 0, got out_features={out_features}"
    return None


def _cpu_int4_prepare(p: PackedTensors) -> State:
    codes = unpack_codes(p).t().contiguous()  # [out, in] int32, as the kernel expects
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # uint8 [out, in/2]
    scales = p.scales.float()
    zero_term = scales * (8 - unpack_zeros(p).float())  # kernel: (q - 8) * s + zero_term
    scales_and_zeros = torch.stack([scales, zero_term], dim=-1).contiguous()  # [G, out, 2]
    return {
        "packed": packed,
        "group_size": p.group_size,
        "sz_float32": scales_and_zeros,
        "dequant": _torch_prepare(p),  # references the checkpoint buffers: no copy of the weight
    }


# Largest token count per call that the int4 kernel serves; above it, dequantize + F.linear wins.
# Measured on 2 CPU cores (bench/bench_qlinear.py): with bf16/fp16 inputs the kernel beats a bf16
# matmul up to ~32 tokens and dequantize+matmul up to ~256; with fp32 inputs it runs a slow path
# (~70x slower than dequantize+matmul at 512 tokens), so it is used only for 1-2 tokens.
CPU_INT4_MAX_TOKENS = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 2}


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
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
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
    can run everything). A named backend is returned only if it can run the layer; otherwise a
    ValueError says why and suggests ``"auto"``.
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
        if backend.cannot_run(dtype, bits, group_size, in_features, out_features) is None:
            return backend
    raise ValueError(  # unreachable while "torch" is registered
        f"no inference backend can run bits={bits}, group_size={group_size} on {dtype!r}"
    )


register_backend(TORCH)
register_backend(CPU_INT4)
