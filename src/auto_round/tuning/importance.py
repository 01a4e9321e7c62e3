"""Per-input-channel activation importance of Linear layers, gathered during a block's forward.

``importance[i] = mean over calibration tokens of x_i^2`` for each planned layer: the diagonal of the
layer's input second moment, which weights the reconstruction error of optimized RTN
(:mod:`auto_round.quant.opt_rtn`). Padding tokens (the loss mask) are left out.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn


class ImportanceCollector:
    """Sums ``x^2`` per input channel over the tokens of every forward of the watched layers.

    Each forward's sum is taken in float32 and added to a float64 total: a sum over the same batches in another
    order (data-parallel processes each summing their own, then all-reduced) then rounds to the same float32
    importance, so every process, and one process seeing all the batches, searches the same clip factors."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.mask: Optional[torch.Tensor] = None  # [B, T] bool of the batch being run, or None

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            x = x[self.mask.to(x.device)]
        x = x.reshape(-1, x.shape[-1])
        sq = x.pow(2).sum(0).double()
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def importance(self, name: str) -> Optional[torch.Tensor]:
        """Mean ``x^2`` per input channel of ``name``, or None when it saw no token."""
        if not self.counts.get(name):
            return None
        return (self.sums[name] / self.counts[name]).float()


@contextlib.contextmanager
def watch_inputs(root: nn.Module, names: Sequence[str],
                 collector: ImportanceCollector) -> Iterator[ImportanceCollector]:
    """Record the inputs of the Linear layers ``names`` of ``root`` into ``collector`` while inside."""
    handles = []
    try:
        for name in names:
            def hook(module, args, _name=name):
                if args and isinstance(args[0], torch.Tensor):
                    collector.add(_name, args[0])
            handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
        yield collector
    finally:
        for h in handles:
            h.remove()
