"""Model-free round-to-nearest (``iters=0``, no calibration data): a safetensors checkpoint is quantized
shard by shard, tensor by tensor, without ever building the model with its weights, so any model size
fits in about one layer's memory. See :mod:`auto_round.model_free.core` for the lifecycle and
:mod:`auto_round.model_free.shards` for the streaming safetensors I/O.

>>> from auto_round.model_free import quantize_model_free
>>> quantize_model_free("path/to/model", "path/to/out", bits=4, group_size=128)  # doctest: +SKIP
"""

from auto_round.model_free.checkpoint import find_checkpoint
from auto_round.model_free.core import quantize_model_free

__all__ = ["find_checkpoint", "quantize_model_free"]
