"""The ``fake`` export format: a plain checkpoint holding the quantized-dequantized weights.

Every quantized Linear keeps its ordinary ``weight`` ``[out, in]`` (in the model's dtype), set to
``scale * (code - zero)`` of its tuned record; nothing is packed and ``config.json`` carries no
``quantization_config``, so any engine or tool that loads the original architecture loads it (at the
original size). It serves accuracy studies and engines without int kernels. What was done is recorded
in ``autoround_fake_quantization.json`` beside the weights (the tuning settings and the per-layer
schemes), which no loader reads.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from auto_round.export.registry import Exporter, register_format
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

RECORD_FILE = "autoround_fake_quantization.json"


class FakeExporter(Exporter):
    """Writes the qdq weights into an unquantized checkpoint."""

    name = "fake"
    stores_kquant = True  # GGUF K-quant records dequantize like any other

    def check_layer(self, name: str, out_features: int, in_features: int, bits: int, group_size: int,
                    sym: bool) -> Optional[str]:
        return None  # any integer scheme dequantizes to a float weight

    def save(self, model: nn.Module, layers: Dict[str, QuantizedWeight], output_dir: Path, quantization_config: dict,
             inplace: bool) -> None:
        target = model if inplace else copy.deepcopy(model)
        with torch.no_grad():
            for name, qw in layers.items():
                linear = target.get_submodule(name)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"layer {name!r} is a {type(linear).__name__}; the fake format writes nn.Linear weights")
                linear.weight.copy_(qw.dequantize(linear.weight.dtype).to(linear.weight.device))
        if getattr(target.config, "quantization_config", None) is not None:
            del target.config.quantization_config  # a plain checkpoint: no loader must try to unpack it
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(output_dir, safe_serialization=True)
        record = {**quantization_config, "format": "fake", "note": "weights are dequantized; nothing is packed"}
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        logger.info("saved %d fake-quantized layers to %s", len(layers), output_dir)


register_format("fake", FakeExporter())
