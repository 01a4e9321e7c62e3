"""The ``auto_awq`` export format: AutoAWQ's GEMM checkpoints, from SignRound's integer weights.

Per quantized Linear (``G = in / group_size``; layout ``awq`` of :mod:`auto_round.export.layout`):

- ``qweight`` int32 ``[in, out / 8]``: 4-bit codes packed along the output dimension, nibble ``i`` of
  word ``c`` holding column ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``;
- ``qzeros`` int32 ``[G, out / 8]``: raw zero points, same packing (``8`` for every group of a sym layer);
- ``scales`` fp16 ``[G, out]``; ``bias`` fp16 ``[out]`` when present.

``quantization_config``: ``quant_method "awq"``, ``version "gemm"``, ``bits 4``, ``group_size``,
``zero_point`` (``not sym``, as the reference writes it; the zeros are stored either way),
``modules_to_not_convert`` (every Linear kept in full precision: the vision tower of a VLM,
``lm_head``, ``fp_layers``; plus the name of each whole FP sub-tree, e.g. ``vision_tower``, since readers
match entries as substrings of their own module names and vLLM renames the tower's inner modules),
plus ``block_name_to_quantize`` and the tuning facts. AWQ carries one
scheme: 4-bit, one group size, fp16 scales; anything else is refused before tuning.

Loaded by AWQ readers (vLLM, SGLang, transformers with gptqmodel/autoawq) and by
``auto_round.inference.load_quantized`` (through transformers' ``AutoRoundConfig``, which reads AWQ
GEMM checkpoints as ``packing_format "auto_round:awq"``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from auto_round.export.auto_round_format import AWQ_STYLE, AutoRoundExporter
from auto_round.export.registry import register_format
from auto_round.quant.types import QuantizedWeight

_KEPT = ("block_name_to_quantize", "iters", "nsamples", "seqlen", "autoround_version", "data_type")


def fp_subtree_names(packed: nn.Module, layers: Dict[str, QuantizedWeight]) -> List[str]:
    """``modules_to_not_convert``: every Linear still plain in ``packed``, plus the last name of each largest
    module holding only FP Linears (e.g. ``vision_tower``, ``multi_modal_projector``).

    AWQ readers (vLLM, transformers) skip a layer when an entry is a substring of its name, in their own
    naming: vLLM's LLaVA calls transformers 5's ``model.vision_tower.encoder.layers.0.mlp.fc1``
    ``vision_tower.vision_model.encoder.layers.0.mlp.fc1``, which no full name matches but ``vision_tower``
    does. A short name is added only when it is no substring of any quantized layer's name."""
    fp = sorted(n for n, m in packed.named_modules() if isinstance(m, nn.Linear))
    if not fp:
        return fp
    linears_under: Dict[str, List[bool]] = {}
    for name, module in packed.named_modules():
        if isinstance(module, nn.Linear) or name in layers:
            parts = name.split(".")
            for i in range(1, len(parts)):
                linears_under.setdefault(".".join(parts[:i]), []).append(name not in layers)
    all_fp = {prefix for prefix, flags in linears_under.items() if all(flags)}
    short = set()
    for prefix in all_fp:
        parent = prefix.rpartition(".")[0]
        if parent in all_fp:
            continue  # not the largest FP-only module
        leaf = prefix.rpartition(".")[2]
        if not leaf.isdigit() and not any(leaf in q for q in layers):
            short.add(leaf)
    return sorted(short) + fp


class AutoAWQExporter(AutoRoundExporter):
    """Writes AWQ GEMM checkpoints."""

    fp16_scales_only = "AWQ kernels read no other dtype"

    def __init__(self) -> None:
        super().__init__("auto_awq", force_style=AWQ_STYLE)

    def check_plan(self, schemes: Dict[str, Tuple[int, int, bool]]) -> Optional[str]:
        sizes = sorted({gs for _, gs, _ in schemes.values()})
        if len(sizes) > 1:
            return (f"format 'auto_awq' stores one group_size for every layer, found {sizes}; use "
                    f"group_size={sizes[0]} (it divides every layer) or format='auto_round'")
        return None

    def final_config(self, quantization_config: dict, style: str, packed: nn.Module,
                     layers: Dict[str, QuantizedWeight]) -> dict:
        q = next(iter(layers.values()))  # one scheme for every layer (check_plan)
        not_converted = fp_subtree_names(packed, layers)
        config = {"quant_method": "awq", "version": "gemm", "bits": q.bits, "group_size": q.group_size,
                  "zero_point": not q.sym, "modules_to_not_convert": not_converted, "provider": "auto-round",
                  "quantizer": f"auto_round:{quantization_config.get('autoround_version', '')}"}
        config.update({k: quantization_config[k] for k in _KEPT if k in quantization_config})
        if "dataset" in quantization_config:  # GPTQConfig-style readers allow only wikitext2/c4 as "dataset"
            config["autoround_dataset"] = quantization_config["dataset"]
        return config


register_format("auto_awq", AutoAWQExporter())
