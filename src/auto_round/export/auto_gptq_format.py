"""The ``auto_gptq`` export format (REFERENCE.md section 4).

The same packed tensors as ``auto_round:auto_gptq`` (zeros stored as ``z - 1``) plus ``g_idx``
int32 ``[in]`` = ``i // group_size`` per layer, and a GPTQ ``quantization_config``
(``quant_method "gptq"``, ``desc_act false``). GPTQ checkpoints carry one scheme for every layer,
so mixed bits/group sizes are refused (use ``auto_round``, which records per-layer exceptions), and
so are asym layers (GPTQ v1 readers add 1 to the stored zero without wrapping) and scales other
than fp16 (``scale_dtype``: GPTQ loaders read fp16 only).

GPTQ loaders (GPTQModel, vLLM, transformers with optimum) read it; offline here it loads through
``auto_round.inference.load_quantized``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from auto_round.export.auto_round_format import AutoRoundExporter
from auto_round.export.registry import register_format
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.types import QuantizedWeight

# Tuning facts kept beside the GPTQ keys (transformers refuses a GPTQ config with a "meta" key). The
# calibration data is recorded as "autoround_dataset": GPTQConfig's own "dataset" key accepts only
# "wikitext2"/"c4"/"c4-new" and refuses every other value, so plain from_pretrained failed on it.
_KEPT = ("block_name_to_quantize", "iters", "nsamples", "seqlen", "autoround_version", "data_type")
_RENAMED = {"dataset": "autoround_dataset"}
GPTQ_BITS = (2, 3, 4, 8)


class AutoGPTQExporter(AutoRoundExporter):
    """Writes GPTQ v1 checkpoints from SignRound's integer weights."""

    fp16_scales_only = "GPTQ loaders read no other dtype"

    def __init__(self) -> None:
        super().__init__("auto_gptq", force_style="auto_round:auto_gptq")

    def check_layer(self, name: str, out_features: int, in_features: int, bits: int, group_size: int,
                    sym: bool) -> Optional[str]:
        if bits not in GPTQ_BITS:  # transformers' GPTQConfig and the GPTQ kernels take no other width
            return f"format 'auto_gptq' stores bits {GPTQ_BITS}, not bits={bits}; use format 'auto_round' for {bits}-bit"
        return super().check_layer(name, out_features, in_features, bits, group_size, sym)

    def check_plan(self, schemes: Dict[str, Tuple[int, int, bool]]) -> Optional[str]:
        kinds = sorted({(bits, gs) for bits, gs, _ in schemes.values()})
        if len(kinds) > 1:
            hint = ""
            if len({bits for bits, _ in kinds}) == 1:  # only the group sizes differ (fitted to the shapes)
                hint = f"group_size={min(gs for _, gs in kinds)} (it divides every layer) or "
            return (f"format 'auto_gptq' stores one (bits, group_size) for every layer, found {kinds}; "
                    f"use {hint}format='auto_round', which keeps per-layer settings")
        return None

    def prepare_module(self, layer: QuantLinear) -> None:
        del layer.g_idx  # plain None attribute -> buffer saved with the weights
        layer.register_buffer("g_idx", torch.arange(layer.in_features, dtype=torch.int32,
                                                    device=layer.qweight.device) // layer.group_size)

    def final_config(self, quantization_config: dict, style: str, packed: nn.Module,
                     layers: Dict[str, QuantizedWeight]) -> dict:
        q = next(iter(layers.values()))  # one scheme for every layer (check_plan)
        in_blocks = quantization_config.get("block_name_to_quantize", "")
        config = {"quant_method": "gptq", "bits": q.bits, "group_size": q.group_size, "sym": True, "desc_act": False,
                  "true_sequential": True, "damp_percent": 0.01, "static_groups": False, "checkpoint_format": "gptq",
                  "lm_head": "lm_head" in quantization_config.get("extra_config", {}),
                  "quantizer": f"auto_round:{quantization_config.get('autoround_version', '')}"}
        config.update({k: quantization_config[k] for k in _KEPT if k in quantization_config})
        config.update({new: quantization_config[k] for k, new in _RENAMED.items() if k in quantization_config})
        config["block_name_to_quantize"] = in_blocks
        return config


register_format("auto_gptq", AutoGPTQExporter())
