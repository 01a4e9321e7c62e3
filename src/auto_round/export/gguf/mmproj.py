"""The ``mmproj`` GGUF of a vision-language model: its vision tower and projector for llama.cpp's
``mtmd`` library (``clip.cpp``), beside the language model's own ``.gguf``.

Vision-language families are data (:data:`VISION_ARCHS`): which ``model_type`` values, which
``clip.projector_type``, how our in-memory parameter names map to the checkpoint names gguf-py's
``TensorNameMap`` (MODEL_ARCH.MMPROJ) knows, the few tensors llama.cpp renames, splits or does not
read, and the ``clip.*`` hyperparameters. Facts follow llama.cpp's converters: ``conversion/base.py``
``MmprojModel`` (common keys, tensor types), ``conversion/qwenvl.py`` ``Qwen2VLVisionModel``
(qkv and Conv3d splits, window-attention pattern), ``conversion/smolvlm.py`` ``SmolVLMModel``
(Idefics3 / SmolVLM: F32 embeddings, scale factor, preprocessing size) and, for CLIP-based LLaVA-1.5 (which the HF
converter no longer handles), ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py``
(``mm.0``/``mm.2``, feature layers, no ``post_ln``; LLaVA-NeXT's ``image_grid_pinpoints``,
``mm_patch_merge_type`` and ``image_newline``), ``conversion/gemma.py`` ``Gemma3VisionModel`` (F32
embeddings, ``soft_emb_norm`` + 1, the pooling factor), ``conversion/llava.py`` ``LlavaVisionModel``
(Mistral-3 / Pixtral: q/k rows permuted for llama.cpp's 2D rope, ``[IMG_BREAK]``'s embedding), checked
against ``tools/mtmd/clip.cpp`` and ``tools/mtmd/models/{siglip,llava,pixtral}.cpp``.

Tensor types as ``convert_hf_to_gguf`` writes an F16 mmproj: F32 for 1-D tensors, ``*_norm.weight``,
``v.position_embd`` and names not ending in ``.weight`` (``v.class_embd``); F16 for the patch
embedding and every other matrix (F32 for a matrix beyond fp16's range, announced). A vision layer
tuned with ``quant_nontext_module=True`` is written as its tuned weights dequantized to F16 (the
file then holds exactly the quantized model's vision weights, at F16 size).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from auto_round.export.gguf.arch import is_vlm
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
MMPROJ_ARCH = "clip"  # general.architecture of every mmproj file (gguf.MODEL_ARCH.MMPROJ)
# clip.cpp keys gguf-py has no constant for (tools/mtmd/clip-impl.h).
KEY_FEATURE_LAYER = "clip.vision.feature_layer"
PROJECTOR_MLP = "mlp"  # clip-impl.h PROJECTOR_TYPE_MLP (LLaVA-1.5); not in gguf.VisionProjectorType

KEY_IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
KEY_MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"

HParams = Dict[str, Any]  # GGUF key -> value (bool, int -> uint32, float -> float32, str, list)
# (GGUF name, value, model config) -> the tensors written in its place (split, reordered or shifted)
Split = Callable[[str, torch.Tensor, Any], List[Tuple[str, torch.Tensor]]]
# (model, tokenizer) -> more tensors the file needs that are no vision parameter, or why they cannot be made
Extra = Callable[[nn.Module, Any], List[Tuple[str, torch.Tensor]]]
ExtraProblem = Callable[[nn.Module, Any], Optional[str]]


@dataclass(frozen=True)
class VisionArch:
    """One VLM family whose vision side llama.cpp's mtmd runs."""

    name: str
    model_types: Tuple[str, ...]  # top-level config.model_type
    text_prefix: str  # the language model's parameters; written to the text file as "model."
    # (in-memory prefix, checkpoint prefix gguf-py's TensorNameMap knows): parameters under these go
    # to the mmproj file
    renames: Tuple[Tuple[str, str], ...]
    hparams: Callable[[Any, Any], HParams]  # (config, image processor) -> clip.* keys
    n_blocks: Callable[[Any], int]  # vision blocks llama.cpp runs (written); later ones are not
    problem: Callable[[Any], Optional[str]]  # why llama.cpp cannot run this config, or None
    skip: Tuple[str, ...] = ()  # regexes of in-memory names llama.cpp does not read
    fixes: Tuple[Tuple[str, str], ...] = ()  # (regex, replacement) on GGUF names: names clip.cpp reads
    splits: Tuple[Tuple[str, Split], ...] = ()  # (GGUF-name regex, rewrite: split, permute or shift)
    f32: Tuple[str, ...] = ()  # regexes of in-memory names the converter writes F32 whatever their shape
    extra: Optional[Extra] = None  # tensors taken from elsewhere (Pixtral: [IMG_BREAK]'s text embedding)
    extra_problem: Optional[ExtraProblem] = None  # why ``extra`` cannot be made (checked before tuning)
    why: str = ""


def _vision(cfg: Any) -> Any:
    return cfg.vision_config


def _common(cfg: Any, ip: Any, projector: str, hidden: int, ffn: int, blocks: int, heads: int, eps: float,
            image_size: int, patch_size: int) -> HParams:
    """The keys ``MmprojModel.set_gguf_parameters`` writes for every vision encoder."""
    import gguf

    cv = gguf.Keys.ClipVision
    return {
        gguf.Keys.Clip.PROJECTOR_TYPE: projector,
        gguf.Keys.Clip.HAS_VISION_ENCODER: True,
        cv.PROJECTION_DIM: int(text_config_of(cfg).hidden_size),
        cv.IMAGE_SIZE: int(image_size),
        cv.PATCH_SIZE: int(patch_size),
        cv.EMBEDDING_LENGTH: int(hidden),
        cv.FEED_FORWARD_LENGTH: int(ffn),
        cv.BLOCK_COUNT: int(blocks),
        cv.Attention.HEAD_COUNT: int(heads),
        cv.Attention.LAYERNORM_EPS: float(eps),
        cv.IMAGE_MEAN: [float(x) for x in ip.image_mean],
        cv.IMAGE_STD: [float(x) for x in ip.image_std],
    }


def text_config_of(cfg: Any) -> Any:
    """The text config of a VLM config."""
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


# ---------------------------------------------------------------------------------- LLaVA-1.5 (CLIP)
def _llava_feature_layers(cfg: Any) -> List[int]:
    """``vision_feature_layer`` as llama.cpp's non-negative indices into the hidden states (0 = the
    embeddings, ``i`` = the output of block ``i - 1``), as the legacy converter writes them."""
    n = int(_vision(cfg).num_hidden_layers)
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [int(x) if x >= 0 else n + int(x) + 1 for x in layers]


def _llava_hparams(cfg: Any, ip: Any) -> HParams:
    import gguf

    v = _vision(cfg)
    keys = _common(cfg, ip, PROJECTOR_MLP, v.hidden_size, v.intermediate_size, _llava_blocks(cfg),
                   v.num_attention_heads, v.layer_norm_eps, v.image_size, v.patch_size)
    keys[gguf.Keys.Clip.HAS_LLAVA_PROJECTOR] = True
    keys[KEY_FEATURE_LAYER] = _llava_feature_layers(cfg)
    # CLIP's quick_gelu is clip.cpp's default (gelu_quick); clip.use_gelu selects ggml's (tanh) gelu, which
    # is SigLIP's gelu_pytorch_tanh and, to ggml's approximation, CLIP's erf gelu.
    keys[gguf.Keys.ClipVision.USE_GELU] = v.hidden_act in ("gelu", "gelu_pytorch_tanh")
    return keys


def _llava_next_hparams(cfg: Any, ip: Any) -> HParams:
    """LLaVA's keys plus the AnyRes ones the legacy converter writes from the surgery's vision config:
    the pinpoints flattened (``[[a, b], ...]`` -> ``[a, b, ...]``) and ``spatial_unpad`` (the only merge
    type transformers' LLaVA-NeXT has)."""
    keys = _llava_hparams(cfg, ip)
    keys[KEY_IMAGE_GRID_PINPOINTS] = [int(x) for pair in cfg.image_grid_pinpoints for x in pair]
    keys[KEY_MM_PATCH_MERGE_TYPE] = "spatial_unpad"
    return keys


def _llava_blocks(cfg: Any) -> int:
    return max(_llava_feature_layers(cfg))


# vision tower model_type -> (the select strategy llama.cpp's llava graph implements, activations it runs)
LLAVA_TOWERS = {
    "clip_vision_model": ("default", ("quick_gelu", "gelu")),  # CLS first, dropped ('default')
    "siglip_vision_model": ("full", ("gelu_pytorch_tanh",)),  # no CLS: every patch is kept ('full')
}


def _llava_problem(cfg: Any) -> Optional[str]:
    v = _vision(cfg)
    tower = getattr(v, "model_type", None)
    if tower not in LLAVA_TOWERS:
        return (f"llama.cpp's 'mlp' projector graph is written here for the vision towers {sorted(LLAVA_TOWERS)}, "
                f"not {tower!r}")
    strategy, acts = LLAVA_TOWERS[tower]
    if cfg.vision_feature_select_strategy != strategy:
        return (f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} with a {tower} tower: "
                f"llama.cpp's llava graph keeps every patch and drops the CLS position only, which is "
                f"{strategy!r} for this tower")
    if getattr(v, "hidden_act", None) not in acts:
        return f"vision hidden_act {v.hidden_act!r} (llama.cpp's graph runs {list(acts)} for a {tower} tower)"
    if getattr(cfg, "projector_hidden_act", "gelu") != "gelu" or not getattr(cfg, "multimodal_projector_bias", True):
        return "llama.cpp's 'mlp' projector is linear + bias, gelu, linear + bias"
    if any(not 0 <= x <= int(v.num_hidden_layers) for x in _llava_feature_layers(cfg)):
        return f"vision_feature_layer={cfg.vision_feature_layer!r} is outside the vision tower"
    if max(_llava_feature_layers(cfg)) == 0:
        return f"vision_feature_layer={cfg.vision_feature_layer!r}: llama.cpp's llava graph runs at least one block"
    return None


def _llava_next_problem(cfg: Any) -> Optional[str]:
    why = _llava_problem(cfg)
    if why:
        return why
    pinpoints = getattr(cfg, "image_grid_pinpoints", None) or []
    if not pinpoints or any(len(p) != 2 for p in pinpoints):
        return f"image_grid_pinpoints={pinpoints!r}: llama.cpp reads AnyRes resolutions as [height, width] pairs"
    return None


# ---------------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_VISION_EPS = 1e-6  # the LayerNorm / RMSNorm eps transformers hard-codes in the Qwen2(.5)-VL tower
QWEN_IMAGE_SIZE = 560  # Qwen2VLVisionModel's default: the tower has no fixed size (warmup only)


def _qwen2vl_hparams(cfg: Any, ip: Any) -> HParams:
    import gguf

    v = _vision(cfg)
    qwen25 = cfg.model_type == "qwen2_5_vl"
    hidden = v.hidden_size if qwen25 else v.embed_dim  # qwen2_vl's hidden_size is the merger's output
    ffn = v.intermediate_size if qwen25 else v.embed_dim * v.mlp_ratio
    keys = _common(cfg, ip, gguf.VisionProjectorType.QWEN25VL if qwen25 else gguf.VisionProjectorType.QWEN2VL,
                   hidden, ffn, v.depth, v.num_heads, QWEN_VISION_EPS, QWEN_IMAGE_SIZE, v.patch_size)
    keys[gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE] = int(v.spatial_merge_size)
    if qwen25:
        keys[gguf.Keys.ClipVision.USE_SILU] = True
        keys[gguf.Keys.ClipVision.N_WA_PATTERN] = int(v.fullatt_block_indexes[0]) + 1
    return keys


# What llama.cpp's Qwen vision graphs hard-code (clip.cpp 0c1e570), read from no key of the file:
LLAMACPP_QWEN_MERGE = 2  # both graphs merge 2x2 patches
LLAMACPP_QWEN25_WINDOW = 112  # pixels: the qwen2.5vl graph's window-attention windows
LLAMACPP_QWEN25_ROPE_THETA = 10000.0  # the qwen2.5vl graph's vision rope base


def _qwen2vl_problem(cfg: Any) -> Optional[str]:
    v = _vision(cfg)
    if int(v.temporal_patch_size) != 2:
        return f"temporal_patch_size={v.temporal_patch_size}: llama.cpp splits the Conv3d patch embedding in 2"
    if int(v.spatial_merge_size) != LLAMACPP_QWEN_MERGE:
        return f"vision spatial_merge_size={v.spatial_merge_size}: llama.cpp's qwen2vl graphs merge 2x2 patches"
    if cfg.model_type == "qwen2_vl" and v.hidden_act != "quick_gelu":
        return f"vision hidden_act {v.hidden_act!r}: llama.cpp's qwen2vl graph runs quick_gelu"
    if cfg.model_type == "qwen2_5_vl":
        if v.hidden_act != "silu":
            return f"vision hidden_act {v.hidden_act!r}: llama.cpp's qwen2.5vl graph runs silu"
        full = list(v.fullatt_block_indexes)
        step = full[0] + 1 if full else 0
        if not full or any(b - a != step for a, b in zip(full, full[1:])):
            return (f"fullatt_block_indexes={full}: llama.cpp's n_wa_pattern needs full-attention blocks "
                    "every n blocks")
        return _qwen25_window_problem(v)
    return None


def _qwen25_window_problem(v: Any) -> Optional[str]:
    """Why llama.cpp's qwen2.5vl graph would run other windows or rope than the model (None: it runs
    the same). It cuts its window-attention blocks into ``112 / patch_size / 2`` merge units a side and writes
    nothing into the file that could change that (a ``clip.vision.window_size`` key is ignored), so a file of
    a model with other windows would load and run, attending over other patches, with no error anywhere."""
    merge, patch = int(v.spatial_merge_size), int(v.patch_size)  # merge: 2, checked for both Qwen graphs
    ours, theirs = int(v.window_size) // merge // patch, LLAMACPP_QWEN25_WINDOW // LLAMACPP_QWEN_MERGE // patch
    if ours != theirs:
        return (f"vision window_size={v.window_size} (windows of {ours} merge units a side at patch_size={patch}): "
                f"llama.cpp's qwen2.5vl graph always windows by {LLAMACPP_QWEN25_WINDOW} pixels ({theirs} a side) "
                "and no key of the file changes it; real Qwen2.5-VL checkpoints have window_size=112")
    theta = float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", LLAMACPP_QWEN25_ROPE_THETA))
    if theta != LLAMACPP_QWEN25_ROPE_THETA:
        return f"vision rope_theta={theta:g}: llama.cpp's qwen2.5vl graph uses {LLAMACPP_QWEN25_ROPE_THETA:g}"
    return None


def _split_qkv(name: str, t: torch.Tensor, cfg: Any = None) -> List[Tuple[str, torch.Tensor]]:
    """A fused ``attn_qkv`` (rows q, k, v) as ``attn_q``, ``attn_k``, ``attn_v`` (Qwen2VLVisionModel)."""
    c = t.shape[0] // 3
    return [(name.replace(".attn_qkv.", f".attn_{k}."), t[i * c:(i + 1) * c]) for i, k in enumerate("qkv")]


def _split_conv3d(name: str, t: torch.Tensor, cfg: Any = None) -> List[Tuple[str, torch.Tensor]]:
    """The Conv3d patch embedding ``[out, 3, 2, p, p]`` as two Conv2d ``[out, 3, p, p]``, one per frame:
    ``v.patch_embd.weight`` and ``v.patch_embd.weight.1`` (clip.cpp adds the two convolutions)."""
    return [(name, t[:, :, 0]), (name + ".1", t[:, :, 1])]


# ---------------------------------------------------------------------------------- Idefics3 / SmolVLM
def _idefics3_hparams(cfg: Any, ip: Any) -> HParams:
    import gguf

    v = _vision(cfg)
    keys = _common(cfg, ip, gguf.VisionProjectorType.IDEFICS3, v.hidden_size, v.intermediate_size,
                   v.num_hidden_layers, v.num_attention_heads, v.layer_norm_eps, v.image_size, v.patch_size)
    keys[gguf.Keys.ClipVision.Projector.SCALE_FACTOR] = int(cfg.scale_factor)
    keys[gguf.Keys.ClipVision.USE_GELU] = True  # gelu_pytorch_tanh is ggml's (tanh) gelu
    # the processor's longest edge: llama.cpp resizes to it, then tiles by image_size (SmolVLMModel)
    keys[gguf.Keys.ClipVision.PREPROC_IMAGE_SIZE] = int((getattr(ip, "size", None) or {}).get("longest_edge")
                                                        or v.image_size)
    return keys


def _idefics3_problem(cfg: Any) -> Optional[str]:
    v = _vision(cfg)
    if v.hidden_act != "gelu_pytorch_tanh":
        return f"vision hidden_act {v.hidden_act!r}: llama.cpp's idefics3 graph runs gelu (tanh)"
    return None


# ---------------------------------------------------------------------------------- Gemma 3
GEMMA3_DEFAULT_POOL = 4  # clip.cpp's gemma3 n_merge when the file has no clip.vision.projector.scale_factor


def _gemma3_pool(cfg: Any) -> int:
    """The avg-pool kernel: patches per side / image tokens per side (Gemma3VisionModel's
    proj_scale_factor, from ``mm_tokens_per_image``)."""
    v = _vision(cfg)
    side = int(round(int(cfg.mm_tokens_per_image) ** 0.5))
    return (int(v.image_size) // int(v.patch_size)) // max(side, 1)


def _gemma3_hparams(cfg: Any, ip: Any) -> HParams:
    import gguf

    v = _vision(cfg)
    keys = _common(cfg, ip, gguf.VisionProjectorType.GEMMA3, v.hidden_size, v.intermediate_size,
                   v.num_hidden_layers, v.num_attention_heads, v.layer_norm_eps, v.image_size, v.patch_size)
    keys[gguf.Keys.ClipVision.USE_GELU] = True  # SigLIP's gelu_pytorch_tanh is ggml's (tanh) gelu
    if _gemma3_pool(cfg) != GEMMA3_DEFAULT_POOL:  # the converter writes it only when not clip.cpp's default
        keys[gguf.Keys.ClipVision.Projector.SCALE_FACTOR] = _gemma3_pool(cfg)
    return keys


def _gemma3_problem(cfg: Any) -> Optional[str]:
    v = _vision(cfg)
    if getattr(v, "model_type", None) != "siglip_vision_model":
        return f"vision tower {getattr(v, 'model_type', None)!r}: llama.cpp's gemma3 graph is SigLIP's"
    if v.hidden_act != "gelu_pytorch_tanh":
        return f"vision hidden_act {v.hidden_act!r}: llama.cpp's gemma3 graph runs gelu (tanh)"
    tokens, per_side = int(cfg.mm_tokens_per_image), int(v.image_size) // int(v.patch_size)
    side = int(round(tokens ** 0.5))
    if side * side != tokens or per_side % side:
        return (f"mm_tokens_per_image={tokens}: llama.cpp avg-pools the {per_side}x{per_side} patches by a whole "
                "kernel to a square grid, so it must be a square whose side divides "
                f"image_size/patch_size={per_side}")
    return None


def _plus_one(name: str, t: torch.Tensor, cfg: Any = None) -> List[Tuple[str, torch.Tensor]]:
    """``mm.soft_emb_norm.weight`` + 1: Gemma3RMSNorm scales by 1 + weight, clip.cpp by the weight."""
    return [(name, t + 1.0)]


# ---------------------------------------------------------------------------------- Mistral-3 (Pixtral)
PIXTRAL_EPS = 1e-5  # PixtralRMSNorm's eps (hard-coded in transformers; LlavaVisionModel writes it)
PIXTRAL_ROPE_THETA = 10000.0  # clip.cpp's pixtral rope base, hard-coded
IMG_BREAK = "[IMG_BREAK]"


def _pixtral_blocks(cfg: Any) -> int:
    """Blocks before the feature layer: Pixtral has no final norm, so ``hidden_states[k]`` is the output
    of ``k`` blocks and a file with ``k`` blocks computes it (``-1`` = all of them)."""
    n, layer = int(_vision(cfg).num_hidden_layers), cfg.vision_feature_layer
    return n + int(layer) + 1 if int(layer) < 0 else int(layer)


def _mistral3_hparams(cfg: Any, ip: Any) -> HParams:
    import gguf

    v = _vision(cfg)
    keys = _common(cfg, ip, gguf.VisionProjectorType.PIXTRAL, v.hidden_size, v.intermediate_size,
                   _pixtral_blocks(cfg), v.num_attention_heads, PIXTRAL_EPS, v.image_size, v.patch_size)
    keys[gguf.Keys.ClipVision.USE_SILU if v.hidden_act == "silu" else gguf.Keys.ClipVision.USE_GELU] = True
    keys[gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE] = int(cfg.spatial_merge_size)
    return keys


def _mistral3_problem(cfg: Any) -> Optional[str]:
    v = _vision(cfg)
    if getattr(v, "model_type", None) != "pixtral":
        return f"vision tower {getattr(v, 'model_type', None)!r}: llama.cpp's pixtral graph is Pixtral's"
    if v.hidden_act not in ("silu", "gelu"):
        return f"vision hidden_act {v.hidden_act!r}: llama.cpp's pixtral graph runs silu or gelu"
    theta = (getattr(v, "rope_parameters", None) or {}).get("rope_theta", getattr(v, "rope_theta", PIXTRAL_ROPE_THETA))
    if float(theta) != PIXTRAL_ROPE_THETA:
        return f"vision rope_theta={theta}: clip.cpp's pixtral graph hard-codes {PIXTRAL_ROPE_THETA:g}"
    head_dim = getattr(v, "head_dim", None) or v.hidden_size // v.num_attention_heads
    if int(head_dim) * int(v.num_attention_heads) != int(v.hidden_size):
        return (f"vision head_dim={head_dim} with {v.num_attention_heads} heads is not hidden_size={v.hidden_size}: "
                "clip.cpp's heads are hidden_size / n_head wide")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or not 1 <= _pixtral_blocks(cfg) <= int(v.num_hidden_layers):
        return (f"vision_feature_layer={layer!r}: llama.cpp's pixtral graph reads one layer's output (an int, "
                f"after at least one of the {v.num_hidden_layers} blocks)")
    if getattr(cfg, "projector_hidden_act", "gelu") != "gelu":
        return f"projector_hidden_act={cfg.projector_hidden_act!r}: llama.cpp's pixtral projector runs gelu"
    eps = float(text_config_of(cfg).rms_norm_eps)
    if eps != PIXTRAL_EPS:
        return (f"text rms_norm_eps={eps:g}: transformers normalises the patch merger's input with it, llama.cpp "
                f"with the vision eps {PIXTRAL_EPS:g}")
    if int(cfg.spatial_merge_size) < 1:
        return f"spatial_merge_size={cfg.spatial_merge_size}"
    return None


def _permute_rope_rows(name: str, t: torch.Tensor, cfg: Any) -> List[Tuple[str, torch.Tensor]]:
    """q/k rows (weights and biases) from HF's half-split rope layout to llama.cpp's pairs, per head
    (LlavaVisionModel applies LlamaModel.permute to Pixtral's q_proj / k_proj)."""
    from auto_round.export.gguf.arch import rope_order

    return [(name, t[rope_order(t.shape[0], int(_vision(cfg).num_attention_heads))])]


def _img_break_id(tokenizer: Any) -> Optional[int]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return vocab.get(IMG_BREAK)


def _img_break_problem(model: nn.Module, tokenizer: Any) -> Optional[str]:
    if tokenizer is None:
        return f"the mmproj file holds {IMG_BREAK}'s embedding: give the processor (or its tokenizer)"
    tok_id = _img_break_id(tokenizer)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if tok_id is None or not 0 <= tok_id < n_vocab:
        return (f"the tokenizer has no {IMG_BREAK} token inside the {n_vocab}-row embedding (got {tok_id}); "
                "llama.cpp's pixtral graph ends every image row but the last with its embedding")
    return None


def _img_break_embedding(model: nn.Module, tokenizer: Any) -> List[Tuple[str, torch.Tensor]]:
    """``v.token_embd.img_break``: the language model's embedding of ``[IMG_BREAK]`` (clip.cpp appends it
    after each row of image tokens but the last, where transformers' processor puts the token)."""
    import gguf

    why = _img_break_problem(model, tokenizer)
    if why:
        raise ValueError(why)
    row = model.get_input_embeddings().weight[_img_break_id(tokenizer)].detach().float()
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK], row)]


VISION_ARCHS: Tuple[VisionArch, ...] = (
    VisionArch(
        "llava", ("llava",), "model.language_model.",
        (("model.vision_tower.", "vision_tower.vision_model."),
         ("model.multi_modal_projector.", "multi_modal_projector.")),
        _llava_hparams, _llava_blocks, _llava_problem,
        skip=(r"\.post_layernorm\.",), fixes=((r"^mm\.1\.", "mm.0."),),
        why="LLaVA-1.5: clip.cpp's 'mlp' projector reads mm.0 / mm.2 (linear_1 / linear_2, the legacy "
            "surgery names); features are hidden states before post_layernorm, so post_ln is not written, "
            "nor the blocks after the deepest feature layer"),
    VisionArch(
        "qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "model.language_model.", (("model.visual.", "visual."),),
        _qwen2vl_hparams, lambda cfg: int(_vision(cfg).depth), _qwen2vl_problem,
        splits=((r"\.attn_qkv\.", _split_qkv), (r"^v\.patch_embd\.weight$", _split_conv3d)),
        why="merger inside the vision tower (ln_q -> v.post_ln, mlp.0/2 -> mm.0/2); fused qkv split in three; "
            "Conv3d patch embedding split into two Conv2d; 2.5: gated silu MLP, window attention every "
            "n_wa_pattern blocks"),
    VisionArch(
        "idefics3", ("idefics3", "smolvlm"), "model.text_model.",
        (("model.vision_model.", "model.vision_model."), ("model.connector.", "model.connector.")),
        _idefics3_hparams, lambda cfg: int(_vision(cfg).num_hidden_layers), _idefics3_problem,
        f32=(r"\.embeddings\.",),
        why="SigLIP-style tower (post_layernorm used), pixel-shuffle by scale_factor then one linear "
            "(connector.modality_projection.proj -> mm.model.fc); SmolVLMModel writes the embeddings F32"),
    VisionArch(
        "gemma3", ("gemma3",), "model.language_model.",
        (("model.multi_modal_projector.mm_input_projection_weight",
          "multi_modal_projector.mm_input_projection.weight"),
         ("model.vision_tower.", "vision_tower.vision_model."),
         ("model.multi_modal_projector.", "multi_modal_projector.")),
        _gemma3_hparams, lambda cfg: int(_vision(cfg).num_hidden_layers), _gemma3_problem,
        skip=(r"^model\.vision_tower\.head\.",), splits=((r"^mm\.soft_emb_norm\.weight$", _plus_one),),
        f32=(r"\.embeddings\.",),
        why="SigLIP tower (post_layernorm used), avg-pool to mm_tokens_per_image, RMSNorm (soft_emb_norm, "
            "written + 1), then x @ mm_input_projection_weight ([vision, text] as stored: clip.cpp transposes "
            "it); Gemma3VisionModel writes the embeddings F32"),
    VisionArch(
        "llava_next", ("llava_next",), "model.language_model.",
        (("model.image_newline", "model.image_newline"), ("model.vision_tower.", "vision_tower.vision_model."),
         ("model.multi_modal_projector.", "multi_modal_projector.")),
        _llava_next_hparams, _llava_blocks, _llava_next_problem,
        skip=(r"\.post_layernorm\.", r"^model\.vision_tower\.head\."), fixes=((r"^mm\.1\.", "mm.0."),),
        why="LLaVA-NeXT: LLaVA's 'mlp' file (CLIP tower with 'default', or SigLIP with 'full'; feature layers, "
            "mm.0 / mm.2) plus the AnyRes pinpoints, spatial_unpad and image_newline (v.image_newline, "
            "gguf-py's name; clip.cpp 0c1e570 reads it under that name and mtmd does not use it for this "
            "projector)"),
    VisionArch(
        "mistral3", ("mistral3",), "model.language_model.",
        (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")),
        _mistral3_hparams, _pixtral_blocks, _mistral3_problem,
        splits=((r"\.attn_[qk]\.(weight|bias)$", _permute_rope_rows),),
        extra=_img_break_embedding, extra_problem=_img_break_problem,
        why="Pixtral tower (RMSNorm, gated MLP, 2D rope: q/k rows permuted per head), patch merger "
            "(norm -> mm.input_norm, merging_layer -> mm.patch_merger), linear_1/2 -> mm.1/2 with gelu; the "
            "[IMG_BREAK] embedding from the language model's embed_tokens (v.token_embd.img_break)"),
)


def supported_vlm_types() -> List[str]:
    """The VLM ``model_type`` values whose mmproj is written."""
    return sorted(t for a in VISION_ARCHS for t in a.model_types)


def vision_arch_of(model: nn.Module) -> Optional[VisionArch]:
    """The :class:`VisionArch` of a VLM ``model`` (by its top-level ``config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((a for a in VISION_ARCHS if model_type in a.model_types), None)


def split_processor(tokenizer: Any) -> Tuple[Any, Any]:
    """``(tokenizer, image processor)`` from what the exporter was given: a processor (its
    ``tokenizer`` and ``image_processor``) or a tokenizer (no image processor)."""
    if hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer, tokenizer.image_processor
    return tokenizer, None


def vlm_problem(model: nn.Module, image_processor: Any, tokenizer: Any = None) -> Optional[str]:
    """Why the mmproj of VLM ``model`` cannot be written (None if it can, or if ``model`` is no VLM);
    ``tokenizer``: for the families whose file holds a token's embedding (Mistral-3)."""
    if not is_vlm(model):
        return None
    model_type = getattr(model.config, "model_type", None)
    arch = vision_arch_of(model)
    if arch is None:
        return (f"the vision side of {model_type!r} has no mmproj writer here (VLMs supported: "
                f"{supported_vlm_types()}); export with format='auto_round' instead")
    why = arch.problem(model.config)
    if why:
        return (f"its vision tower cannot be written for llama.cpp: {why}; export this model with "
                "format='auto_round' instead")
    if image_processor is None or getattr(image_processor, "image_mean", None) is None:
        return ("the mmproj file needs the image processor's image_mean / image_std; give the processor "
                "(AutoRoundMLLM(..., processor=...), or pass it as the tokenizer)")
    unnamed = [n for n, g in mmproj_names(model, arch) if g is None]
    if unnamed:
        return f"{len(unnamed)} vision parameters have no llama.cpp mmproj tensor name: {unnamed[:4]}"
    if arch.extra_problem is not None:
        return arch.extra_problem(model, tokenizer)
    return None


def text_names(model: nn.Module) -> List[Tuple[str, str]]:
    """``(parameter name, name to map to a llama.cpp text tensor)`` for the language model's parameters:
    all of them for a text LM; for a VLM those under its ``text_prefix`` (renamed ``model.``) and
    ``lm_head``, the vision side being the mmproj's."""
    arch = vision_arch_of(model) if is_vlm(model) else None
    out = []
    for name, _ in model.named_parameters():
        if arch is None:
            out.append((name, name))
        elif name.startswith(arch.text_prefix):
            out.append((name, "model." + name[len(arch.text_prefix):]))
        elif not any(name.startswith(p) for p, _ in arch.renames):
            out.append((name, name))  # lm_head
    return out


def _renamed(name: str, arch: VisionArch) -> Optional[str]:
    return next((ck + name[len(p):] for p, ck in arch.renames if name.startswith(p)), None)


def mmproj_names(model: nn.Module, arch: VisionArch) -> List[Tuple[str, Optional[str]]]:
    """``(parameter name, GGUF mmproj name or None)`` for the vision parameters llama.cpp reads (the
    ``skip`` ones and blocks beyond ``n_blocks`` left out), before splits."""
    import gguf

    n_blocks = arch.n_blocks(model.config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(n_blocks, 1) + 64)
    out: List[Tuple[str, Optional[str]]] = []
    for name, _ in model.named_parameters():
        ck = _renamed(name, arch)
        if ck is None or any(re.search(s, name) for s in arch.skip):
            continue
        gname = tmap.get_name(ck, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            for pattern, repl in arch.fixes:
                gname = re.sub(pattern, repl, gname)
            block = re.match(r"v\.blk\.(\d+)\.", gname)
            if block and int(block.group(1)) >= n_blocks:
                continue
        out.append((name, gname))
    return out


@dataclass
class MmprojTensor:
    """One tensor of the mmproj file: GGUF name, numpy shape and dtype, and its values."""

    name: str
    shape: Tuple[int, ...]
    dtype: Any  # np.float16 / np.float32
    value: Callable[[], torch.Tensor]


def ggml_float_type(name: str, ndim: int) -> Any:
    """The numpy dtype convert_hf_to_gguf gives an F16 mmproj's tensor ``name`` (module docstring)."""
    if ndim <= 1 or name.endswith("_norm.weight"):
        return np.float32
    if ".patch_embd.weight" in name:
        return np.float16
    if ".position_embd." in name or not name.endswith(".weight"):
        return np.float32
    return np.float16


def plan_mmproj(model: nn.Module, layers: Dict[str, QuantizedWeight], arch: VisionArch,
                tokenizer: Any = None) -> List[MmprojTensor]:
    """Every tensor of the mmproj file, in order (values made lazily, one at a time)."""
    params = dict(model.named_parameters())
    planned: List[MmprojTensor] = []
    for hf_name, gname in mmproj_names(model, arch):
        if gname is None:
            raise ValueError(f"{hf_name} has no llama.cpp mmproj tensor name")
        value = _tuned_value(hf_name, params[hf_name], layers)
        parts = [(gname, value)]
        for pattern, split in arch.splits:
            if re.search(pattern, gname):
                parts = split(gname, value, model.config)
                break
        forced = any(re.search(r, hf_name) for r in arch.f32)
        for name, t in parts:
            dtype = np.float32 if forced else ggml_float_type(name, t.dim())
            if dtype == np.float16 and bool(t.abs().max() > FP16_MAX):
                logger.warning("gguf mmproj: %s has values beyond fp16's range; written as F32", name)
                dtype = np.float32
            planned.append(MmprojTensor(name, tuple(t.shape), dtype, lambda t=t: t))
    for name, t in arch.extra(model, tokenizer) if arch.extra is not None else ():
        planned.append(MmprojTensor(name, tuple(t.shape), ggml_float_type(name, t.dim()), lambda t=t: t))
    return planned


def _tuned_value(hf_name: str, param: torch.Tensor, layers: Dict[str, QuantizedWeight]) -> torch.Tensor:
    """The parameter, or for a tuned vision layer (``quant_nontext_module``) its dequantized weight / bias."""
    module, _, kind = hf_name.rpartition(".")
    qw = layers.get(module)
    if qw is not None and kind == "weight":
        return qw.dequantize().reshape(param.shape)
    if qw is not None and kind == "bias" and qw.bias is not None:
        return qw.bias.detach().float()
    return param.detach().float()


def mmproj_file_name(text_file: str) -> str:
    """``mmproj-<name>-F16.gguf`` for the text file ``<name>-<TYPE>.gguf``."""
    return f"mmproj-{text_file.rsplit('-', 1)[0]}-F16.gguf"


def _add_key(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"mmproj key {key}: cannot write a {type(value).__name__}")


def write_mmproj(path: Path, model: nn.Module, layers: Dict[str, QuantizedWeight], image_processor: Any,
                 extra: Sequence[Tuple[str, Any]] = (), tokenizer: Any = None) -> List[MmprojTensor]:
    """Write the mmproj GGUF of VLM ``model`` to ``path`` (streamed, one tensor in memory at a time);
    returns the tensors written. ``extra``: more ``(key, value)`` metadata; ``tokenizer``: the VLM's
    (Mistral-3's file holds the ``[IMG_BREAK]`` embedding)."""
    import gguf

    arch = vision_arch_of(model)
    why = vlm_problem(model, image_processor, tokenizer)
    if arch is None or why:
        raise ValueError(f"cannot write the mmproj of this {getattr(model.config, 'model_type', None)!r} model: "
                         f"{why or 'not a supported VLM'}")
    tensors = plan_mmproj(model, layers, arch, tokenizer)
    writer = gguf.GGUFWriter(path, MMPROJ_ARCH)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(path.stem)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    for key, value in list(arch.hparams(model.config, image_processor).items()) + list(extra):
        _add_key(writer, key, value)
    for t in tensors:
        nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
        writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType.F16 if t.dtype == np.float16
                               else gguf.GGMLQuantizationType.F32)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(np.ascontiguousarray(t.value().cpu().numpy().astype(t.dtype)))
    finally:
        writer.close()
    return tensors


def iter_vision_layers(model: nn.Module, layers: Iterable[str]) -> Iterator[str]:
    """The layer names among ``layers`` that belong to the vision side (the mmproj's, written F16)."""
    arch = vision_arch_of(model)
    if arch is None:
        return iter(())
    return (n for n in layers if any(n.startswith(p) for p, _ in arch.renames))
