"""The built-in perplexity task ``ppl:FILE``: perplexity of a causal LM on a local text file.

The file is read as UTF-8 and tokenized once without special tokens; the tokens are cut into
non-overlapping windows of ``seqlen`` (the last, shorter window is kept when it has at least two
tokens), each window is scored on its own (no context carried over, no BOS added), and

    ppl = exp(sum of the next-token negative log-likelihoods / number of predicted tokens)

where a window of ``n`` tokens predicts ``n - 1`` of them. No evaluation harness is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def window_bounds(n_tokens: int, seqlen: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` of each window: ``window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]``; a tail of one
    token predicts nothing and is dropped (``window_bounds(9, 4) == [(0, 4), (4, 8)]``)."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} is too short for perplexity; use at least 2 tokens per window")
    return [(s, min(s + seqlen, n_tokens)) for s in range(0, n_tokens, seqlen) if min(s + seqlen, n_tokens) - s >= 2]


def read_text(path: str) -> str:
    """The task's text; errors name the file and the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"task ppl:{path}: no such file; give a local UTF-8 text file, e.g. --tasks ppl:data/test.txt")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"task ppl:{path} is not UTF-8 text ({e}); convert it to UTF-8") from e
    if not text.strip():
        raise ValueError(f"task ppl:{path} is empty; give a file with text in it")
    return text


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor) -> Tuple[float, int]:
    """Summed next-token NLL of ``ids [b, n]`` (equal-length rows) and the number of predicted tokens."""
    logits = model(input_ids=ids.to(_model_device(model))).logits.float()
    pred, target = logits[:, :-1], ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll), int(target.numel())


def perplexity(model: nn.Module, tokenizer: Any, text: str, seqlen: int, batch_size: int = 1) -> Dict[str, Any]:
    """Perplexity of ``model`` on ``text`` (see the module docstring); also the token and window counts."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bounds = window_bounds(int(ids.numel()), seqlen)
    if not bounds:
        raise ValueError(f"the text has {ids.numel()} token(s): perplexity needs at least 2")
    full = [b for b in bounds if b[1] - b[0] == seqlen]
    rest = [b for b in bounds if b[1] - b[0] != seqlen]
    total, count = 0.0, 0
    for i in range(0, len(full), max(1, batch_size)):
        batch = torch.stack([ids[s:e] for s, e in full[i:i + batch_size]])
        nll, n = window_nll(model, batch)
        total, count = total + nll, count + n
    for s, e in rest:
        nll, n = window_nll(model, ids[s:e].unsqueeze(0))
        total, count = total + nll, count + n
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": int(ids.numel()),
            "predicted_tokens": count, "windows": len(bounds), "seqlen": seqlen}
