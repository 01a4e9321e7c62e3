"""Registry of export formats.

An export format is an :class:`Exporter`: it declares which layers it can store
(:meth:`Exporter.check_layer`, asked before tuning starts so nobody learns after an hour of tuning
that the format cannot store a layer) and writes a quantized model to disk (:meth:`Exporter.save`).

Formats register themselves under one or more names with :func:`register_format`; the built-in
format modules listed in ``_BUILTIN_MODULES`` are imported on the first lookup.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from auto_round.quant.qdq import QuantParams
from auto_round.quant.types import QuantizedWeight

# Modules whose import registers built-in formats (each calls register_format at import time).
_BUILTIN_MODULES = (
    "auto_round.export.auto_round_format",
    "auto_round.export.auto_gptq_format",
    "auto_round.export.auto_awq_format",
    "auto_round.export.fake_format",
    "auto_round.export.gguf",
    "auto_round.export.llm_compressor_format",
)

_FORMATS: Dict[str, "Exporter"] = {}
_builtins_loaded = False


class Exporter(ABC):
    """One on-disk format for a quantized model."""

    name: str = ""
    # Whether the format stores GGUF K-quant layers (double-quantized scales, float mins; schemes
    # asym_dq/sym_dq): only formats that write ggml K blocks or dequantized weights do.
    stores_kquant: bool = False

    @abstractmethod
    def check_layer(
        self,
        name: str,
        out_features: int,
        in_features: int,
        bits: int,
        group_size: int,
        sym: bool,
    ) -> Optional[str]:
        """None if this format can store the layer, else a human-readable reason (with the fix).

        ``group_size`` is resolved (never -1).
        """

    def check_params(self, name: str, out_features: int, in_features: int, params: Any) -> Optional[str]:
        """:meth:`check_layer` for a :class:`QuantParams` (before tuning) or a tuned
        :class:`QuantizedWeight`; a K-quant layer is refused by formats that cannot store it."""
        from auto_round.quant.kquant import is_kquant

        if is_kquant(params) and not self.stores_kquant:
            return (f"{self.name!r} stores one scale and an integer zero point per group, not a GGUF K-quant "
                    f"layer ({params.bits}-bit, scales quantized per super-block{', float mins' if not params.sym else ''}),"
                    " which only gguf:*_k and 'fake' store; export this format from a separate run")
        return self.check_layer(name, out_features, in_features, params.bits, params.group_size, params.sym)

    def layer_params(self, model: nn.Module, layers: Dict[str, Tuple[int, int]]
                     ) -> Optional[Dict[str, Tuple[Optional[QuantParams], str]]]:
        """For formats whose type decides each layer's scheme (GGUF K-quant mixes): ``{layer: (params,
        note)}`` for the layers the plan quantizes (``layers``: ``{name: (out, in)}``); params None keeps
        the layer in full precision, ``note`` says why. Asked before tuning; None (the default): the
        settings decide."""
        return None

    def check_scale_dtype(self, scale_dtype: torch.dtype) -> Optional[str]:
        """Why this format cannot store scales of ``scale_dtype`` (the run's ``scale_dtype``), or None.
        Called before tuning."""
        return None

    def check_plan(self, schemes: Dict[str, Tuple[int, int, bool]]) -> Optional[str]:
        """Why this format cannot store the whole plan ``{layer: (bits, group_size, sym)}``, or
        None. Called before tuning, after every layer passed :meth:`check_layer`."""
        return None

    def check_records(self, layers: Dict[str, QuantizedWeight]) -> None:
        """At save time, on the tuned records themselves, every check the plan passed before tuning
        (:meth:`check_layer` per layer, :meth:`check_plan`, :meth:`check_scale_dtype`); ValueError
        listing what this format cannot store."""
        bad = [f"{n}: {why}" for n, q in layers.items()
               if (why := self.check_params(n, q.out_features, q.in_features, q))]
        if bad:
            raise ValueError(f"format {self.name!r} cannot store these layers:\n" + "\n".join(bad[:10]))
        # K records hold float32 d*sc products, not scales of the run's scale_dtype (their d is fp16)
        dtypes = sorted({q.scale.dtype for q in layers.values() if q.kquant is None}, key=str)
        why = self.check_plan({n: (q.bits, q.group_size, q.sym) for n, q in layers.items()})
        why = why or next((w for d in dtypes if (w := self.check_scale_dtype(d))), None)
        if why:
            raise ValueError(f"format {self.name!r} cannot store these layers: {why}")

    def check_model(self, model: nn.Module, tokenizer: Any) -> Optional[str]:
        """Why this format cannot write ``model`` at all (its architecture, config or ``tokenizer``),
        or None. Called before tuning, before any layer is checked; by default every model passes."""
        return None

    @abstractmethod
    def save(
        self,
        model: nn.Module,
        layers: Dict[str, QuantizedWeight],
        output_dir: Path,
        quantization_config: dict,
        inplace: bool,
    ) -> None:
        """Write ``model`` with the quantized ``layers`` (keys: module names) to ``output_dir``.

        ``quantization_config`` is built by the caller; the format adds its own keys. With
        ``inplace=False`` the caller's model is left untouched.
        """

    def export(
        self,
        model: nn.Module,
        layers: Dict[str, QuantizedWeight],
        output_dir: Path,
        quantization_config: dict,
        inplace: bool,
        tokenizer: Any = None,
    ) -> None:
        """What callers run: :meth:`save`, given the tokenizer too for formats that embed it in
        their file (GGUF overrides this). By default ``tokenizer`` is ignored: the caller saves
        the tokenizer files beside the weights."""
        self.save(model, layers, output_dir, quantization_config, inplace)


def register_format(name: str, exporter: Exporter) -> None:
    """Register ``exporter`` under ``name``; a name can be registered only once."""
    if not name:
        raise ValueError("an export format needs a non-empty name")
    if name in _FORMATS:
        raise ValueError(
            f"export format {name!r} is already registered "
            f"(by {type(_FORMATS[name]).__name__}); choose another name"
        )
    _FORMATS[name] = exporter


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def available_formats() -> List[str]:
    """Every registered format name, sorted."""
    _load_builtins()
    return sorted(_FORMATS)


def get_format(name: str) -> Exporter:
    """The exporter registered as ``name``; ValueError listing the valid names otherwise."""
    _load_builtins()
    if name not in _FORMATS:
        raise ValueError(f"unknown export format {name!r}; valid formats: {available_formats()}")
    return _FORMATS[name]
