"""A causal LM built without its weights, which it reads from its safetensors shards one module at a
time (``low_cpu_mem_usage``; the run itself is :mod:`auto_round.model_free.streaming`).

The skeleton is ``AutoModelForCausalLM.from_config`` under accelerate's ``init_empty_weights`` with
buffers kept real: every parameter is on the meta device (no memory), while the buffers computed at
construction (rotary ``inv_freq``, which no checkpoint stores) hold their values, as
``from_pretrained`` computes them. It is built in the dtype ``from_pretrained`` would load (the
``model_dtype`` asked for, else the config's), so each tensor read from a shard is cast exactly as the
in-memory path casts it.

:class:`StreamedWeights` then loads the parameters of one module (a block, a layer, the embedding) from
the shards with plain reads (:class:`~auto_round.model_free.shards.ShardReader`, no memory map whose
pages would stay resident), and frees them back to the meta device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from auto_round.model_free.checkpoint import Checkpoint, find_checkpoint, map_names
from auto_round.models.loading import _offline_error, _refuse_vlm_folder, load_pretrained, resolve_dtype

logger = logging.getLogger(__name__)

FIX = "or pass low_cpu_mem_usage=False to load the whole model in memory"
# What a hub download for a streamed run fetches: configs, safetensors shards, tokenizer files.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")


def local_folder(model: Union[str, Path, nn.Module], trust_remote_code: bool = False) -> Path:
    """The local folder of ``model`` (a folder, or a hub id downloaded to the hub cache), refused with the
    fix when it cannot be streamed: a loaded model object, a file, no ``.safetensors`` weights, a
    vision-language model."""
    if isinstance(model, nn.Module):
        raise ValueError(f"low_cpu_mem_usage=True reads the weights from the model's safetensors shards block by "
                         f"block, so it needs the model's folder or hub id, not a loaded {type(model).__name__}: pass "
                         f"the folder (model.save_pretrained(folder) first), {FIX}")
    name = str(model)
    if os.path.exists(name) and not os.path.isdir(name):
        raise ValueError(f"{name!r} is a file; pass the model's folder (the one holding config.json)")
    if os.path.isdir(name):
        folder = Path(name)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, allow_patterns=list(HUB_PATTERNS)))
        except (OSError, ValueError) as e:
            raise _offline_error(name, e) from e
    if not any(folder.glob("*.safetensors")):
        held = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        what = f"its weights are {', '.join(held[:3])}" if held else "it holds no weights"
        raise ValueError(f"{name!r} has no .safetensors shards ({what}); low_cpu_mem_usage=True streams safetensors "
                         f"only: convert the model (load it and save_pretrained it), {FIX}")
    try:
        _refuse_vlm_folder(str(folder), trust_remote_code)
    except ValueError as e:
        raise ValueError(f"{e}; low_cpu_mem_usage=True streams text LLMs only: quantize it with AutoRoundMLLM and "
                         "low_cpu_mem_usage=False") from e
    return folder


def _load_dtype(config: Any, model_dtype: Optional[str], ckpt: Checkpoint) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=resolve_dtype(model_dtype))`` loads: the one asked for, else
    (``"auto"``) the config's, else the checkpoint's first floating-point tensor's, else float32."""
    asked = resolve_dtype(model_dtype)
    if isinstance(asked, torch.dtype):
        return asked
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str) and isinstance(getattr(torch, cfg, None), torch.dtype):
        cfg = getattr(torch, cfg)
    if isinstance(cfg, torch.dtype):
        return cfg
    for reader in ckpt.readers.values():
        for info in reader.tensors.values():
            if info.dtype.is_floating_point:
                return info.dtype
    return torch.float32


def build_streamed_model(folder: Path, model_dtype: Optional[str], trust_remote_code: bool,
                         tokenizer: Any = None) -> Tuple[nn.Module, Any, "StreamedWeights"]:
    """``(skeleton, tokenizer, weights)`` of the model in ``folder`` (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = load_pretrained(AutoConfig, str(folder), trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{str(folder)!r} is already quantized (config.json has quantization_config); pass the "
                         "full-precision model")
    ckpt = find_checkpoint(folder)
    dtype = _load_dtype(config, model_dtype, ckpt)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_pretrained(AutoTokenizer, str(tokenizer or folder), trust_remote_code=trust_remote_code)
    return model, tokenizer, StreamedWeights(model, ckpt)


def _owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


class StreamedWeights:
    """The parameters of a weightless ``model``, read from ``ckpt`` one module at a time.

    Every parameter (tied ones as one group) must be in the checkpoint with its shape: checked when
    this is built, before any calibration or tuning."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint) -> None:
        self.model, self.ckpt = model, ckpt
        map_names(model, ckpt)
        self._source: Dict[int, str] = {}  # id of a parameter -> the checkpoint tensor that fills it
        problems: List[str] = []
        groups: Dict[int, List[str]] = {}
        params: Dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            params[id(p)] = p
        tied = getattr(model, "all_tied_weights_keys", None) or {}  # target -> source (e.g. lm_head -> embeddings)
        for key, names in groups.items():
            stored = next((s for n in [*names, *(tied[n] for n in names if n in tied)]
                           if (s := ckpt.stored_name(n)) is not None), None)
            if stored is None:
                problems.append(f"{names[0]} is not in the checkpoint")
            elif tuple(ckpt.info(stored).shape) != tuple(params[key].shape):
                problems.append(f"{stored} is {list(ckpt.info(stored).shape)}, the model's {names[0]} needs "
                                f"{list(params[key].shape)}")
            else:
                self._source[key] = stored
        if problems:
            raise ValueError(f"the checkpoint in {str(ckpt.folder)!r} does not hold every {type(model).__name__} "
                             "weight:\n  " + "\n  ".join(problems[:8])
                             + (f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else "")
                             + f"\nthe download may be incomplete, or transformers converts these tensors at load; fix the checkpoint, "
                             f"{FIX}")
        self.read_bytes = 0

    def _parameters(self, prefix: str) -> Dict[int, Tuple[nn.Parameter, List[str]]]:
        module = self.model.get_submodule(prefix) if prefix else self.model
        out: Dict[int, Tuple[nn.Parameter, List[str]]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            out.setdefault(id(p), (p, []))[1].append(f"{prefix}.{name}" if prefix else name)
        return out

    def load(self, prefix: str) -> None:
        """Read the parameters of module ``prefix`` from the checkpoint (cast to the skeleton's dtypes)."""
        for key, (p, names) in self._parameters(prefix).items():
            if not p.is_meta:
                continue
            stored = self._source[key]
            t = self.ckpt.readers[self.ckpt.where[stored]].get(stored)
            self.read_bytes += t.numel() * t.element_size()
            new = nn.Parameter(t.to(p.dtype), requires_grad=p.requires_grad)
            self._source[id(new)] = stored
            for n in names:
                owner, leaf = _owner(self.model, n)
                owner._parameters[leaf] = new

    def free(self, prefix: str) -> None:
        """Put the parameters of module ``prefix`` back on the meta device."""
        for key, (p, names) in self._parameters(prefix).items():
            if p.is_meta:
                continue
            empty = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            self._source[id(empty)] = self._source.pop(key)
            for n in names:
                owner, leaf = _owner(self.model, n)
                owner._parameters[leaf] = empty

    @contextlib.contextmanager
    def outside(self, block_lists: Sequence[str]) -> Iterator[List[str]]:
        """Within this context, a module outside ``block_lists`` with weightless parameters of its own
        loads them when it is first called (the capture's forward reaches only the embeddings, norms and
        rotary embeddings before the first block); they are freed on exit. Yields the loaded names."""
        loaded: List[str] = []
        handles = []

        def inside(name: str) -> bool:
            return any(name == b or name.startswith(b + ".") for b in block_lists)

        def make(name: str):
            def hook(module: nn.Module, args: Any) -> None:
                if any(p.is_meta for p in module.parameters(recurse=False)):
                    self.load(name)
                    loaded.append(name)
            return hook

        for name, m in self.model.named_modules():
            if not inside(name) and any(p.is_meta for p in m.parameters(recurse=False)):
                handles.append(m.register_forward_pre_hook(make(name)))
        try:
            yield loaded
        finally:
            for h in handles:
                h.remove()
            for name in loaded:
                self.free(name)
            if loaded:
                logger.info("capture loaded %s from the shards (freed again)", ", ".join(loaded))

    def fingerprint(self) -> str:
        """:func:`auto_round.tuning.resume.model_fingerprint` of the model as the in-memory path loads it
        (names, shapes, dtypes, the leading 64 KiB of each parameter), reading those bytes from the shards."""
        import hashlib

        from auto_round.tuning.resume import _HEAD_BYTES, _tensor_digest

        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            stored = self._source[id(p)]
            reader = self.ckpt.readers[self.ckpt.where[stored]]
            info = reader.tensors[stored]
            per_row = max(1, p[0].numel()) if p.dim() > 0 else 1
            want = -(-(_HEAD_BYTES // p.element_size()) // per_row)
            rows = reader.get_rows(stored, 0, min(info.shape[0], want)) if info.shape else reader.get(stored)
            _tensor_digest(h, rows.to(p.dtype), _HEAD_BYTES)
        return h.hexdigest()

    def close(self) -> None:
        self.ckpt.close()
