"""A linear layer with learnable rounding offsets and clip factors, used while tuning a block."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from auto_round.quant.kquant import is_kquant, kquant_record, qdq_groups_k
from auto_round.quant.qdq import (QDQWorkspace, QuantParams, group_range, group_view, n_groups, qdq_groups,
                                  quantize_weight, scale_zero_from_range)
from auto_round.quant.types import QuantizedWeight


class TunableLinear(nn.Module):
    """Wraps an ``nn.Linear``; its forward uses ``qdq(W; V, alpha, beta)``.

    Learnable: ``v`` ``[out, G * group_size]`` (starts at 0) and, with min-max tuning, ``alpha`` /
    ``beta`` ``[out, G]`` (start at 1, clamped to [0, 1] after each step).
    """

    def __init__(self, linear: nn.Linear, params: QuantParams, minmax: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = linear
        self.params = params
        out, in_ = linear.weight.shape
        g = n_groups(in_, params.group_size)
        dev = linear.weight.device
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        # The weight is fixed while tuning: its padded group view and group ranges are computed once.
        self.wg = group_view(self.weight, params.group_size)
        self.lo, self.hi = group_range(self.wg)
        self.v = nn.Parameter(torch.zeros(out, g * params.group_size, device=dev, dtype=dtype))
        self.alpha = nn.Parameter(torch.ones(out, g, device=dev, dtype=dtype)) if minmax else None
        self.beta = nn.Parameter(torch.ones(out, g, device=dev, dtype=dtype)) if minmax else None
        # CPU: compute the qdq in reused buffers (fresh weight-sized tensors cost page faults each step).
        self._work = QDQWorkspace(self.wg) if dev.type == "cpu" else None
        self._cache: Optional[Tuple[Tuple[Any, ...], torch.Tensor]] = None
        self.clip_max = 1.0  # upper bound of the clip factors (the tuner's box; the sign step clamps to it)
        self.compiled = False  # set when the unit's forward runs under torch.compile (see qdq)
        if self._work is not None:
            # The backward hands ``v`` its gradient in a workspace buffer. With ``v.grad`` already
            # allocated, autograd adds that into it rather than adopting the buffer (which the next
            # forward overwrites); the sign step zeroes it in place.
            self.v.grad = torch.zeros_like(self.v)

    def qdq(self) -> torch.Tensor:
        """The qdq weight ``[out, in_]`` for the current parameters.

        Computed once per parameter state: a block that calls this layer twice in one forward gets
        the same tensor (one graph node, gradients accumulate); an update of ``v``/``alpha``/``beta``
        (their version counters) or the backward through it starts a new one.
        """
        if self.compiled:  # traced by torch.compile: no cache (its version keys), no in-place buffers; fused
            return self._qdq(None)
        key = (self.v._version, -1 if self.alpha is None else self.alpha._version,
               -1 if self.beta is None else self.beta._version, torch.is_grad_enabled())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        w = self._qdq(self._work)
        self._cache = (key, w)
        if w.requires_grad:
            w.register_hook(self._drop_cache)
        return w

    def _qdq(self, work: Optional[QDQWorkspace]) -> torch.Tensor:
        out, in_ = self.weight.shape
        if is_kquant(self.params):  # GGUF K-quant: sub-block scales/mins quantized per super-block
            w = qdq_groups_k(self.wg, self.lo, self.hi, self.params, self.v.view(self.wg.shape), self.alpha,
                             self.beta, work)
        else:
            s, z = scale_zero_from_range(self.lo, self.hi, self.params, self.alpha, self.beta)
            w = qdq_groups(self.wg, s, z, self.v.view(self.wg.shape), self.params.maxq, work)
        return w.reshape(out, -1)[:, :in_]

    @torch.no_grad()
    def init_clip(self, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Start the clip factors at ``alpha``/``beta`` ``[out, G]`` (e.g. the optimized-RTN search), clamped
        to the tuner's ``[0, clip_max]`` box."""
        if self.alpha is None or self.beta is None:
            raise ValueError("clip factors can only be initialised with min-max tuning on (enable_minmax_tuning)")
        self.alpha.copy_(alpha.to(self.alpha).clamp(0.0, self.clip_max))
        self.beta.copy_(beta.to(self.beta).clamp(0.0, self.clip_max))
        self._cache = None

    def use_compiled(self) -> None:
        """The unit's forward runs under torch.compile: qdq without its cache or in-place buffers (freed)."""
        self.compiled, self._work, self._cache = True, None, None

    def _drop_cache(self, grad: torch.Tensor) -> None:
        self._cache = None  # its graph is being consumed by this backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qdq()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def snapshot(self) -> Dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters(recurse=False)}

    @torch.no_grad()
    def restore(self, snap: Dict[str, torch.Tensor]) -> None:
        for k, p in self.named_parameters(recurse=False):
            p.copy_(snap[k])

    @torch.no_grad()
    def finalize(self) -> QuantizedWeight:
        """Integer codes with the current parameters; writes the qdq weight into the Linear."""
        self._cache, self._work = None, None
        qw = quantized_record(self.weight, self.params, self.v, self.alpha, self.beta, self.linear.bias)
        load_record(self.linear, qw)
        return qw


@torch.no_grad()
def quantized_record(weight: torch.Tensor, params: QuantParams, v: Optional[torch.Tensor] = None,
                     alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """The integer record (on CPU) of ``weight`` quantized with rounding offsets ``v`` and clip factors
    ``alpha``/``beta`` (None: 0 and the full range); GGUF K-quant schemes give their K blocks."""
    if is_kquant(params):
        return kquant_record(weight, params, v, alpha, beta, bias)
    codes, scale, zero = quantize_weight(weight.float(), params, v, alpha, beta)
    return QuantizedWeight(codes=codes.cpu(), scale=scale.cpu(), zero=zero.cpu(), bits=params.bits,
                           group_size=params.group_size, sym=params.sym,
                           bias=None if bias is None else bias.detach().cpu())


@torch.no_grad()
def load_record(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Write the dequantized weight of ``qw`` into ``linear`` (its dtype and device)."""
    linear.weight.copy_(qw.dequantize(linear.weight.dtype).to(linear.weight.device))


def rtn_quantize(linear: nn.Linear, params: QuantParams, alpha: Optional[torch.Tensor] = None,
                 beta: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Round-to-nearest: quantize ``linear`` in place (qdq weight) and return its integer record.

    ``alpha``/``beta`` ``[out, G]``: clip factors of the group ranges (optimized RTN), None = full range."""
    qw = quantized_record(linear.weight.float(), params, None, alpha, beta, linear.bias)
    load_record(linear, qw)
    return qw


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
