"""Finding the block lists (stacks of decoder layers) that SignRound tunes.

Known module paths are tried first (data, not name heuristics); a structural fallback then
looks for the largest ``nn.ModuleList`` of same-class children that contain linear layers.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

logger = logging.getLogger(__name__)

# Candidate paths of the text decoder stack across transformers releases and families.
TEXT_BLOCK_PATHS: Tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "model.language_model.model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.transformer.blocks",
    "language_model.layers",
    "layers",
)


def get_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at dotted ``path`` or None."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Linear) for x in m.modules())


def is_block_list(m: Optional[nn.Module], same_class: bool = False) -> bool:
    """A non-empty ModuleList whose children contain linear layers.

    Known paths accept mixed layer classes (Llama-3.2-Vision interleaves cross-attention layers);
    the structural search asks for one class (``same_class``) to avoid false matches.
    """
    if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
        return False
    if isinstance(m, nn.Sequential) and any(isinstance(c, nn.Linear) for c in m):
        return False  # an MLP (Linear, act, Linear), not a stack of blocks
    if same_class and any(type(c) is not type(m[0]) for c in m):
        return False
    return all(_has_linear(c) for c in m)


def structural_block_lists(model: nn.Module, exclude: Iterable[str] = ()) -> List[str]:
    """Every block list in ``model`` not nested inside another, largest first."""
    excl = tuple(exclude)
    found: List[Tuple[int, str]] = []
    for name, m in model.named_modules():
        if not is_block_list(m, same_class=True) or any(name == e or name.startswith(e + ".") for e in excl):
            continue
        if any(name.startswith(other + ".") for _, other in found):
            continue
        found.append((sum(p.numel() for p in m.parameters()), name))
    found.sort(key=lambda t: -t[0])
    return [n for _, n in found]


def find_text_block_list(model: nn.Module, candidates: Sequence[str] = TEXT_BLOCK_PATHS) -> str:
    """Path of the language model's block list; raises with the fix when none is found."""
    for path in candidates:
        if is_block_list(get_module(model, path)):
            return path
    found = structural_block_lists(model)
    if found:
        logger.info("no known block path in %s; using the largest block list found: %s",
                    type(model).__name__, found[0])
        return found[0]
    raise ValueError(
        f"no block list (ModuleList of decoder layers) found in {type(model).__name__}; "
        "pass to_quant_block_names='path.to.layers'"
    )


def resolve_block_names(model: nn.Module, names: Union[None, str, Sequence[str]]) -> List[str]:
    """Validate user-given block-list paths (comma string or sequence)."""
    if names is None:
        return [find_text_block_list(model)]
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    items = [n for n in items if n]
    if not items:
        raise ValueError(f"to_quant_block_names={names!r} names no block list")
    for n in items:
        m = get_module(model, n)
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            hint = ", ".join(structural_block_lists(model)[:4]) or "none found"
            raise ValueError(f"to_quant_block_names entry {n!r} is not a ModuleList in the model; "
                             f"block lists present: {hint}")
    return items
