"""The record one quantized linear layer leaves behind: integer codes, scales and zero points.

This is the contract between the tuner (which produces it) and the exporters and inference
modules (which pack and consume it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class QuantizedWeight:
    """Integer weight of one linear layer, in the logical (unpacked) layout.

    Shapes, for a layer with ``out`` outputs, ``in_`` inputs and ``G = ceil(in_ / group_size)``:

    - ``codes``: uint8 ``[out, in_]``, values in ``[0, 2**bits - 1]`` (padding removed).
    - ``scale``: ``[out, G]`` in the tuned ``scale_dtype``; negative values are legal (sym
      "full range" maps the larger-magnitude extreme to level ``-2**(bits-1)``).
    - ``zero``: int32 ``[out, G]``, the raw zero point ``z`` (``2**(bits-1)`` for sym).
    - ``bias``: the layer's bias ``[out]`` or None.

    The dequantized weight is ``scale[o, g] * (codes[o, i] - zero[o, g])`` with ``g = i // group_size``.

    GGUF K-quant layers (schemes ``asym_dq``/``sym_dq``, :mod:`auto_round.quant.kquant`) also carry
    ``kquant``: the super-block blocks ``{"d": fp16 [out, S], "sc": int16 [out, G]}`` plus
    ``"dmin"`` fp16 ``[out, S]`` and ``"m"`` uint8 ``[out, G]`` for the float-min types; then
    ``scale = d*sc`` (float32), ``zero`` is ``2^(bits-1)`` or 0, and the weight is
    ``(d*sc) * codes - dmin*m`` (float mins: no integer zero point stores it).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    bias: Optional[torch.Tensor] = None
    data_type: str = "int"
    kquant: Optional[Dict[str, torch.Tensor]] = None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the dequantized weight ``[out, in_]`` in ``dtype``."""
        from auto_round.quant.qdq import dequantize

        if self.kquant is not None:
            from auto_round.quant.kquant import dequantize_k

            return dequantize_k(self).to(dtype)
        return dequantize(self.codes, self.scale, self.zero, self.group_size).to(dtype)
