"""Loading a model and its tokenizer from an object, a local folder or a hub id."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(model_dtype: Optional[str]) -> Any:
    """``None`` -> float32 on CPU loads (exact tuning); otherwise the named dtype."""
    if model_dtype is None:
        return "auto"
    if model_dtype not in DTYPES:
        raise ValueError(f"model_dtype={model_dtype!r} is unknown; use one of {sorted(DTYPES)}")
    return DTYPES[model_dtype]


def _offline_error(name: str, err: Exception) -> OSError:
    return OSError(
        f"could not load {name!r}: it is not a local folder, and fetching it from the Hugging Face hub "
        f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "Pass a local model folder, or check the network / HF_ENDPOINT / HF_TOKEN."
    )


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, ...)`` with a clear error when a hub id cannot be fetched."""
    if os.path.isdir(name):
        return loader.from_pretrained(name, **kwargs)
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a file; pass the model's folder (the one holding config.json)")
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # hub unreachable or id unknown
        raise _offline_error(name, e) from e


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_kwargs(name: str, allow_pickle: bool) -> dict:
    """``from_pretrained`` keywords for a local folder's weights: safetensors only, unless the folder holds
    pickled weights alone and ``allow_pickle`` says to read them (transformers then loads them with
    ``torch.load(weights_only=True)``, so a pickle can still not run code)."""
    if not os.path.isdir(name):
        return {}
    files = os.listdir(name)
    if any(f.endswith(".safetensors") for f in files):
        return {"use_safetensors": True}
    pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickled and not allow_pickle:
        raise ValueError(f"{name!r} holds pickled weights only ({', '.join(pickled[:3])}); pickles can run code when "
                         "read, so they are refused: convert the model to safetensors, or pass allow_pickle=True "
                         "(--allow_pickle) to read them with torch.load(weights_only=True)")
    return {"use_safetensors": False, "weights_only": True} if pickled else {}


def _refuse_vlm_folder(name: str, trust_remote_code: bool) -> None:
    """A local vision-language model folder given to the text API: say which API takes it."""
    if not os.path.isdir(name):
        return
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # let the model loader report it
    if type(config) in AutoModelForImageTextToText._model_mapping and type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"{name!r} is a vision-language model ({type(config).__name__}); quantize it with "
                         "AutoRoundMLLM (auto_round.AutoRoundMLLM) or the auto-round-mllm command")


def load_causal_lm(
    model: Union[str, Path, nn.Module],
    tokenizer: Any = None,
    *,
    model_dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Tuple[nn.Module, Any, Optional[str]]:
    """Return ``(model, tokenizer, source_dir)``; loads both when ``model`` is a name or path."""
    if isinstance(model, nn.Module):
        src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        return model, tokenizer, str(src) if src else None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(model)
    _refuse_vlm_folder(name, trust_remote_code)
    m = load_pretrained(AutoModelForCausalLM, name, dtype=resolve_dtype(model_dtype),
                        trust_remote_code=trust_remote_code, **pickle_kwargs(name, allow_pickle))
    m.eval()
    if tokenizer is None:
        tokenizer = load_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = load_pretrained(AutoTokenizer, str(tokenizer), trust_remote_code=trust_remote_code)
    return m, tokenizer, name
