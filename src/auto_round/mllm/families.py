"""Vision-language model families as data.

One record per family: the model types it covers, candidate paths of its text and vision block
lists and of its projector (several candidates, because transformers moves modules between
releases), whether it can calibrate on text alone, whether quantizing its vision side is
supported, and its processor. The core never branches on a model name: it reads these records.
Unknown models fall back to a structural search (see :func:`resolve_family_blocks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from auto_round.compat import LLAMA4_IMAGE_OUTPUTS, UpstreamBreak
from auto_round.models.blocks import TEXT_BLOCK_PATHS, get_module, is_block_list, structural_block_lists

logger = logging.getLogger(__name__)

CLIP_LIKE = ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers")


@dataclass(frozen=True)
class Family:
    """What the quantizer needs to know about one VLM family."""

    name: str
    model_types: Tuple[str, ...]
    text_blocks: Tuple[str, ...]
    vision_blocks: Tuple[str, ...] = ()  # every existing one is a vision block list, in this order
    projectors: Tuple[str, ...] = ()  # first existing one is the projector
    text_only: bool = True  # can calibrate on text alone
    quant_nontext: bool = True  # vision quantization supported (seed's matrix)
    processor: str = "hf"
    remote_code: bool = False
    why: str = ""  # how this family differs from the common layout
    architectures: Tuple[str, ...] = ()  # matched when config.model_type is missing or unknown
    upstream_breaks: Tuple[UpstreamBreak, ...] = ()  # dependency releases that break it (refused there)


FAMILIES: Tuple[Family, ...] = (
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), ("model.language_model.layers",), ("model.visual.blocks",),
           ("model.visual.merger",), processor="qwen2_vl",
           why="flat pixel patches with image_grid_thw; 3-D rotary positions; merger inside the vision tower"),
    Family("qwen3_vl", ("qwen3_vl",), ("model.language_model.layers",), ("model.visual.blocks",),
           ("model.visual.merger",), processor="qwen2_vl", why="Qwen2-VL layout plus deepstack mergers"),
    Family("glm4v", ("glm4v",), ("model.language_model.layers",), ("model.visual.blocks",),
           ("model.visual.merger",), why="Qwen2-VL-like vision tower"),
    Family("llava", ("llava", "llava_next", "llava_onevision", "mistral3", "gemma3", "internvl", "aria"),
           ("model.language_model.layers",),
           (*CLIP_LIKE, "model.vision_tower.transformer.layers", "model.vision_tower.encoder.layer"),
           ("model.multi_modal_projector",),
           why="common HF layout: vision_tower + multi_modal_projector + language_model"),
    Family("idefics3", ("idefics3", "smolvlm"), ("model.text_model.layers",),
           ("model.vision_model.encoder.layers",), ("model.connector",),
           why="text_model / vision_model / connector naming"),
    Family("mllama", ("mllama",), ("model.language_model.layers",),
           ("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
           ("model.multi_modal_projector",), text_only=False,
           why="cross-attention text layers need image states: no text-only calibration; two vision encoders"),
    Family("llama4", ("llama4",), ("language_model.model.layers", "model.language_model.layers"),
           ("vision_model.model.layers", "model.vision_model.model.layers"),
           ("multi_modal_projector", "model.multi_modal_projector"),
           why="no inner .model: language_model / vision_model at the top; MoE experts are not nn.Linear",
           upstream_breaks=(LLAMA4_IMAGE_OUTPUTS,)),
    # Families that ship modeling code with their checkpoints (trust_remote_code).
    Family("phi3_v", ("phi3_v",), ("model.layers",),
           ("model.vision_embed_tokens.img_processor.vision_model.encoder.layers",
            "model.vision_embed_tokens.img_processor.encoder.layers"),
           ("model.vision_embed_tokens.img_projection",), processor="phi3_v", remote_code=True,
           why="vision tower and projector live inside the embedding module"),
    Family("cogvlm2", ("cogvlm2",), ("model.layers",), ("model.vision.transformer.layers",),
           ("model.vision.linear_proj",), processor="cogvlm2", remote_code=True,
           architectures=("CogVLMForCausalLM",),
           why="inputs built by the model's own build_conversation_input_ids"),
    Family("deepseek_vl_v2", ("deepseek_vl_v2",), ("language.model.layers",), ("vision.blocks",), ("projector",),
           processor="deepseek_vl_v2", remote_code=True, why="language / vision / projector at the top level"),
    Family("molmo", ("molmo",), ("model.transformer.blocks",),
           ("model.vision_backbone.image_vit.transformer.resblocks",), ("model.vision_backbone.image_projector",),
           quant_nontext=False, processor="molmo", remote_code=True,
           why="OLMo-style transformer.blocks; vision quantization not supported (seed)"),
    Family("kimi_vl", ("kimi_vl",), ("language_model.model.layers",), ("vision_tower.encoder.blocks",),
           ("multi_modal_projector",), remote_code=True, why="language_model.model.layers at the top level"),
    Family("chatglm", ("chatglm",), ("transformer.encoder.layers",), ("transformer.vision.transformer.layers",),
           ("transformer.vision.linear_proj",), quant_nontext=False, processor="chatglm", remote_code=True,
           why="GLM-4V-9B: ChatGLM layout; vision quantization not supported (seed)"),
)

_BY_TYPE: Dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
_BY_ARCH: Dict[str, Family] = {a: f for f in FAMILIES for a in f.architectures}


def family_for(model_type: Optional[str], architectures: Sequence[str] = ()) -> Optional[Family]:
    """The family record of a ``model_type`` (else of one of ``config.architectures``), or None."""
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    return next((_BY_ARCH[a] for a in architectures or () if a in _BY_ARCH), None)


def processor_for(family: Optional[Family], named: Optional[str]) -> str:
    """The calibration processor's registered name: ``named`` (the one a template names, its ``processor``),
    else the family's (this table is the one place that knows it), else ``"hf"``."""
    if named:
        return named
    return family.processor if family is not None else "hf"


def _first_block_list(model: nn.Module, candidates: Sequence[str]) -> Optional[str]:
    return next((p for p in candidates if is_block_list(get_module(model, p))), None)


def _decoder_path(model: nn.Module) -> Optional[str]:
    getter = getattr(model, "get_decoder", None)
    try:
        decoder = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        decoder = None
    if decoder is None:
        return None
    return next((n for n, m in model.named_modules() if m is decoder), None)


def resolve_family_blocks(model: nn.Module, family: Optional[Family]) -> Tuple[str, List[str], Optional[str]]:
    """``(text block list, vision block lists, projector path)`` of ``model``.

    Known families use their candidate paths. Otherwise (or when no candidate exists) the
    structure decides: the text list is the block list inside ``model.get_decoder()``, or the first
    known text path; every other top-level block list is a vision list.
    """
    text = _first_block_list(model, family.text_blocks) if family else None
    if text is None:
        dec = _decoder_path(model)
        lists = structural_block_lists(model)
        text = next((p for p in lists if dec is not None and (p == dec or p.startswith(dec + "."))), None)
        text = text or _first_block_list(model, TEXT_BLOCK_PATHS) or (lists[0] if lists else None)
        if text is None:
            raise ValueError(f"no decoder block list found in {type(model).__name__}; "
                             "pass to_quant_block_names='path.to.layers'")
        if family is not None:
            logger.warning("family %s: none of its text paths %s exist; found %s structurally",
                           family.name, family.text_blocks, text)
    vision = [p for p in family.vision_blocks if is_block_list(get_module(model, p))] if family else []
    if not vision:
        vision = [p for p in structural_block_lists(model, exclude=[text]) if not p.startswith(text + ".")]
        if family is not None:
            logger.warning("family %s: none of its vision paths %s exist; found %s structurally (pass "
                           "to_quant_block_names to choose)", family.name, family.vision_blocks, vision or "none")
    if family is None:
        logger.warning("%s matches no family record: block lists found structurally: text %s, vision %s (pass "
                       "to_quant_block_names to choose)", type(model).__name__, text, vision or "none")
    projector = next((p for p in (family.projectors if family else ()) if get_module(model, p) is not None), None)
    return text, vision, projector
