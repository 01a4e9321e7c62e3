"""Capturing the inputs of a block list from real forward passes of the whole model.

One forward per calibration batch runs with pre-hooks on every block of the list: the first block's
hook records the hidden states, every block's hook records its keyword arguments (attention masks
and position embeddings can differ per layer, e.g. Gemma-3's sliding-window layers), and the last
block's hook stops the forward so nothing after the list is computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# Keyword arguments a block must not receive during tuning (no KV cache is built).
_DROP = {"past_key_value": None, "past_key_values": None, "use_cache": False}


class _StopForward(Exception):
    pass


@dataclass
class CapturedBatch:
    """Inputs of one calibration batch to every block of a list.

    ``hidden``: ``[B, T, H]`` input of the first block. ``block_args[k]`` / ``block_kwargs[k]``:
    extra positional / keyword arguments of block k (tensors shared between blocks are stored once).
    ``loss_mask``: ``[B, T]`` bool, the tokens that count in the reconstruction loss, or None.
    """

    hidden: torch.Tensor
    block_args: List[Tuple[Any, ...]] = field(default_factory=list)
    block_kwargs: List[Dict[str, Any]] = field(default_factory=list)
    loss_mask: Optional[torch.Tensor] = None


def _move(obj: Any, device: torch.device, memo: Dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.detach().to(device)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``, keeping shared ones shared."""
    return _move(obj, device, {})


def _loss_mask(batch: Mapping[str, Any], hidden: torch.Tensor) -> Optional[torch.Tensor]:
    mask = batch.get("attention_mask")
    if not isinstance(hidden, torch.Tensor):
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        return None
    if bool(mask.all()):
        return None
    return mask.bool()


def _first_parameter(block: nn.Module) -> str:
    """Name of the first argument of ``block.forward`` (``hidden_states``, Llama-4's ``hidden_state``...)."""
    params = list(inspect.signature(block.forward).parameters)
    return params[0] if params else "hidden_states"


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Mapping[str, Any]],
    cache_device: torch.device,
) -> List[CapturedBatch]:
    """Run ``model(**batch)`` for every batch and return what each block of ``blocks`` received.

    ``batches`` are model input dicts already on the model's device. Raises if the forward never
    reaches the blocks (the data does not exercise this block list).
    """
    out: List[CapturedBatch] = []
    state: Dict[str, Any] = {}

    def make_hook(k: int):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
            first = first_param[k]
            if k == 0:
                if not args and first not in kwargs:
                    raise RuntimeError(f"block {type(module).__name__} was called without its first argument "
                                       f"{first!r}; cannot capture its input")
                hidden = args[0] if args else kwargs[first]
                state["cap"] = CapturedBatch(hidden=to_device(hidden, cache_device))
            cap: CapturedBatch = state["cap"]
            # the hidden state is passed positionally when replayed, whatever its keyword name
            kw = {key: v for key, v in kwargs.items() if args or key != first}
            kw.update({key: v for key, v in _DROP.items() if key in kw})
            cap.block_args.append(_move(tuple(args[1:]), cache_device, state["memo"]))
            cap.block_kwargs.append(_move(kw, cache_device, state["memo"]))
            if k == len(blocks) - 1:
                raise _StopForward
        return hook

    first_param = [_first_parameter(b) for b in blocks]
    handles = [b.register_forward_pre_hook(make_hook(k), with_kwargs=True) for k, b in enumerate(blocks)]
    try:
        for batch in batches:
            state.clear()
            state["memo"] = {}
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
            if "cap" not in state or len(state["cap"].block_kwargs) != len(blocks):
                raise RuntimeError(
                    "the calibration forward did not reach the blocks being quantized; the data may not "
                    "exercise them (e.g. text-only data for a vision tower): use image-text calibration")
            cap = state["cap"]
            cap.loss_mask = _loss_mask(batch, cap.hidden)
            if cap.loss_mask is not None:
                cap.loss_mask = cap.loss_mask.to(cache_device)
            out.append(cap)
    finally:
        for h in handles:
            h.remove()
    return out
