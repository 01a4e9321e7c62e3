"""Model families llama.cpp runs from this exporter's files, as data, and their GGUF hyperparameters.

Facts follow llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/llama.py`` ``LlamaModel``,
``conversion/qwen.py`` ``Qwen2Model``, ``conversion/qwenvl.py`` ``Qwen2VLModel``,
``conversion/gemma.py`` ``Gemma3Model``, ``TextModel.set_gguf_parameters``) and, for what llama.cpp
hard-codes, ``src/llama-model.cpp`` (gemma3: ``set_swa_pattern(6)``, SWA rope base 10000, the
attention scale). A vision-language model's language model is matched by its text
config's ``model_type`` (:func:`model_type_of`); its vision side is :mod:`.mmproj`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from auto_round.models import text_config  # noqa: F401  (also read as archmod.text_config)

# Rope types llama.cpp reads for these families ("llama3" through a rope_freqs tensor).
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class GGUFFamily:
    """HF ``model_type`` values written as one llama.cpp architecture."""

    model_types: Tuple[str, ...]
    arch: str  # general.architecture
    # Reorder q_proj/k_proj rows per head from HF's half-split rope layout (rotate_half) to the
    # consecutive pairs llama.cpp's LLAMA_ROPE_TYPE_NORM rotates.
    permute_qk: bool
    rope_types: Tuple[str, ...]
    why: str
    # M-RoPE (Qwen2-VL): rope.dimension_sections from rope_parameters["mrope_section"], padded to 4.
    mrope: bool = False
    # False: only the language model of a VLM (written beside its mmproj, see .mmproj), never a model alone.
    standalone: bool = True
    # Added to every ``*norm.weight`` of the language model (Gemma's RMSNorm scales by 1 + weight; convert
    # writes weight + 1, which llama.cpp multiplies by).
    norm_shift: float = 0.0
    # The arch runs the config's sliding-window attention (no note that llama.cpp ignores it).
    sliding_window: bool = False
    # Family-specific: why llama.cpp cannot run this text config (or None), and more {arch}.* keys.
    problem: Optional[Callable[[Any], Optional[str]]] = None
    extra_keys: Optional[Callable[[Any, Any], None]] = None  # (writer, text config)


# ---------------------------------------------------------------------------------- Gemma 3
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3: layer i uses the sliding window unless i % 6 == 5
GEMMA3_SWA_ROPE_BASE = 10000.0  # llama.cpp's gemma3: rope base of the sliding layers, hard-coded
GEMMA3_27B_LAYERS = 62  # llama.cpp scales attention by 1/sqrt(n_embd/n_head) at this depth only


def gemma3_layer_types(n_layers: int) -> List[str]:
    """The attention type of each layer in llama.cpp's gemma3 arch (``set_swa_pattern(6)``)."""
    return ["full_attention" if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1 else "sliding_attention"
            for i in range(n_layers)]


def _gemma3_problem(cfg: Any) -> Optional[str]:
    n = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or [])
    if types and types != gemma3_layer_types(n):
        return (f"layer_types={types}: llama.cpp's gemma3 arch hard-codes full attention on every "
                f"{GEMMA3_SWA_PATTERN}th layer ({gemma3_layer_types(n)}); a config with another pattern "
                "cannot be written")
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"hidden_activation={cfg.hidden_activation!r}: llama.cpp's gemma3 FFN runs gelu (tanh)"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return f"attn_logit_softcapping={cfg.attn_logit_softcapping}: llama.cpp's gemma3 has no attention softcap"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True (an embedding model): llama.cpp's gemma3 arch is causal"
    scale = (cfg.hidden_size / cfg.num_attention_heads) if n == GEMMA3_27B_LAYERS else head_dim(cfg)
    if float(getattr(cfg, "query_pre_attn_scalar", scale)) != float(scale):
        return (f"query_pre_attn_scalar={cfg.query_pre_attn_scalar}: llama.cpp's gemma3 scales attention by "
                f"1/sqrt({scale:g}) for a {n}-layer model")
    raw = getattr(cfg, "rope_parameters", None) or {}
    local = dict(raw["sliding_attention"]) if isinstance(raw.get("sliding_attention"), dict) else {
        "rope_type": "default", "rope_theta": getattr(cfg, "rope_local_base_freq", GEMMA3_SWA_ROPE_BASE)}
    local.setdefault("rope_type", "default")
    if local["rope_type"] != "default" or float(local.get("rope_theta", GEMMA3_SWA_ROPE_BASE)) != GEMMA3_SWA_ROPE_BASE:
        return (f"sliding-layer rope {local}: llama.cpp's gemma3 hard-codes rope_theta "
                f"{GEMMA3_SWA_ROPE_BASE:g} without scaling there")
    return None


def _gemma3_keys(writer: Any, cfg: Any) -> None:
    """convert's Gemma3Model: the sliding window, and the final logit softcap when the config has one."""
    writer.add_sliding_window(int(cfg.sliding_window))
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


FAMILIES: Tuple[GGUFFamily, ...] = (
    GGUFFamily(("llama", "mistral"), "llama", True, ROPE_TYPES,
               "convert_hf_to_gguf's LlamaModel (which also converts MistralForCausalLM) permutes q/k rows "
               "for the NORM rope; llama.cpp's llama arch ignores Mistral's sliding window, as convert does"),
    GGUFFamily(("qwen2",), "qwen2", False, ("default", "linear", "yarn"),
               "qwen2 is a NEOX-rope arch in llama.cpp (half-split, like HF): Qwen2Model writes q/k rows "
               "as they are; it has no rope_freqs tensor, so llama3 rope scaling is not representable"),
    GGUFFamily(("qwen2_vl_text", "qwen2_5_vl_text"), "qwen2vl", False, ("default",),
               "the language model of Qwen2-VL / Qwen2.5-VL: qwen2's tensors, NEOX-style M-RoPE whose "
               "(temporal, height, width) sections convert_hf_to_gguf writes as rope.dimension_sections",
               mrope=True, standalone=False),
    GGUFFamily(("gemma3_text",), "gemma3", False, ("default", "linear"),
               "the language model of Gemma-3 (Gemma3ForConditionalGeneration, written beside its mmproj): NEOX "
               "rope (rows as they are), q/k norms and pre/post norms, every *norm.weight + 1 (Gemma3RMSNorm's "
               "1 + weight, as Gemma3Model writes it); llama.cpp hard-codes the sliding pattern (every 6th layer "
               "full) and the sliding layers' rope base 10000, so other configs are refused; the full layers' "
               "rope is rope_parameters['full_attention']; lm_head is tied",
               standalone=False, norm_shift=1.0, sliding_window=True, problem=_gemma3_problem,
               extra_keys=_gemma3_keys),
)


def supported_model_types() -> List[str]:
    """The ``model_type`` values of the text causal LMs written alone."""
    return sorted(t for f in FAMILIES if f.standalone for t in f.model_types)


def is_vlm(model: nn.Module) -> bool:
    """Whether ``model``'s config has a vision side (a ``vision_config``) beside its text config."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vision_config", None) is not None and text_config(model) is not cfg


def model_type_of(model: nn.Module) -> Optional[str]:
    """The ``model_type`` naming the language model: the text config's for a VLM, else the config's."""
    cfg = text_config(model) if is_vlm(model) else getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def family_of(model: nn.Module) -> Optional[GGUFFamily]:
    """The family record of ``model``'s language model (by :func:`model_type_of`), or None."""
    model_type = model_type_of(model)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def rope_parameters(cfg: Any, layer_type: str = "full_attention") -> Dict[str, Any]:
    """rope settings as one dict (transformers >= 5 ``rope_parameters``, older ``rope_scaling`` +
    ``rope_theta``), with ``rope_type`` always set. A config with one rope per layer type (Gemma-3:
    ``{"sliding_attention": {...}, "full_attention": {...}}``) gives ``layer_type``'s (convert writes
    the full-attention one as the arch's rope)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def config_problem(model: nn.Module, family: GGUFFamily) -> Optional[str]:
    """Why this model's config cannot be written for ``family`` (None if it can)."""
    cfg = text_config(model)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size", "rms_norm_eps") if getattr(cfg, k, None) is None]
    if missing:
        return f"the config lacks {missing}"
    rope_type = rope_parameters(cfg)["rope_type"]
    if rope_type not in family.rope_types:
        return (f"rope_type {rope_type!r} is not representable for llama.cpp arch {family.arch!r} "
                f"(supported: {list(family.rope_types)})")
    if family.permute_qk and head_dim(cfg) % 2:
        return f"head_dim={head_dim(cfg)} is odd; rope pairs need an even head size"
    if family.mrope:
        sections = rope_parameters(cfg).get("mrope_section")
        if not sections or len(sections) > 4 or 2 * sum(sections) != head_dim(cfg):
            return (f"M-RoPE needs rope_parameters['mrope_section'] (at most 4 sections summing to head_dim/2="
                    f"{head_dim(cfg) // 2}), not {sections!r}")
    why = family.problem(cfg) if family.problem is not None else None
    if why:
        return f"{why}; export this model with format='auto_round' instead"
    return None


def config_notes(model: nn.Module, family: GGUFFamily) -> List[str]:
    """What llama.cpp will run differently from transformers for this config (announced, not refused)."""
    cfg = text_config(model)
    if family.sliding_window:
        return []
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True)
    if window and uses_window and window < int(getattr(cfg, "max_position_embeddings", 0) or 0):
        return [f"llama.cpp's {family.arch!r} arch has no sliding-window attention: contexts beyond "
                f"{window} tokens attend to everything (convert_hf_to_gguf writes these models the same way)"]
    return []


def rope_order(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns HF's half-split rope rows into llama.cpp's consecutive pairs.

    Per head of ``hd = n_rows / n_head`` rows, new row ``2*i + t`` is old row ``t*hd/2 + i``: the
    same reordering as convert_hf_to_gguf's ``LlamaModel.permute`` (reshape ``(n_head, 2, hd/2)``,
    swap the last two axes). ``new = old[rope_order(...)]``.
    """
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def llama3_rope_factors(params: Dict[str, Any], dim: int) -> torch.Tensor:
    """The ``rope_freqs.weight`` float32 ``[dim / 2]`` that llama.cpp divides each rope frequency
    by for ``rope_type "llama3"`` (Llama 3.1's smooth interpolation between low and high
    frequencies)."""
    base = float(params.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def add_hparams(writer: Any, model: nn.Module, family: GGUFFamily) -> None:
    """Write ``{arch}.*`` hyperparameters (the keys convert_hf_to_gguf writes for these families)."""
    cfg = text_config(model)
    n_head = int(cfg.num_attention_heads)
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    hd = head_dim(cfg)
    writer.add_rope_dimension_count(hd)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    params = rope_parameters(cfg)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    if family.mrope:
        sections = [int(x) for x in params["mrope_section"]]
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    _add_rope_scaling(writer, params, int(getattr(cfg, "max_position_embeddings", 2048)))
    if family.extra_keys is not None:
        family.extra_keys(writer, cfg)


def _add_rope_scaling(writer: Any, params: Dict[str, Any], ctx: int) -> None:
    import gguf

    rope_type, factor = params["rope_type"], params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(params.get("original_max_position_embeddings") or ctx))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if params.get(key) is not None:
                add(float(params[key]))


def extra_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the HF model has no parameter for (llama3 ``rope_freqs``)."""
    cfg = text_config(model)
    params = rope_parameters(cfg)
    if params["rope_type"] == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(params, head_dim(cfg))}
    return {}
