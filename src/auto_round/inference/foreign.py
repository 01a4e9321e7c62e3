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

Neither tool records which block lists it quantized (``block_name_to_quantize``), and a VLM's vision tower is a
block list too: :func:`quantized_block_lists` finds them from the tensor names on disk, so that a GPTQModel or
AutoAWQ VLM folder keeps its vision tower in full precision as it was written.

Configs from this package and the reference pass through unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

logger = logging.getLogger(__name__)

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


QUANTIZED_TENSOR_SUFFIX = ".qweight"  # every GPTQ/AWQ/auto_round packed layer stores one


def block_lists(layer_names: Iterable[str]) -> List[str]:
    """The module paths holding ``layer_names``: for a layer inside a numbered list, the list
    (``model.language_model.layers`` for ``model.language_model.layers.3.mlp.up_proj``), else the layer itself
    (``lm_head``); sorted."""
    found = set()
    for name in layer_names:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        found.add(".".join(parts[:index] if index else parts))
    return sorted(found)


def checkpoint_tensor_names(path: str) -> List[str]:
    """Every tensor name of a safetensors checkpoint: a local folder (its index, else the file headers), or a hub
    repo id (its safetensors headers, read remotely by ``huggingface_hub``); [] when the folder has no safetensors
    files or the hub cannot be reached (logged: the loader then falls back to every block list)."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import get_safetensors_metadata

            return list(get_safetensors_metadata(str(path)).weight_map)
        except Exception as err:  # offline, gated, not a repo: from_pretrained reports it in its own words
            logger.warning("could not list the tensors of %r (%s: %s) to find its quantized block lists", path,
                           type(err).__name__, err)
            return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    from safetensors import safe_open

    names: List[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names.extend(fh.keys())
    return names


def _disk_names(model, name: str) -> List[str]:
    """The names transformers saves module ``name``'s weight under (its checkpoint renamings reverted: a LLaVA's
    ``model.language_model.layers.0...`` is ``language_model.model.layers.0...`` on disk; a converter that splits
    a fused weight on save gives several); ``[name]`` when this transformers has no such renamings."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without checkpoint renamings: disk names are module names
        return [name]
    import torch

    saved = revert_weight_conversion(model, {f"{name}.weight": torch.empty(0, device="meta")})
    return [key.removesuffix(".weight") for key in saved]


def quantized_block_lists(model, tensor_names: Iterable[str]) -> List[str]:
    """The block lists of ``model`` (module paths, see :func:`block_lists`) whose Linear layers the checkpoint
    stores packed (a ``.qweight`` under the layer's name on disk)."""
    import torch.nn as nn

    on_disk = {n[: -len(QUANTIZED_TENSOR_SUFFIX)] for n in tensor_names if n.endswith(QUANTIZED_TENSOR_SUFFIX)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return block_lists(n for n in linears if n in on_disk or not on_disk.isdisjoint(_disk_names(model, n)))


def with_block_lists(qc: Mapping[str, Any], path: str, skeleton) -> Dict[str, Any]:
    """``qc`` with ``block_name_to_quantize`` read from the checkpoint at ``path`` (a folder or a hub repo id) when
    the config names no block list (as GPTQModel and AutoAWQ write them); ``skeleton()`` builds the model on the
    meta device (called only then). Unchanged when the config names its lists or no layer is found packed."""
    out = dict(qc)
    if out.get("block_name_to_quantize") or out.get("to_quant_block_names"):
        return out
    names = checkpoint_tensor_names(path)
    if not any(n.endswith(QUANTIZED_TENSOR_SUFFIX) for n in names):
        return out
    lists = quantized_block_lists(skeleton(), names)
    if lists:
        out["block_name_to_quantize"] = lists
    return out
