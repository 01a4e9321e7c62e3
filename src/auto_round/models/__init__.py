"""models."""

from typing import Any

import torch.nn as nn


def text_config(model: nn.Module) -> Any:
    """The config of ``model``'s language model: ``config.get_text_config()`` where the config has one (VLMs),
    else ``model.config`` itself (None for a module without a config)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg
