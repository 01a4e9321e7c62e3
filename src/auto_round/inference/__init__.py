"""Inference for packed ``auto_round`` checkpoints: ``QuantLinear``, backends and loading.

transformers loads ``quant_method "auto-round"`` checkpoints by itself through
:mod:`auto_round.inference.convert_model`; :func:`load_quantized` is a shortcut that also lets
you pick the backend (``"auto"``, ``"torch"``, ``"cpu_int4"``, ``"torch_cached"``) and loads GPTQ
(act-order included) and AWQ GEMM checkpoints, of LLMs and VLMs, with the same modules, those GPTQModel
writes included (:mod:`auto_round.inference.foreign`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from auto_round.inference.backends import list_backends, select_backend
from auto_round.inference.foreign import normalize_quantization_config, with_block_lists
from auto_round.inference.qlinear import QuantLinear

__all__ = ["QuantLinear", "list_backends", "load_quantized", "select_backend"]


def _auto_class(config, path: str, trust_remote_code: bool):
    """The transformers auto class for ``config`` (of the checkpoint at ``path``): causal LM, else
    image-text-to-text (VLMs)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_map = getattr(config, "auto_map", None) or {}
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping or (trust_remote_code and auto.__name__ in auto_map):
            return auto
    raise ValueError(f"{path!r} holds a {type(config).__name__} (model_type {config.model_type!r}), which neither "
                     "AutoModelForCausalLM nor AutoModelForImageTextToText can build; load it with its own model "
                     "class' from_pretrained (quantized layers load the same way), or pass trust_remote_code=True "
                     "if it ships its modeling code")


def _skeleton(auto, config, trust_remote_code: bool):
    """The model of ``config`` on the meta device, without its quantization (module names only)."""
    import copy

    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    with torch.device("meta"):
        return auto.from_config(plain, trust_remote_code=trust_remote_code)


def load_quantized(
    path: str,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    dtype: Optional[torch.dtype] = None,
    trust_remote_code: bool = False,
):
    """Load a quantized causal LM or VLM with ``from_pretrained`` of the matching auto class
    (``AutoModelForCausalLM``, else ``AutoModelForImageTextToText``).

    ``backend`` travels as ``quantization_config=AutoRoundConfig(backend=...)``, which
    transformers merges into the checkpoint's config as a loading attribute (it also makes
    transformers read GPTQ checkpoints with these modules). ``dtype`` (e.g. ``torch.bfloat16``)
    is the dtype of the non-quantized parts and of the activations; None keeps the checkpoint's.
    """
    from transformers import AutoConfig, AutoRoundConfig

    if backend != "auto":
        from auto_round.inference.backends import get_backend

        get_backend(backend)  # fail before loading, listing the valid names
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    auto = _auto_class(config, str(path), trust_remote_code)
    if isinstance(qc, dict):  # written by another tool (GPTQModel, AutoAWQ): read for what its tensors are
        config.quantization_config = with_block_lists(normalize_quantization_config(qc), str(path),
                                                      lambda: _skeleton(auto, config, trust_remote_code))
    kwargs = {"device_map": str(device), "quantization_config": AutoRoundConfig(backend=backend), "config": config,
              "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return auto.from_pretrained(path, **kwargs)
