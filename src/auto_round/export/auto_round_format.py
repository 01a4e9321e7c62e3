"""The ``auto_round`` export format (REFERENCE.md section 4), loadable by transformers natively.

Per quantized Linear, in the layouts of :mod:`auto_round.export.layout` (``G = in / group_size``):

- every layer sym: ``packing_format "auto_round:auto_gptq"`` (GPTQ layout, zeros stored as ``z - 1``:
  a sym 4-bit word is ``0x77777777``);
- some layer asym, every quantized layer 4-bit with ``out % 8 == 0``: ``"auto_round:auto_awq"`` (AWQ
  layout, raw zeros), as the reference writes it and as vLLM/SGLang read asym auto_round;
- other asym plans (2/3/8-bit asym): ``"auto_round"`` (GPTQ layout with raw zeros; our loader and
  transformers through it read it, vLLM does not).

Tensors: ``qweight``/``qzeros`` int32 as the layout says, ``scales`` ``[G, out]`` in the run's
``scale_dtype`` (fp16 by default; bf16/fp32 when asked for, recorded as
``quantization_config.scale_dtype`` and read back by our loader; other engines expect fp16),
``bias`` fp16 ``[out]`` if present. ``config.json`` gains ``quantization_config`` (the caller's dict
plus ``packing_format``), which is also written to ``quantization_config.json``.

Registered names: ``"auto_round"`` (packing chosen as above) and the aliases
``"auto_round:auto_gptq"`` / ``"auto_round:gptq"`` (always ``z - 1``; asym layers are refused,
because GPTQ-style readers add 1 to the stored zero without wrapping) and
``"auto_round:auto_awq"`` (always the AWQ layout: 4-bit only).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from auto_round.export.layout import layout_for
from auto_round.export.registry import Exporter, register_format
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.pack import PACK_BITS
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

GPTQ_STYLE = "auto_round:auto_gptq"  # zeros stored as z - 1
AWQ_STYLE = "auto_round:auto_awq"  # AWQ layout, raw zeros
RAW_STYLE = "auto_round"  # zeros stored as z
CONFIG_FILE = "quantization_config.json"


def _keep_fp_hint(name: str) -> str:
    return (
        f"keep it in full precision with fp_layers='{name}' or "
        f"layer_config={{'{name}': {{'bits': 16}}}}"
    )


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _quant_linear_for(model: nn.Module, name: str, qw: QuantizedWeight, style: str) -> QuantLinear:
    """The packed replacement of ``model``'s Linear ``name``, after checking that they match."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"quantized layer {name!r} is not a module of the model") from err
    if not isinstance(module, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; only nn.Linear is packed")
    if (module.out_features, module.in_features) != (qw.out_features, qw.in_features):
        raise ValueError(
            f"layer {name!r} is [{module.out_features}, {module.in_features}] but its "
            f"QuantizedWeight codes are [{qw.out_features}, {qw.in_features}]"
        )
    return QuantLinear.from_quantized(qw, packing_format=style)


class AutoRoundExporter(Exporter):
    """Writes the ``auto_round`` format. ``force_style``: always this packing format (aliases).
    ``fp16_scales_only``: why the format's readers take fp16 scales only (None: any scale dtype)."""

    fp16_scales_only: Optional[str] = None

    def __init__(self, name: str, force_style: Optional[str] = None) -> None:
        self.name = name
        self.force_style = force_style
        self.force_gptq_zeros = force_style == GPTQ_STYLE

    def check_layer(
        self,
        name: str,
        out_features: int,
        in_features: int,
        bits: int,
        group_size: int,
        sym: bool,
    ) -> Optional[str]:
        """None if the layer can be stored, else why not and how to keep it in FP instead."""
        if bits not in PACK_BITS:
            return f"{self.name!r} stores bits {PACK_BITS}, not bits={bits}; " + _keep_fp_hint(name)
        for what, n, packed_along in (
            ("in_features", in_features, "qweight packs along the input dimension"),
            ("out_features", out_features, "qzeros packs along the output dimension"),
        ):
            if n * bits % 32:
                return (
                    f"{what}={n} times bits={bits} is not a multiple of 32 ({packed_along}); "
                    + _keep_fp_hint(name)
                )
        if self.force_gptq_zeros and not sym:
            return (
                f"format {self.name!r} stores zero points as z - 1, which GPTQ-style readers "
                "misread for asym layers; use format 'auto_round' or sym=True"
            )
        if self.force_style is not None:
            why = layout_for(self.force_style).cannot_store(bits, out_features)
            if why:
                return f"format {self.name!r}: {why}; use format 'auto_round' or " + _keep_fp_hint(name)
        return None

    def packing_style(self, layers: Dict[str, QuantizedWeight]) -> str:
        """The forced style, else GPTQ (every layer sym), else AWQ (4-bit asym), else raw zeros."""
        if self.force_style is not None:
            return self.force_style
        if all(qw.sym for qw in layers.values()):
            return GPTQ_STYLE
        if all(layout_for(AWQ_STYLE).cannot_store(qw.bits, qw.out_features) is None for qw in layers.values()):
            return AWQ_STYLE
        return RAW_STYLE

    def check_scale_dtype(self, scale_dtype: torch.dtype) -> Optional[str]:
        if self.fp16_scales_only and scale_dtype != torch.float16:
            return (f"format {self.name!r} stores fp16 scales ({self.fp16_scales_only}), not {scale_dtype}; use "
                    "scale_dtype='fp16', or format 'auto_round', which stores and reloads bf16/fp32 scales")
        return None

    def final_config(self, quantization_config: dict, style: str, packed: nn.Module,
                     layers: Dict[str, QuantizedWeight]) -> dict:
        """The ``quantization_config`` written to disk (hook for formats that describe themselves
        differently); ``packed`` is the model with its quantized layers already replaced."""
        return {**quantization_config, "packing_format": style}

    def prepare_module(self, layer: QuantLinear) -> None:
        """Hook for tensors a format adds to each packed layer (none here)."""

    def save(
        self,
        model: nn.Module,
        layers: Dict[str, QuantizedWeight],
        output_dir: Path,
        quantization_config: dict,
        inplace: bool,
    ) -> None:
        """Pack ``layers`` into :class:`QuantLinear` modules and ``save_pretrained`` the model."""
        self.check_records(layers)
        style = self.packing_style(layers)
        replacements = {
            name: _quant_linear_for(model, name, qw, style) for name, qw in layers.items()
        }
        for layer in replacements.values():
            self.prepare_module(layer)
        if inplace:
            target = model
            for name, new in replacements.items():
                _replace_module(target, name, new)
        else:
            # Seeding deepcopy's memo with the replacements copies everything except the FP
            # Linear layers being replaced (no second copy of their weights is made).
            memo = {id(model.get_submodule(n)): new for n, new in replacements.items()}
            target = copy.deepcopy(model, memo)
        config = self.final_config(dict(quantization_config), style, target, layers)
        target.config.quantization_config = config
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(output_dir, safe_serialization=True)
        with open(output_dir / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        logger.info(
            "saved %d quantized layers in format %r (packing_format %r) to %s",
            len(layers),
            self.name,
            style,
            output_dir,
        )


register_format("auto_round", AutoRoundExporter("auto_round"))
register_format("auto_round:auto_gptq", AutoRoundExporter("auto_round:auto_gptq", GPTQ_STYLE))
register_format("auto_round:gptq", AutoRoundExporter("auto_round:gptq", GPTQ_STYLE))
register_format("auto_round:auto_awq", AutoRoundExporter("auto_round:auto_awq", AWQ_STYLE))
