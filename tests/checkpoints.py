"""Test helpers for saved checkpoints: save a tiny model with the test tokenizer, read every tensor as bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenizer_fixture import make_tokenizer


def save_model(model, folder: Path, dtype=None, shard: str = None) -> Path:
    """``model`` (cast to ``dtype`` when given) saved in ``folder`` (``shard``: ``max_shard_size``), with the
    test tokenizer."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    make_tokenizer().save_pretrained(folder)
    return folder


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder as raw bytes, with dtype and shape (byte identity, NaN-safe)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out
