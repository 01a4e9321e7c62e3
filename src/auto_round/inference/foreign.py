"""Quantization configs written by other tools, read as the configs this package's loader understands.

transformers hands every GPTQ/AWQ checkpoint it loads through ``AutoRoundConfig`` to
:mod:`auto_round.inference.convert_model`, but first refuses any GPTQ config that carries a ``meta``
key ("Only supports `gptqv1`"), and GPTQModel writes ``meta`` (its quantizer's name and settings) into
every checkpoint it saves, v1 layout or not. :func:`normalize_quantization_config` reads such a config
for what its tensors are, then hands transformers a config it accepts:

- GPTQModel GPTQ (``meta``, ``checkpoint_format``): ``gptq`` is GPTQ v1 (zeros stored ``z - 1``), read as
  it is; ``gptq_v2`` stores raw zeros, which ``format "gptq_v2"`` tells the loader
  (:func:`auto_round.inference.convert_model.packing_format_of`: transformers renames every GPTQ
  config's ``packing_format`` ``auto_round:gptq``, so the layout travels in ``format``). ``pack_dtype``
  must be ``int32`` and the layout ``gptq``/``gptq_v2``: kernel-specific layouts (``marlin``, ``bitblas``,
  ``qqq``, ``gptq_p``, ...) are refused by name. ``meta`` is informational and dropped; ``dynamic`` (its
  per-module overrides, ``-:`` keeping a module in full precision) is kept and applied by
  :func:`auto_round.inference.convert_model.quantized_layer_schemes`; ``desc_act`` (act-order ``g_idx``) is
  read by :class:`auto_round.inference.qlinear.QuantLinear`.
- AWQ: GPTQModel names the AutoAWQ kernel layout ``format``, AutoAWQ ``version``; only ``gemm`` (the
  layout :mod:`auto_round.export.layout` reads) is accepted, whichever key says it.

Configs from this package, the reference, AutoGPTQ and AutoAWQ pass through unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

GPTQ_V1, GPTQ_V2 = "gptq", "gptq_v2"
READABLE_GPTQ = (GPTQ_V1, GPTQ_V2)
READABLE_AWQ = ("gemm",)


def is_gptqmodel_config(qc: Mapping[str, Any]) -> bool:
    """A GPTQ config as GPTQModel writes it (its ``meta`` block or its ``checkpoint_format`` key)."""
    return "gptq" in str(qc.get("quant_method", "")) and ("meta" in qc or "checkpoint_format" in qc)


def normalize_quantization_config(qc: Mapping[str, Any]) -> Dict[str, Any]:
    """``quantization_config`` of a checkpoint -> one that transformers' ``AutoRoundConfig`` and this
    package's loader read as the tensors on disk are (a new dict; ``qc`` is not changed).

    Raises ValueError, naming the value and what to do, for layouts these loaders cannot read."""
    out = copy.deepcopy(dict(qc))
    method = str(out.get("quant_method", ""))
    if "awq" in method:
        layout = str(out.get("version") or out.get("format") or "gemm").lower()
        if layout not in READABLE_AWQ:
            raise ValueError(f"AWQ checkpoint with the {layout!r} kernel layout: this loader reads AWQ "
                             f"{READABLE_AWQ[0]!r} checkpoints only; re-save it with format/version 'gemm'")
        out["version"] = layout
        out.pop("meta", None)
        return out
    if not is_gptqmodel_config(out):
        return out
    layout = str(out.get("checkpoint_format") or out.get("format") or GPTQ_V1).lower()
    if layout not in READABLE_GPTQ:
        raise ValueError(f"GPTQModel checkpoint with checkpoint_format={layout!r}: this loader reads the portable "
                         f"GPTQ layouts {READABLE_GPTQ}; re-save it from GPTQModel with format='gptq'")
    pack_dtype = str(out.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise ValueError(f"GPTQModel checkpoint with pack_dtype={pack_dtype!r}: this loader reads int32-packed "
                         "words only; re-quantize with pack_dtype=torch.int32 (GPTQModel's default)")
    out.pop("meta", None)
    out.pop("checkpoint_format", None)
    out["format"] = layout
    out["desc_act"] = bool(out.get("desc_act", False))  # its presence marks a checkpoint with g_idx
    return out
