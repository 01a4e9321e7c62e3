"""Capturing the inputs of a block list from real forward passes of the whole model.

One forward per calibration batch runs with pre-hooks on every block of the list: the first block's
hook records the hidden states, every block's hook records its keyword arguments (attention masks
and position embeddings can differ per layer, e.g. Gemma-3's sliding-window layers), and the last
block's hook stops the forward so nothing after the list is computed.

Only the first batch runs the blocks for real. It shows what each block returns; a block whose
output is its hidden state's shape, alone or followed by ``None`` s only, is then replaced for the
other batches by a pass-through that returns its input in that structure. The model still builds
every block's arguments (they come from the token positions and masks, not from the hidden
states), so the capture costs the embedding and those arguments instead of a forward through the
whole list. Should a forward fail with pass-throughs, that batch is re-run for real, with a log
line, and so are the remaining batches.

``shapes_only`` (a model streamed from its shards, whose blocks hold no weights: ``low_cpu_mem_usage``)
stands in for every block but the last from the first batch on: each learns its output structure from
one forward on the meta device (shapes only, no data, no weights), and a block whose output cannot be
stood in for, or that cannot run on the meta device, is refused instead of re-run for real.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

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


def _passthrough_template(hidden: Any, out: Any) -> Optional[int]:
    """How to stand in for a block that got ``hidden`` and returned ``out``: 0 = return the hidden
    state, n > 0 = a tuple of it and n - 1 ``None`` s; None = it cannot be stood in for."""
    if not isinstance(hidden, torch.Tensor):
        return None
    if isinstance(out, torch.Tensor):
        return 0 if out.shape == hidden.shape and out.dtype == hidden.dtype else None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].shape == hidden.shape \
            and out[0].dtype == hidden.dtype and all(o is None for o in out[1:]):
        return len(out)
    return None


def _make_passthrough(first: str, template: int):
    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs[first]
        return hidden if template == 0 else (hidden,) + (None,) * (template - 1)
    return forward


def _make_meta_passthrough(block: nn.Module, own: Any, first: str, index: int, templates: Dict[int, Optional[int]]):
    """A stand-in for a weightless ``block`` (see ``shapes_only`` in the module docstring): its output
    structure comes from one forward of the block on meta copies of its arguments."""
    forward = own if own is not None else type(block).forward.__get__(block)
    fix = "quantize this model with low_cpu_mem_usage=False (the whole model in memory)"

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs[first]
        if index not in templates:
            meta = torch.device("meta")
            try:
                out = forward(*to_device(args, meta), **to_device(kwargs, meta))
            except Exception as exc:  # noqa: BLE001 - re-raised with what it means for the capture
                raise ValueError(f"block {index} ({type(block).__name__}) cannot run on the meta device to show its "
                                 f"output's structure ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                 f"its inputs cannot be captured block by block: {fix}") from exc
            templates[index] = _passthrough_template(to_device(hidden, meta), out)
            if templates[index] is None:
                raise ValueError(f"block {index} ({type(block).__name__}) returns {type(out).__name__}, not its hidden "
                                 "state's shape alone (or followed by None): the next block's input depends on more "
                                 f"than the hidden state, so it cannot be captured block by block: {fix}")
        return _make_passthrough(first, templates[index])(*args, **kwargs)

    return stand_in


class _Capture:
    """One capture of the inputs of ``blocks`` (see :func:`capture_block_inputs`): the hooks, the stand-ins
    and what the batch being run has recorded."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], cache_device: torch.device) -> None:
        self.model, self.blocks, self.device = model, blocks, cache_device
        self.first = [_first_parameter(b) for b in blocks]
        self.templates: Dict[int, Optional[int]] = {}  # block -> how to stand in for it (_passthrough_template)
        self.state: Dict[str, Any] = {}  # this batch: "cap" (its CapturedBatch), "in" (the last hidden), "memo"
        self.stood_in: Dict[nn.Module, Any] = {}  # block -> its own instance-level forward (accelerate's), if any
        self.handles: List[Any] = []

    def hook(self, learn_outputs: bool) -> None:
        """Pre-hooks on every block; with ``learn_outputs`` also forward hooks that learn each block's
        output structure (all but the last, which stops the forward)."""
        self.handles += [b.register_forward_pre_hook(self._pre_hook(k), with_kwargs=True)
                         for k, b in enumerate(self.blocks)]
        if learn_outputs:
            self.handles += [b.register_forward_hook(self._out_hook(k)) for k, b in enumerate(self.blocks[:-1])]

    def _pre_hook(self, k: int):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
            first = self.first[k]
            hidden = args[0] if args else kwargs.get(first)
            if k == 0:
                if not args and first not in kwargs:
                    raise RuntimeError(f"block {type(module).__name__} was called without its first argument "
                                       f"{first!r}; cannot capture its input")
                self.state["cap"] = CapturedBatch(hidden=to_device(hidden, self.device))
            self.state["in"] = hidden  # None: this block is not stood in for (see _passthrough_template)
            cap: CapturedBatch = self.state["cap"]
            # the hidden state is passed positionally when replayed, whatever its keyword name
            kw = {key: v for key, v in kwargs.items() if args or key != first}
            kw.update({key: v for key, v in _DROP.items() if key in kw})
            cap.block_args.append(_move(tuple(args[1:]), self.device, self.state["memo"]))
            cap.block_kwargs.append(_move(kw, self.device, self.state["memo"]))
            if k == len(self.blocks) - 1:
                raise _StopForward
        return hook

    def _out_hook(self, k: int):
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any):
            if k not in self.templates:
                self.templates[k] = _passthrough_template(self.state.get("in"), output)
        return hook

    def stand_in_meta(self) -> None:
        """``shapes_only``: every block but the last answers from its meta-device forward."""
        for k, b in enumerate(self.blocks[:-1]):
            self.stood_in[b] = b.__dict__.get("forward")
            b.forward = _make_meta_passthrough(b, self.stood_in[b], self.first[k], k, self.templates)

    def stand_in_learned(self) -> None:
        """After the first batch: every block whose output structure allows it returns its input."""
        for k, b in enumerate(self.blocks[:-1]):
            if self.templates.get(k) is not None:
                self.stood_in[b] = b.__dict__.get("forward")
                b.forward = _make_passthrough(self.first[k], self.templates[k])

    def restore(self) -> None:
        """The blocks' own forwards back."""
        for b, own in self.stood_in.items():
            if own is None:
                del b.forward
            else:
                b.forward = own
        self.stood_in.clear()

    def close(self) -> None:
        self.restore()
        for h in self.handles:
            h.remove()

    def _forward(self, batch: Mapping[str, Any]) -> None:
        self.state.clear()
        self.state["memo"] = {}
        try:
            self.model(**batch, use_cache=False)
        except _StopForward:
            pass

    def run(self, batch: Mapping[str, Any], may_rerun: bool) -> CapturedBatch:
        """What the blocks receive from ``batch``; a forward that fails with stand-ins is re-run with the blocks'
        own forwards (from then on) when ``may_rerun``."""
        try:
            self._forward(batch)
        except Exception as exc:  # noqa: BLE001 - re-run for real, then let real errors surface
            if not self.stood_in or not may_rerun:
                raise
            logger.info("capture: the forward failed with blocks passed through (%s: %s); "
                        "running the blocks for real", type(exc).__name__, str(exc).splitlines()[0][:200])
            self.restore()
            self._forward(batch)
        if "cap" not in self.state or len(self.state["cap"].block_kwargs) != len(self.blocks):
            raise RuntimeError(
                "the calibration forward did not reach the blocks being quantized; the data may not "
                "exercise them (e.g. text-only data for a vision tower): use image-text calibration")
        cap = self.state["cap"]
        cap.loss_mask = _loss_mask(batch, cap.hidden)
        if cap.loss_mask is not None:
            cap.loss_mask = cap.loss_mask.to(self.device)
        return cap


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Mapping[str, Any]],
    cache_device: torch.device,
    pass_through: bool = True,
    shapes_only: bool = False,
    put: Optional[Callable[[Any], Any]] = None,
) -> List[CapturedBatch]:
    """Run ``model(**batch)`` for every batch and return what each block of ``blocks`` received.

    ``batches`` are model input dicts already on the model's device. Raises if the forward never
    reaches the blocks (the data does not exercise this block list). With ``pass_through``, blocks
    after the first batch are stood in for where their output allows; with ``shapes_only``, every
    block but the last from the first batch on, from its meta-device forward (see the module docstring).
    ``put``: applied to each batch's hidden state as soon as it is captured (the tuning loop's
    :meth:`~auto_round.calib.store.TensorStore.put`: with ``offload_dir`` each batch goes to its file at once, so
    the whole first input is never in memory).
    """
    capture = _Capture(model, blocks, cache_device)
    capture.hook(learn_outputs=pass_through and not shapes_only)
    out: List[CapturedBatch] = []
    try:
        if shapes_only:
            capture.stand_in_meta()
        for i, batch in enumerate(batches):
            if pass_through and not shapes_only and i == 1:
                capture.stand_in_learned()
            cap = capture.run(batch, may_rerun=not shapes_only)
            if put is not None:
                cap.hidden = put(cap.hidden)
            out.append(cap)
    finally:
        capture.close()
    return out
