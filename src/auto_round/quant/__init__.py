"""Pure quantization math: group reshaping, scales and zeros, quantize-dequantize, packing.

Nothing here knows about models, devices or files; every function takes and returns tensors.
"""

from auto_round.quant.qdq import (
    QuantParams,
    dequantize,
    group_view,
    n_groups,
    qdq_weight,
    quantize_weight,
    round_ste,
)
from auto_round.quant.types import QuantizedWeight

__all__ = [
    "QuantParams",
    "QuantizedWeight",
    "dequantize",
    "group_view",
    "n_groups",
    "qdq_weight",
    "quantize_weight",
    "round_ste",
]
