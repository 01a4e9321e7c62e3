"""Inference for packed ``auto_round`` checkpoints: ``QuantLinear``, backends and loading.

transformers loads ``quant_method "auto-round"`` checkpoints by itself through
:mod:`auto_round.inference.convert_model`; :func:`load_quantized` is a shortcut that also lets
you pick the backend (``"auto"``, ``"torch"``, ``"cpu_int4"``) and loads GPTQ (``desc_act=False``)
checkpoints with the same modules.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from auto_round.inference.backends import list_backends, select_backend
from auto_round.inference.qlinear import QuantLinear

__all__ = ["QuantLinear", "list_backends", "load_quantized", "select_backend"]


def load_quantized(
    path: str,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
):
    """Load a quantized causal LM with ``AutoModelForCausalLM.from_pretrained``.

    ``backend`` travels as ``quantization_config=AutoRoundConfig(backend=...)``, which
    transformers merges into the checkpoint's config as a loading attribute (it also makes
    transformers read GPTQ checkpoints with these modules). ``dtype`` (e.g. ``torch.bfloat16``)
    is the dtype of the non-quantized parts and of the activations; None keeps the checkpoint's.
    """
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    if backend != "auto":
        from auto_round.inference.backends import get_backend

        get_backend(backend)  # fail before loading, listing the valid names
    kwargs = {"device_map": str(device), "quantization_config": AutoRoundConfig(backend=backend)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
