"""Tiny stand-ins for six VLM families whose modeling code ships with their checkpoints.

Phi-3.5-Vision (``phi3_v``), CogVLM2 (``cogvlm2``), DeepSeek-VL2 (``deepseek_vl_v2``), Molmo (``molmo``),
Kimi-VL (``kimi_vl``) and GLM-4V-9B (``chatglm``) load with ``trust_remote_code`` (DeepSeek-VL2 from its
``deepseek_vl2`` package); none of that code is available offline. Each model here is a stand-in
mirroring the published module tree and forward signature; not the real model. The attribute names
along the paths that ``auto_round.mllm.families`` uses, the forward keyword arguments and the way inputs
are built (processor call, ``build_conversation_input_ids``, ``process``, ``apply_chat_template``) follow
the published code; the arithmetic is deliberately simple (no rotary embeddings, no KV cache, plain
attention, greedy ``generate`` that re-runs the whole sequence). See ``tests/REMOTE_STANDINS.md``.

Sizes: text hidden 64, 2 decoder layers, vision hidden 32 with 2 blocks, vocabulary = the shared test
tokenizer (512 ids) plus the family's special tokens, rounded up to a multiple of 32. Every nn.Linear has
in_features divisible by 32. Parameters that the published code initialises to zero (separators, boi/eoi,
pad embeddings, class embeddings) are random here so the image reaches the logits.

Use::

    with registered():                       # AutoConfig / AutoModelForCausalLM know the six types
        s = STANDINS["cogvlm2"]()
        inputs = s.inputs("What is shown?", make_image((28, 28)))
        s.model(**inputs).logits; s.model.generate(**inputs, max_new_tokens=3)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModelForCausalLM, BatchEncoding, BatchFeature, CLIPVisionConfig,
                          CLIPVisionModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast)
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenizer_fixture import make_tokenizer

NOTE = "stand-in mirroring the published module tree and forward signature; not the real model"
H, HEADS, FF = 64, 4, 128  # text hidden, heads, MLP width
VH, VHEADS, VFF, VLAYERS = 32, 2, 64, 2  # vision hidden, heads, MLP width, blocks


# --------------------------------------------------------------------------------------------- helpers
def _tokenizer(*specials: str) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(make_tokenizer())
    new = [s for s in specials if s not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    return tok


def _vocab(tok) -> int:
    return -(-len(tok) // 32) * 32


def _pixels(image, size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """``[3, size, size]`` float pixels of a PIL image, normalised."""
    from PIL import Image

    img = image.convert("RGB").resize((size, size), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (t - mean) / std


def _causal_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int, dtype, device) -> torch.Tensor:
    """Additive ``[B, 1, T, T]`` mask: causal, padded keys hidden (finite, so padded rows stay finite)."""
    neg = torch.finfo(dtype).min
    mask = torch.full((length, length), neg, dtype=dtype, device=device).triu(1)[None, None]
    mask = mask.expand(batch, 1, length, length).clone()
    if attention_mask is not None:
        mask = mask.masked_fill(~attention_mask.bool()[:, None, None, :], neg)
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Multi-head attention over ``[B, T, heads * d]`` projections."""
    def split(x):
        return x.reshape(*x.shape[:2], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(*q.shape[:2], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaStyleMLP(nn.Module):
    """``gate_proj`` / ``up_proj`` / ``down_proj`` SwiGLU (CogVLM2 experts, DeepSeek-V2/V3 MLPs)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StandInPreTrainedModel(PreTrainedModel):
    """Shared base: torch default init (seeded by the factory) and a greedy ``generate``."""

    base_model_prefix = "model"
    # Per-token inputs that grow with each generated token: key -> fill value, or a callable(prev column).
    grow_inputs: Dict[str, Any] = {"attention_mask": 1}

    def _init_weights(self, module: nn.Module) -> None:  # keep torch's (seeded) default initialisation
        pass

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int = 16, do_sample: bool = False,
                 **inputs: Any) -> torch.LongTensor:
        """Greedy decoding, re-running the whole sequence each step (no KV cache)."""
        if do_sample:
            raise NotImplementedError("the stand-ins decode greedily only")
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(input_ids=ids, **inputs).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True).to(ids.dtype)], 1)
            for key, fill in self.grow_inputs.items():
                prev = inputs.get(key)
                if isinstance(prev, torch.Tensor) and prev.dim() == 2 and prev.shape[1] == ids.shape[1] - 1:
                    col = fill(prev[:, -1:]) if callable(fill) else torch.full_like(prev[:, :1], fill)
                    inputs[key] = torch.cat([prev, col.to(prev.dtype)], 1)
        return ids


def _output(logits: torch.Tensor, hidden: torch.Tensor, return_dict: Optional[bool] = True):
    out = CausalLMOutputWithPast(logits=logits, hidden_states=(hidden,))
    return out if return_dict is not False else (logits,)


# ---------------------------------------------------------------------------------------------- phi3_v
class Phi3VConfig(PretrainedConfig):
    model_type = "phi3_v"

    def __init__(self, vocab_size=544, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
                 num_attention_heads=HEADS, rms_norm_eps=1e-5, img_processor=None, embd_layer=None, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        # Published: {"name": "clip_vision_model", "model_name": "openai/clip-vit-large-patch14-336", ...};
        # the stand-in carries a tiny CLIP config instead of the hard-coded CLIP-L/336 one.
        self.img_processor = img_processor or {
            "name": "clip_vision_model", "image_dim_out": VH, "num_img_tokens": 1, "layer_idx": -2,
            "type_feature": "patch", "clip": dict(hidden_size=VH, intermediate_size=VFF, num_hidden_layers=VLAYERS,
                                                   num_attention_heads=VHEADS, image_size=28, patch_size=14)}
        self.embd_layer = embd_layer or {"embedding_cls": "image", "hd_transform_order": "sub_glb",
                                         "projection_cls": "mlp", "use_hd_transform": True,
                                         "with_learnable_separator": True}
        super().__init__(**kwargs)


class Phi3ImageEmbedding(nn.Module):
    """``img_processor`` (a transformers CLIPVisionModel, as published), ``img_projection`` MLP on 2x2-merged
    patches, ``glb_GN`` / ``sub_GN`` separators. Image positions are the negative ids of ``input_ids``."""

    def __init__(self, config: Phi3VConfig, wte: nn.Embedding) -> None:
        super().__init__()
        self.__dict__["wte"] = wte  # shared with model.embed_tokens, not registered twice
        ip = config.img_processor
        self.img_processor = CLIPVisionModel(CLIPVisionConfig(**ip["clip"]))
        self.crop = ip["clip"]["image_size"]
        self.image_dim_out, self.layer_idx = ip["image_dim_out"], ip["layer_idx"]
        c4 = 4 * self.image_dim_out
        self.glb_GN = nn.Parameter(torch.randn(1, 1, c4) * 0.5)
        self.sub_GN = nn.Parameter(torch.randn(1, 1, 1, c4) * 0.5)
        self.img_projection = nn.Sequential(nn.Linear(c4, config.hidden_size), nn.GELU(),
                                            nn.Linear(config.hidden_size, config.hidden_size))

    def get_img_features(self, img_embeds: torch.Tensor) -> torch.Tensor:
        out = self.img_processor(img_embeds, output_hidden_states=True)
        return out.hidden_states[self.layer_idx][:, 1:]

    @staticmethod
    def _merge2x2(feats: torch.Tensor, h_crop: int, w_crop: int) -> torch.Tensor:
        n, length, c = feats.shape
        s = int(math.isqrt(length))
        x = feats.reshape(n, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s // 2, s // 2, 4 * c)
        x = x.reshape(n // (h_crop * w_crop), h_crop, w_crop, s // 2, s // 2, 4 * c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, h_crop * s // 2, w_crop * s // 2, 4 * c)

    def _newline(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        return torch.cat([x, self.sub_GN.expand(n, h, -1, -1)], 2).reshape(n, -1, c)

    def forward(self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, image_sizes=None) -> torch.Tensor:
        positions = torch.nonzero(input_ids < 0, as_tuple=True)
        hidden = self.wte(input_ids.clamp_min(0))
        if len(positions[0]) == 0:
            return hidden
        n_img, n_crops = pixel_values.shape[:2]
        feats = self.get_img_features(pixel_values.flatten(0, 1)).reshape(n_img, n_crops, -1, self.image_dim_out)
        glb = self._newline(self._merge2x2(feats[:, 0], 1, 1))
        pieces = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            hc, wc = h // self.crop, w // self.crop
            sub = self._newline(self._merge2x2(feats[i, 1:1 + hc * wc], hc, wc))
            pieces += [sub[0], self.glb_GN[0], glb[i]]
        proj = self.img_projection(torch.cat(pieces, 0).to(hidden.dtype))
        return hidden.index_put(positions, proj)


class Phi3Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask):
        q, k, v = self.qkv_proj(x).chunk(3, -1)
        return self.o_proj(_attend(q, k, v, self.heads, mask))


class Phi3MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn, self.mlp = Phi3Attention(config), Phi3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        return (h + self.mlp(self.post_attention_layernorm(h)),)


class Phi3VModel(nn.Module):
    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = Phi3ImageEmbedding(config, wte=self.embed_tokens)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, image_sizes=None, use_cache=None, **_):
        if inputs_embeds is None:
            if pixel_values is not None and image_sizes is not None:
                inputs_embeds = self.vision_embed_tokens(input_ids, pixel_values=pixel_values, image_sizes=image_sizes)
            else:
                inputs_embeds = self.embed_tokens(input_ids.clamp_min(0))
        b, t = inputs_embeds.shape[:2]
        mask = _causal_mask(attention_mask, b, t, inputs_embeds.dtype, inputs_embeds.device)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_value=None, use_cache=use_cache)[0]
        return self.norm(h)


class Phi3VForCausalLM(StandInPreTrainedModel):
    """Phi-3 / Phi-3.5-Vision: stand-in mirroring the published module tree and forward signature; not the
    real model."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, image_sizes=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, pixel_values=pixel_values, image_sizes=image_sizes,
                       use_cache=use_cache)
        return _output(self.lm_head(h).float(), h, return_dict)


class Phi3VProcessorStandIn:
    """Published call: ``processor(prompt, [images], return_tensors="pt")`` with ONE string prompt holding
    ``<|image_1|>``...; each image becomes ``-image_id`` repeated ``num_img_tokens`` times. Pixels are
    ``[n_images, 1 + crops, 3, crop, crop]`` (global view first) and ``image_sizes [n_images, 2]``; the stand-in
    resizes every image to one crop."""

    def __init__(self, tokenizer, crop: int = 28) -> None:
        self.tokenizer, self.crop = tokenizer, crop
        self.num_img_tokens = 5  # sub (1 x 2) + glb_GN + global (1 x 2) for a 1x1-crop image

    def __call__(self, text: str, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors="pt") -> BatchFeature:
        if not images:
            return BatchFeature(dict(self.tokenizer(text, return_tensors=return_tensors)))
        if not isinstance(text, str):
            raise TypeError("Phi3VProcessor takes one prompt string")  # as published (re.split on it)
        pattern = r"<\|image_\d+\|>"
        chunks = [self.tokenizer(c).input_ids for c in re.split(pattern, text)]
        tags = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(pattern, text)]
        assert sorted(set(tags)) == list(range(1, len(images) + 1)), "image tags must be <|image_1|>..<|image_n|>"
        ids: List[int] = []
        for i, chunk in enumerate(chunks):
            ids += chunk
            if i < len(tags):
                ids += [-tags[i]] * self.num_img_tokens
        input_ids = torch.tensor(ids, dtype=torch.long)[None]
        px = torch.stack([torch.stack([_pixels(im, self.crop)] * 2) for im in images])
        sizes = torch.tensor([[self.crop, self.crop]] * len(images))
        return BatchFeature({"input_ids": input_ids, "attention_mask": (input_ids > -1000000).long(),
                             "pixel_values": px, "image_sizes": sizes})


PHI3_CHAT = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# ------------------------------------------------------------------------- EVA2-CLIP (CogVLM2, GLM-4V)
class EVAPatchEmbedding(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        p = vc["patch_size"]
        self.proj = nn.Conv2d(vc["in_channels"], vc["hidden_size"], kernel_size=p, stride=p)
        self.cls_embedding = nn.Parameter(torch.randn(1, vc["hidden_size"]) * 0.5)
        self.position_embedding = nn.Embedding(vc["num_positions"], vc["hidden_size"])

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], 1)
        return x + self.position_embedding.weight[None]


class EVAAttention(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.heads = vc["num_heads"]
        self.query_key_value = nn.Linear(vc["hidden_size"], 3 * vc["hidden_size"])
        self.dense = nn.Linear(vc["hidden_size"], vc["hidden_size"])

    def forward(self, x):
        q, k, v = self.query_key_value(x).chunk(3, -1)
        return self.dense(_attend(q, k, v, self.heads))


class EVAMLP(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EVATransformerLayer(nn.Module):
    """Post-norm EVA2-CLIP layer, ``forward(hidden_states)`` as published."""

    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])
        self.attention = EVAAttention(vc)
        self.mlp = EVAMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])

    def forward(self, hidden_states):
        h = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return h + self.post_attention_layernorm(self.mlp(h))


class EVATransformer(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EVATransformerLayer(vc) for _ in range(vc["num_hidden_layers"]))

    def forward(self, hidden_states):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class GLU(nn.Module):
    def __init__(self, hidden: int, inter: int, in_features: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(hidden, inter, bias=False)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.dense_4h_to_h = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """``patch_embedding`` -> ``transformer.layers`` -> drop CLS -> 2x2 ``conv`` -> ``linear_proj`` (GLU) -> boi/eoi.
    ``conv_out``: CogVLM2 keeps the vision width, GLM-4V maps to the text width (as published)."""

    def __init__(self, config, conv_out: int) -> None:
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = EVAPatchEmbedding(vc)
        self.transformer = EVATransformer(vc)
        self.linear_proj = GLU(config.hidden_size, config.intermediate_size, in_features=conv_out)
        self.conv = nn.Conv2d(vc["hidden_size"], conv_out, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.5)
        self.eoi = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.5)

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        b, s, h = x.shape
        g = int(math.isqrt(s))
        x = self.conv(x.reshape(b, g, g, h).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat([self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)], 1)


def _eva_config(image_size: int = 28, patch: int = 7) -> dict:
    return {"in_channels": 3, "hidden_size": VH, "num_heads": VHEADS, "intermediate_size": VFF,
            "num_hidden_layers": VLAYERS, "patch_size": patch, "image_size": image_size,
            "num_positions": (image_size // patch) ** 2 + 1, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}


# --------------------------------------------------------------------------------------------- cogvlm2
LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1


class CogVLMConfig(PretrainedConfig):
    # The published CogVLMConfig sets no model_type (config.model_type == ""); registering needs one.
    model_type = "cogvlm2"

    def __init__(self, vocab_size=544, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
                 num_attention_heads=HEADS, rms_norm_eps=1e-5, template_version="chat", vision_config=None, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = vision_config or _eva_config()
        super().__init__(**kwargs)


def _expert_masks(token_type_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """As published: a token is 'vision' iff it and the next token are vision tokens (eoi counts as language)."""
    vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return vision, ~vision


class VisionExpertAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        h = config.hidden_size
        self.vision_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False)
        self.language_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None):
        vis, lang = _expert_masks(token_type_ids)
        qkv = hidden_states.new_zeros(*hidden_states.shape[:2], 3 * hidden_states.shape[-1])
        qkv[vis] = self.vision_expert_query_key_value(hidden_states[vis])
        qkv[lang] = self.language_expert_query_key_value(hidden_states[lang])
        ctx = _attend(*qkv.chunk(3, -1), self.heads, attention_mask)
        out = torch.zeros_like(ctx)
        out[vis] = self.vision_expert_dense(ctx[vis])
        out[lang] = self.language_expert_dense(ctx[lang])
        return out


class VisionExpertMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.language_mlp = LlamaStyleMLP(config.hidden_size, config.intermediate_size)
        self.vision_mlp = LlamaStyleMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states, token_type_ids):
        vis, lang = _expert_masks(token_type_ids)
        out = torch.zeros_like(hidden_states)
        out[vis] = self.vision_mlp(hidden_states[vis])
        out[lang] = self.language_mlp(hidden_states[lang])
        return out


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self_attn, self.mlp = VisionExpertAttention(config), VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), token_type_ids=token_type_ids,
                                           position_ids=position_ids, attention_mask=attention_mask)
        return (h + self.mlp(self.post_attention_layernorm(h), token_type_ids=token_type_ids),)


def _is_empty(images) -> bool:
    return images is None or len(images) == 0 or all(len(x) == 0 for x in images)


def _history_to_prompt(template_version: str, history, query: str) -> str:
    if template_version == "base":
        return query
    answer = "Short answer:" if template_version == "vqa" else "Answer:"
    prompt = "".join(f"Question: {q} {answer} {r}\n" for q, r in history)
    return prompt + f"Question: {query} {answer}"


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config, conv_out=config.vision_config["hidden_size"])

    def encode_images(self, images: List[List[torch.Tensor]]) -> torch.Tensor:
        return self.vision(torch.stack([im for per_sample in images for im in per_sample]))

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **_):
        inputs_embeds = self.embed_tokens(input_ids)
        if not _is_empty(images):
            assert token_type_ids is not None and len(input_ids) == len(images)
            feats = self.encode_images(images).reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.index_put([token_type_ids == VISION_TOKEN_TYPE], feats)
        elif token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        b, t = input_ids.shape
        mask = _causal_mask(attention_mask, b, t, inputs_embeds.dtype, inputs_embeds.device)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, token_type_ids=token_type_ids, position_ids=position_ids, attention_mask=mask,
                      past_key_value=None, use_cache=use_cache)[0]
        return self.norm(h)


class CogVLMForCausalLM(StandInPreTrainedModel):
    """CogVLM2: stand-in mirroring the published module tree and forward signature; not the real model."""

    config_class = CogVLMConfig
    grow_inputs = {"attention_mask": 1, "token_type_ids": LANGUAGE_TOKEN_TYPE}

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, labels=None):
        h = self.model(input_ids=input_ids, images=images, token_type_ids=token_type_ids,
                       attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        return _output(self.lm_head(h).float(), h, return_dict)

    def build_conversation_input_ids(self, tokenizer, *, query: str, history=None, images=None,
                                     template_version=None) -> Dict[str, Any]:
        """As published: ``[bos] + [pad] * vision_token_num + text`` with token_type_ids marking the image
        span; returns 1-D tensors and ``images`` as a list of ``[3, H, W]`` tensors (or None)."""
        vc = self.config.vision_config
        template_version = template_version or self.config.template_version
        assert images is None or len(images) <= 1, "not support multi images by now."
        text = _history_to_prompt(template_version, history or [], query)
        input_ids, token_type_ids = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE]
        if images:
            pixels = [_pixels(images[0], vc["image_size"], mean=0.48, std=0.27)]
            n = (vc["image_size"] // vc["patch_size"] // 2) ** 2 + 2
            input_ids += [tokenizer.pad_token_id] * n
            token_type_ids += [VISION_TOKEN_TYPE] * n
        else:
            pixels = None
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += text_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
                "attention_mask": torch.ones(len(input_ids), dtype=torch.long), "images": pixels}


# ---------------------------------------------------------------------- DeepSeek-V2/V3 language models
class MLAttention(nn.Module):
    """Multi-head latent attention naming: ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
    ``o_proj`` (q_lora_rank None, as in the small checkpoints)."""

    def __init__(self, lc: dict) -> None:
        super().__init__()
        self.heads, self.rank = lc["num_attention_heads"], lc["kv_lora_rank"]
        self.nope, self.rope, self.v_dim = lc["qk_nope_head_dim"], lc["qk_rope_head_dim"], lc["v_head_dim"]
        h = lc["hidden_size"]
        self.q_proj = nn.Linear(h, self.heads * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=False)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q_proj(x)
        ckv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], -1)
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv)).view(b, t, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.heads, -1)], -1).reshape(b, t, -1)
        return self.o_proj(_attend(q, k, v.reshape(b, t, -1), self.heads, mask))


class MoEGate(nn.Module):
    """Router weight as a raw Parameter (not an nn.Linear, as published); top-k softmax (V2) or sigmoid with
    ``e_score_correction_bias`` (V3)."""

    def __init__(self, lc: dict, v3: bool) -> None:
        super().__init__()
        self.top_k, self.v3 = lc["num_experts_per_tok"], v3
        self.weight = nn.Parameter(torch.randn(lc["n_routed_experts"], lc["hidden_size"]) * 0.5)
        if v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(lc["n_routed_experts"]))

    def forward(self, x):
        logits = F.linear(x, self.weight)
        scores = logits.sigmoid() if self.v3 else logits.softmax(-1)
        choice = scores + self.e_score_correction_bias if self.v3 else scores
        idx = choice.topk(self.top_k, -1).indices
        return idx, scores.gather(-1, idx)


class DeepseekMoE(nn.Module):
    def __init__(self, lc: dict, v3: bool) -> None:
        super().__init__()
        self.experts = nn.ModuleList(LlamaStyleMLP(lc["hidden_size"], lc["moe_intermediate_size"])
                                     for _ in range(lc["n_routed_experts"]))
        self.gate = MoEGate(lc, v3)
        self.shared_experts = LlamaStyleMLP(lc["hidden_size"], lc["moe_intermediate_size"] * lc["n_shared_experts"])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        idx, w = self.gate(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, w[rows, slot, None].to(flat.dtype) * expert(flat[rows]))
        return (out + self.shared_experts(flat)).view_as(x)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, lc: dict, layer_idx: int, v3: bool) -> None:
        super().__init__()
        self.self_attn = MLAttention(lc)
        dense = layer_idx < lc["first_k_dense_replace"]
        self.mlp = LlamaStyleMLP(lc["hidden_size"], lc["intermediate_size"]) if dense else DeepseekMoE(lc, v3)
        self.input_layernorm = RMSNorm(lc["hidden_size"])
        self.post_attention_layernorm = RMSNorm(lc["hidden_size"])

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        return (h + self.mlp(self.post_attention_layernorm(h)),)


class DeepseekModel(nn.Module):
    def __init__(self, lc: dict, v3: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(lc["vocab_size"], lc["hidden_size"])
        self.layers = nn.ModuleList(DeepseekDecoderLayer(lc, i, v3) for i in range(lc["num_hidden_layers"]))
        self.norm = RMSNorm(lc["hidden_size"])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **_):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        mask = _causal_mask(attention_mask, h.shape[0], h.shape[1], h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_value=None, use_cache=use_cache)[0]
        return self.norm(h)


class DeepseekForCausalLM(nn.Module):
    """``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` inside the VLM: ``model.layers`` + ``lm_head``."""

    def __init__(self, lc: dict, v3: bool) -> None:
        super().__init__()
        self.model = DeepseekModel(lc, v3)
        self.lm_head = nn.Linear(lc["hidden_size"], lc["vocab_size"], bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **_):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, use_cache=use_cache)
        return _output(self.lm_head(h).float(), h)


def _deepseek_language_config(vocab_size: int) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": H, "intermediate_size": FF, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 2, "n_shared_experts": 1,
            "num_experts_per_tok": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": None,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32}


# -------------------------------------------------------------------------------------- deepseek_vl_v2
class DeepseekVLV2Config(PretrainedConfig):
    model_type = "deepseek_vl_v2"

    def __init__(self, vision_config=None, projector_config=None, language_config=None, tile_tag="2D",
                 global_view_pos="head", candidate_resolutions=((28, 28),), **kwargs):
        self.vision_config = vision_config or {"image_size": 28, "patch_size": 7, "width": VH, "layers": VLAYERS,
                                               "heads": VHEADS, "mlp_ratio": VFF / VH}
        self.projector_config = projector_config or {"projector_type": "downsample_mlp_gelu", "input_dim": VH,
                                                     "n_embed": H, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2}
        self.language_config = language_config or _deepseek_language_config(544)
        self.tile_tag, self.global_view_pos = tile_tag, global_view_pos
        self.candidate_resolutions = [list(r) for r in candidate_resolutions]
        super().__init__(**kwargs)


class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(_attend(*self.qkv(x).chunk(3, -1), self.heads))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    """timm ViT ``Block``: ``forward(x)`` only."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TimmMlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm-style SigLIP ViT as published in deepseek_vl2/models/siglip_vit.py: ``blocks`` is an
    **nn.Sequential** (not a ModuleList); no class token; ``ignore_head`` (features after ``norm``)."""

    def __init__(self, vc: dict) -> None:
        super().__init__()
        dim, n = vc["width"], (vc["image_size"] // vc["patch_size"]) ** 2
        self.patch_embed = PatchEmbed(vc["patch_size"], dim)
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.5)
        self.blocks = nn.Sequential(*[TimmBlock(dim, vc["heads"], int(dim * vc["mlp_ratio"]))
                                      for _ in range(vc["layers"])])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(self.blocks(self.patch_embed(x) + self.pos_embed))


class MlpProjector(nn.Module):
    """``downsample_mlp_gelu``: unfold 2x2 neighbours, then ``layers`` = Linear, GELU, Linear."""

    def __init__(self, pc: dict) -> None:
        super().__init__()
        self.ds = pc["downsample_ratio"]
        inp = pc["input_dim"] * self.ds * self.ds
        mid = pc["n_embed"] * pc["mlp_ratio"]
        self.layers = nn.Sequential(nn.Linear(inp, mid), nn.GELU(), nn.Linear(mid, pc["n_embed"]))

    def forward(self, x):
        b, hw, c = x.shape
        s = int(math.isqrt(hw))
        x = x.permute(0, 2, 1).reshape(b, c, s, s)
        x = F.unfold(x, kernel_size=self.ds, stride=self.ds).permute(0, 2, 1)
        return self.layers(x)


class DeepseekVLV2ForCausalLM(StandInPreTrainedModel):
    """DeepSeek-VL2: stand-in mirroring the published module tree and forward signature; not the real model."""

    config_class = DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    grow_inputs = {"attention_mask": 1, "images_seq_mask": False}

    def __init__(self, config: DeepseekVLV2Config) -> None:
        super().__init__(config)
        self.vision = VisionTransformer(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        n_embed = config.projector_config["n_embed"]
        self.image_newline = nn.Parameter(torch.randn(n_embed) * 0.5)
        self.view_seperator = nn.Parameter(torch.randn(n_embed) * 0.5)  # sic, as published
        self.language = DeepseekForCausalLM(config.language_config, v3=False)
        self.post_init()

    def get_decoder(self):
        return self.language.model

    def prepare_inputs_embeds(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None, **_):
        embed = self.language.get_input_embeddings()
        if images is None or images_spatial_crop.sum() == 0:
            return embed(input_ids)
        bs, max_n_images, _ = images_spatial_crop.shape
        tiles, per_sample = [], []
        for i in range(bs):
            n = 0
            for j in range(max_n_images):
                w, h = images_spatial_crop[i, j].tolist()
                if w == 0 or h == 0:
                    break
                n += 1 + w * h
            tiles.append(images[i, :n])
            per_sample.append(n)
        feats = self.projector(self.vision(torch.cat(tiles, 0)))
        _, hw, d = feats.shape
        side = int(math.isqrt(hw))
        rows = list(embed(input_ids))
        t = 0
        for i in range(bs):
            parts = []
            for j in range(max_n_images):
                w, h = images_spatial_crop[i, j].tolist()
                if w == 0 or h == 0:
                    break
                glb = feats[t].view(side, side, d)
                glb = torch.cat([glb, self.image_newline.expand(side, 1, d)], 1).view(-1, d)
                loc = feats[t + 1:t + 1 + w * h].view(h, w, side, side, d).permute(0, 2, 1, 3, 4)
                loc = loc.reshape(h * side, w * side, d)
                loc = torch.cat([loc, self.image_newline.expand(h * side, 1, d)], 1).view(-1, d)
                parts += [glb, self.view_seperator[None], loc] if self.config.global_view_pos == "head" \
                    else [loc, self.view_seperator[None], glb]
                t += 1 + w * h
            if parts:
                rows[i] = rows[i].masked_scatter(images_seq_mask[i].unsqueeze(-1), torch.cat(parts).to(rows[i].dtype))
        return torch.stack(rows)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, images=None, images_seq_mask=None, images_spatial_crop=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                cache_position=None):
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        out = self.language(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache)
        return out if return_dict is not False else (out.logits,)


class _DictOutput:
    """Like the published ``BatchCollateOutput``: attributes plus ``keys()`` / ``[key]``."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def keys(self):
        return self.__dict__.keys()

    def __getitem__(self, key: str):
        return self.__dict__[key]


class DeepseekVLV2ProcessorStandIn:
    """Published call: ``processor(conversations=[{"role": "<|User|>", "content": "<image>\\n..."},
    {"role": "<|Assistant|>", "content": ""}], images=[pil], force_batchify=True, system_prompt="")``.
    Each image: a global view plus local tiles of the best candidate resolution; image tokens
    ``h*(w+1) + 1 + (th*h)*(tw*w+1)``."""

    def __init__(self, tokenizer, candidate_resolutions=((28, 28),), patch_size: int = 7, downsample_ratio: int = 2,
                 image_token: str = "<image>") -> None:
        self.tokenizer, self.candidate_resolutions = tokenizer, candidate_resolutions
        self.image_size = candidate_resolutions[0][0]
        self.patch_size, self.downsample_ratio, self.image_token = patch_size, downsample_ratio, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def _encode(self, text: str, images) -> Tuple[List[int], List[bool], List[torch.Tensor], List[List[int]]]:
        ids, seq_mask, tiles, crops = [], [], [], []
        splits = text.split(self.image_token)
        assert len(splits) - 1 == len(images)
        for i, part in enumerate(splits):
            t = self.tokenizer.encode(part, add_special_tokens=False)
            ids += t
            seq_mask += [False] * len(t)
            if i < len(images):
                tiles += [_pixels(images[i], self.image_size)] * 2  # global view + one local tile
                crops.append([1, 1])
                side = math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)
                n = side * (side + 1) + 1 + side * (side + 1)
                ids += [self.image_token_id] * n
                seq_mask += [True] * n
        return ids, seq_mask, tiles, crops

    def __call__(self, *, prompt=None, conversations=None, images=None, apply_sft_format=False, force_batchify=True,
                 inference_mode=True, system_prompt="", **kwargs) -> _DictOutput:
        images = list(images or [])
        ids, seq_mask, tiles, crops = [self.tokenizer.bos_token_id], [False], [], []
        text = system_prompt
        for msg in conversations:
            if msg["role"] in ("<|User|>", "user"):
                text += f"<|User|>: {msg['content'].strip()}\n\n"
            else:
                text += f"<|Assistant|>: {msg['content'].strip()}"
        t_ids, t_mask, tiles, crops = self._encode(text, images)
        ids += t_ids + [self.tokenizer.eos_token_id]
        seq_mask += t_mask + [False]
        if inference_mode:  # drop the final eos
            ids, seq_mask = ids[:-1], seq_mask[:-1]
        input_ids = torch.tensor(ids, dtype=torch.long)[None]
        px = torch.stack(tiles)[None] if tiles else torch.zeros(1, 1, 3, self.image_size, self.image_size)
        spatial = torch.tensor(crops, dtype=torch.long)[None] if crops else torch.zeros(1, 1, 2, dtype=torch.long)
        return _DictOutput(sft_format=[text], input_ids=input_ids, labels=input_ids.clone(),
                           attention_mask=torch.ones_like(input_ids, dtype=torch.bool), images=px,
                           images_seq_mask=torch.tensor(seq_mask)[None], images_spatial_crop=spatial,
                           seq_lens=[len(ids)])


# ----------------------------------------------------------------------------------------------- molmo
class MolmoConfig(PretrainedConfig):
    model_type = "molmo"

    def __init__(self, vocab_size=544, d_model=H, n_heads=HEADS, n_layers=2, mlp_hidden_size=2 * FF,
                 layer_norm_eps=1e-6, vision_backbone=None, vit_layers=(-1,), image_pooling_h=2,
                 image_pooling_w=2, image_padding_embed="pad_embed", weight_tying=False, **kwargs):
        self.vocab_size, self.embedding_size, self.d_model = vocab_size, vocab_size, d_model
        self.n_heads, self.n_layers, self.mlp_hidden_size = n_heads, n_layers, mlp_hidden_size
        self.layer_norm_eps, self.weight_tying = layer_norm_eps, weight_tying
        self.vision_backbone = vision_backbone or {
            "image_default_input_size": [32, 32], "image_patch_size": 8, "image_emb_dim": VH,
            "image_num_heads": VHEADS, "image_num_layers": VLAYERS, "image_mlp_dim": VFF, "image_num_pos": 17}
        self.vit_layers = list(vit_layers)
        self.image_pooling_h, self.image_pooling_w = image_pooling_h, image_pooling_w
        self.image_padding_embed = image_padding_embed
        super().__init__(**kwargs)

    @property
    def image_num_patch(self) -> Tuple[int, int]:
        vb = self.vision_backbone
        n = vb["image_default_input_size"][0] // vb["image_patch_size"]
        return n, n


class MultiHeadDotProductAttention(nn.Module):
    """``wq``/``wk``/``wv``/``wo``; ``forward(inputs_q, inputs_kv=None)`` as published."""

    def __init__(self, dim_in: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = nn.Linear(dim_in, dim), nn.Linear(dim_in, dim), nn.Linear(dim_in, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, inputs_q, inputs_kv=None):
        kv = inputs_q if inputs_kv is None else inputs_kv
        return self.wo(_attend(self.wq(inputs_q), self.wk(kv), self.wv(kv), self.heads))


class ViTMLP(nn.Module):
    def __init__(self, vb: dict) -> None:
        super().__init__()
        self.w1 = nn.Linear(vb["image_emb_dim"], vb["image_mlp_dim"])
        self.w2 = nn.Linear(vb["image_mlp_dim"], vb["image_emb_dim"])

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, vb: dict) -> None:
        super().__init__()
        d = vb["image_emb_dim"]
        self.attention = MultiHeadDotProductAttention(d, d, vb["image_num_heads"])
        self.feed_forward = ViTMLP(vb)
        self.attention_norm, self.ffn_norm = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    def __init__(self, vb: dict) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(vb) for _ in range(vb["image_num_layers"]))

    def forward(self, x) -> List[torch.Tensor]:
        states = []
        for r in self.resblocks:
            x = r(x)
            states.append(x)
        return states


class MolmoVisionTransformer(nn.Module):
    def __init__(self, vb: dict) -> None:
        super().__init__()
        d, p = vb["image_emb_dim"], vb["image_patch_size"]
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(vb["image_num_pos"], d) * 0.5)
        self.patch_embedding = nn.Linear(p * p * 3, d, bias=False)
        self.pre_ln = nn.LayerNorm(d, eps=1e-6)
        self.transformer = BlockCollection(vb)

    def forward(self, x) -> List[torch.Tensor]:
        x = self.patch_embedding(x)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + self.positional_embedding
        return self.transformer(self.pre_ln(x))


class MolmoImageMLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, d_model: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden // 2, bias=False)
        self.w2 = nn.Linear(hidden // 2, d_model, bias=False)
        self.w3 = nn.Linear(dim_in, hidden // 2, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class OLMoPretrainedVisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig) -> None:
        super().__init__()
        self.config = config
        vb = config.vision_backbone
        dim_in = vb["image_emb_dim"] * len(config.vit_layers)
        self.image_vit = MolmoVisionTransformer(vb)
        self.image_pooling_2d = MultiHeadDotProductAttention(dim_in, vb["image_emb_dim"], vb["image_num_heads"])
        self.image_projector = MolmoImageMLP(vb["image_emb_dim"], FF, config.d_model)
        with torch.no_grad():  # larger than torch's default init, so the image features reach the logits
            for lin in (self.image_projector.w1, self.image_projector.w2, self.image_projector.w3):
                lin.weight.mul_(4.0)
        self.pad_embed = nn.Parameter(torch.randn(dim_in) * 0.5)

    def forward(self, images, image_masks):
        """``images [B, crops, patches, pixels]`` -> ``[B, crops, pooled tokens, d_model]``."""
        cfg = self.config
        b, t, n, d = images.shape
        valid = ~torch.all(images.view(b * t, n, d) == -1, dim=(1, 2), keepdim=True)
        states = self.image_vit(images.view(b * t, n, d))
        feats = torch.cat([states[i] for i in cfg.vit_layers], -1)[:, 1:] * valid
        feats = feats.view(b, t, n, -1)
        if image_masks is not None:
            feats = feats + self.pad_embed * (image_masks == 0).to(feats.dtype).unsqueeze(-1)
        gh, gw = cfg.image_num_patch
        ph, pw = cfg.image_pooling_h, cfg.image_pooling_w
        feats = feats.view(b, t, gh // ph, ph, gw // pw, pw, -1).permute(0, 1, 2, 4, 3, 5, 6)
        feats = feats.reshape(-1, ph * pw, feats.shape[-1])
        pooled = self.image_pooling_2d(feats[:, :1], feats).view(b, t, (gh // ph) * (gw // pw), -1)
        return self.image_projector(pooled), None


class MolmoSequentialBlock(nn.Module):
    """OLMo block: ``att_proj`` (fused qkv), ``attn_out``, ``ff_proj`` (fused SwiGLU), ``ff_out``."""

    def __init__(self, config: MolmoConfig) -> None:
        super().__init__()
        d = config.d_model
        self.heads = config.n_heads
        self.attn_norm, self.ff_norm = RMSNorm(d, config.layer_norm_eps), RMSNorm(d, config.layer_norm_eps)
        self.att_proj = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size // 2, d, bias=False)

    def forward(self, x, attention_bias=None, position_ids=None, drop_mask=None, layer_past=None, use_cache=False):
        q, k, v = self.att_proj(self.attn_norm(x)).chunk(3, -1)
        x = x + self.attn_out(_attend(q, k, v, self.heads, attention_bias))
        up, gate = self.ff_proj(self.ff_norm(x)).chunk(2, -1)
        return x + self.ff_out(F.silu(gate) * up), None


class Molmo(nn.Module):
    def __init__(self, config: MolmoConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model), emb_drop=nn.Dropout(0.0),
            ln_f=RMSNorm(config.d_model, config.layer_norm_eps),
            blocks=nn.ModuleList(MolmoSequentialBlock(config) for _ in range(config.n_layers))))
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(config.d_model, config.embedding_size, bias=False)})
        self.vision_backbone = OLMoPretrainedVisionBackbone(config)

    def forward(self, input_ids, input_embeddings=None, attention_mask=None, attention_bias=None, response_mask=None,
                images=None, image_masks=None, image_input_idx=None, subsegment_ids=None, position_ids=None,
                past_key_values=None, use_cache=False, last_logits_only=False, output_hidden_states=None,
                append_last_valid_logits=None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = input_ids != -1
        x = self.transformer.wte(input_ids * (input_ids != -1).to(input_ids.dtype))
        if images is not None:
            feats, _ = self.vision_backbone(images, image_masks)
            n_img, n_tok = feats.shape[1:3]
            assert image_input_idx.shape == (b, n_img, n_tok)
            feats = feats.reshape(b, n_img * n_tok, -1)
            idx = image_input_idx.reshape(b, n_img * n_tok)
            valid = idx >= 0
            rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
            x = x.index_put((rows[valid], idx[valid]), feats[valid].to(x.dtype), accumulate=True)
        x = self.transformer.emb_drop(x)
        bias = _causal_mask(attention_mask, b, t, x.dtype, x.device)
        for block in self.transformer.blocks:
            x, _ = block(x, attention_bias=bias, position_ids=position_ids, layer_past=None, use_cache=use_cache)
        x = self.transformer.ln_f(x)
        return self.transformer.ff_out(x), x


class MolmoForCausalLM(StandInPreTrainedModel):
    """Molmo: stand-in mirroring the published module tree and forward signature; not the real model."""

    config_class = MolmoConfig

    def __init__(self, config: MolmoConfig) -> None:
        super().__init__(config)
        self.model = Molmo(config)
        self.post_init()

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                response_mask=None, images=None, image_masks=None, image_input_idx=None, subsegment_ids=None,
                position_ids=None, past_key_values=None, labels=None, loss_masks=None, use_cache=None,
                last_logits_only=None, output_attentions=None, output_hidden_states=None,
                append_last_valid_logits=None, return_dict=None, cache_position=None):
        logits, h = self.model(input_ids, attention_mask=attention_mask, images=images, image_masks=image_masks,
                               image_input_idx=image_input_idx, position_ids=position_ids, use_cache=bool(use_cache))
        return _output(logits.float(), h, return_dict)

    def generate_from_batch(self, batch: Dict[str, torch.Tensor], generation_config=None, **kwargs):
        """Published entry point for generation; ``max_new_tokens`` read from the generation config."""
        n = getattr(generation_config, "max_new_tokens", None) or kwargs.pop("max_new_tokens", 16)
        return self.generate(**batch, max_new_tokens=n)


MOLMO_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")


class MolmoProcessorStandIn:
    """Published call: ``processor.process(text=..., images=[...])`` (or ``tokens=``) -> unbatched tensors
    ``input_ids [T]``, ``images [crops, patches, 3*p*p]``, ``image_input_idx [crops, tokens]``,
    ``image_masks [crops, patches]``. The image tokens come first, then ``" User: {text} Assistant:"``; BOS is
    prepended. The stand-in makes one 32x32 crop per image (no low-res overview)."""

    def __init__(self, tokenizer, crop: int = 32, patch: int = 8, pool: int = 2) -> None:
        self.tokenizer, self.crop, self.patch, self.pool = tokenizer, crop, patch, pool
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MOLMO_TOKENS}

    def process(self, text=None, images=None, *, tokens=None, message_format="role", always_start_with_space=True,
                **kwargs) -> Dict[str, torch.Tensor]:
        if tokens is None:
            prompt = f"User: {text or ''} Assistant:" if message_format == "role" else (text or "")
            tokens = self.tokenizer.encode((" " if always_start_with_space else "") + prompt, add_special_tokens=False)
        images = [images] if images is not None and not isinstance(images, (list, tuple)) else (images or [])
        g, n_tok = self.crop // self.patch, (self.crop // self.patch // self.pool)
        ids, crops, idx = [], [], []
        for im in images:
            px = _pixels(im, self.crop)  # [3, crop, crop] -> patches [g*g, p*p*3]
            crops.append(px.reshape(3, g, self.patch, g, self.patch).permute(1, 3, 2, 4, 0).reshape(g * g, -1))
            ids.append(self.ids["<im_start>"])
            positions = []
            for _ in range(n_tok):
                positions += list(range(len(ids), len(ids) + n_tok))
                ids += [self.ids["<im_patch>"]] * n_tok + [self.ids["<im_col>"]]
            ids.append(self.ids["<im_end>"])
            idx.append(positions)
        ids = [self.tokenizer.bos_token_id] + ids + list(tokens)
        out = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if images:
            out["images"] = torch.stack(crops)
            out["image_input_idx"] = torch.tensor(idx, dtype=torch.long) + 1  # BOS shift
            out["image_masks"] = torch.ones(len(images), g * g)
        return out


# --------------------------------------------------------------------------------------------- kimi_vl
class KimiVLConfig(PretrainedConfig):
    model_type = "kimi_vl"

    def __init__(self, vision_config=None, text_config=None, media_placeholder_token_id=0, **kwargs):
        self.vision_config = vision_config or {"patch_size": 7, "init_pos_emb_height": 4, "init_pos_emb_width": 4,
                                               "num_attention_heads": VHEADS, "num_hidden_layers": VLAYERS,
                                               "hidden_size": VH, "intermediate_size": VFF, "merge_kernel_size": [2, 2]}
        self.text_config = text_config or _deepseek_language_config(544)
        self.media_placeholder_token_id = media_placeholder_token_id
        super().__init__(**kwargs)


class Learnable2DInterpPosEmb(nn.Module):
    def __init__(self, height: int, width: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(height, width, dim) * 0.5)

    def forward(self, x, grid_hws):
        pos = []
        for h, w in grid_hws.tolist():
            p = self.weight if (h, w) == tuple(self.weight.shape[:2]) else F.interpolate(
                self.weight.permute(2, 0, 1)[None], size=(h, w), mode="bicubic")[0].permute(1, 2, 0)
            pos.append(p.reshape(h * w, -1))
        return x + torch.cat(pos).to(x.dtype)


class MoonVisionPatchEmbed(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, vc["hidden_size"], kernel_size=vc["patch_size"], stride=vc["patch_size"])
        self.pos_emb = Learnable2DInterpPosEmb(vc["init_pos_emb_height"], vc["init_pos_emb_width"], vc["hidden_size"])

    def forward(self, x, grid_hws):
        return self.pos_emb(self.proj(x).view(x.shape[0], -1), grid_hws)


class MoonVitMLP(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.fc0 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc1 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x):
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonVitEncoderLayer(nn.Module):
    """Packed ``[L, D]`` patches of all images; attention stays within each image (``cu_seqlens``)."""

    def __init__(self, vc: dict) -> None:
        super().__init__()
        d = vc["hidden_size"]
        self.heads = vc["num_attention_heads"]
        self.norm0, self.norm1 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)
        self.mlp = MoonVitMLP(vc)

    def forward(self, hidden_states, cu_seqlens, rope_freqs_cis=None):
        length = hidden_states.shape[0]
        positions = torch.arange(length, device=hidden_states.device)
        seg = torch.bucketize(positions, cu_seqlens[1:].to(torch.long), right=True)  # image index of each patch
        mask = torch.zeros(length, length, dtype=hidden_states.dtype, device=hidden_states.device)
        mask = mask.masked_fill(seg[:, None] != seg[None, :], torch.finfo(hidden_states.dtype).min)
        q, k, v = self.wqkv(self.norm0(hidden_states))[None].chunk(3, -1)
        h = hidden_states + self.wo(_attend(q, k, v, self.heads, mask)[0])
        return h + self.mlp(self.norm1(h))


class MoonVitEncoder(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MoonVitEncoderLayer(vc) for _ in range(vc["num_hidden_layers"]))
        self.final_layernorm = nn.LayerNorm(vc["hidden_size"])

    def forward(self, hidden_states, grid_hws):
        lengths = torch.cat([grid_hws.new_zeros(1), grid_hws[:, 0] * grid_hws[:, 1]])
        cu_seqlens = lengths.cumsum(0).to(torch.int32)
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens, rope_freqs_cis=None)
        return self.final_layernorm(hidden_states)


class MoonVitPretrainedModel(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.merge_kernel_size = tuple(vc["merge_kernel_size"])
        self.patch_embed = MoonVisionPatchEmbed(vc)
        self.encoder = MoonVitEncoder(vc)

    def forward(self, pixel_values, grid_hws) -> List[torch.Tensor]:
        x = self.encoder(self.patch_embed(pixel_values, grid_hws), grid_hws)
        kh, kw = self.merge_kernel_size
        out, start = [], 0
        for h, w in grid_hws.tolist():
            seq = x[start:start + h * w].view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
            out.append(seq.reshape((h // kh) * (w // kw), kh * kw, -1))
            start += h * w
        return out


class KimiVLMultiModalProjector(nn.Module):
    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        vc = config.vision_config
        d = vc["hidden_size"] * vc["merge_kernel_size"][0] * vc["merge_kernel_size"][1]
        self.hidden_size = d
        self.pre_norm = nn.LayerNorm(vc["hidden_size"], eps=1e-5)
        self.linear_1 = nn.Linear(d, d, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d, config.text_config["hidden_size"], bias=True)

    def forward(self, image_features: List[torch.Tensor]) -> torch.Tensor:
        x = self.pre_norm(torch.cat(image_features, 0)).view(-1, self.hidden_size)
        return self.linear_2(self.act(self.linear_1(x)))


class KimiVLForConditionalGeneration(StandInPreTrainedModel):
    """Kimi-VL: stand-in mirroring the published module tree and forward signature; not the real model."""

    config_class = KimiVLConfig

    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__(config)
        self.vision_tower = MoonVitPretrainedModel(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config)
        self.language_model = DeepseekForCausalLM(config.text_config, v3=True)
        self.post_init()

    def get_decoder(self):
        return self.language_model.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, pixel_values=None, image_grid_hws=None):
        if inputs_embeds is None:
            inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
            if pixel_values is not None and len(pixel_values):
                feats = self.multi_modal_projector(self.vision_tower(pixel_values, image_grid_hws))
                where = input_ids == self.config.media_placeholder_token_id
                if int(where.sum()) != feats.shape[0]:
                    raise ValueError(f"Mismatch image tokens ({int(where.sum())}) vs features ({feats.shape[0]})")
                inputs_embeds = inputs_embeds.masked_scatter(where[..., None], feats.to(inputs_embeds.dtype))
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=use_cache)
        return out if return_dict is not False else (out.logits,)


KIMI_SPECIALS = ("<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>", "<|media_start|>",
                 "<|media_content|>", "<|media_pad|>", "<|media_end|>")
KIMI_CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|im_user|>user<|im_middle|>"
    "{% else %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}")


class KimiVLProcessorStandIn:
    """HF-style: ``apply_chat_template`` (content lists with ``{"type": "image"}``) then
    ``processor(images=..., text=..., return_tensors="pt")``; each ``<|media_pad|>`` expands to
    ``h*w / (2*2)`` tokens; ``pixel_values [patches, 3, p, p]`` flat over images, ``image_grid_hws [n, 2]``."""

    def __init__(self, tokenizer, image_size: int = 28, patch: int = 7) -> None:
        self.tokenizer, self.image_size, self.patch = tokenizer, image_size, patch
        self.chat_template = KIMI_CHAT

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        images = [images] if images is not None and not isinstance(images, (list, tuple)) else (images or [])
        data: Dict[str, Any] = {}
        if images:
            g = self.image_size // self.patch
            px = [_pixels(im, self.image_size).reshape(3, g, self.patch, g, self.patch).permute(1, 3, 0, 2, 4)
                  .reshape(g * g, 3, self.patch, self.patch) for im in images]
            data = {"pixel_values": torch.cat(px), "image_grid_hws": torch.tensor([[g, g]] * len(images))}
            n = g * g // 4
            texts = [t.replace("<|media_pad|>", "<|media_pad|>" * n) for t in texts]
        data.update(self.tokenizer(texts, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data)


# --------------------------------------------------------------------------------- chatglm (GLM-4V-9B)
class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, padded_vocab_size=544, hidden_size=H, ffn_hidden_size=FF, num_layers=2,
                 num_attention_heads=HEADS, layernorm_epsilon=1e-5, add_qkv_bias=True, vision_config=None,
                 boi_token_id=0, eoi_token_id=0, **kwargs):
        self.padded_vocab_size, self.vocab_size = padded_vocab_size, padded_vocab_size
        self.hidden_size, self.ffn_hidden_size, self.num_layers = hidden_size, ffn_hidden_size, num_layers
        self.intermediate_size = ffn_hidden_size  # read by the EVA2-CLIP GLU, as published
        self.num_attention_heads, self.layernorm_epsilon = num_attention_heads, layernorm_epsilon
        self.add_qkv_bias = add_qkv_bias
        self.vision_config = vision_config or _eva_config()
        self.boi_token_id, self.eoi_token_id = boi_token_id, eoi_token_id
        super().__init__(**kwargs)


class GLMSelfAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask):
        return self.dense(_attend(*self.query_key_value(x).chunk(3, -1), self.heads, mask))


class GLMMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        a, b = self.dense_h_to_4h(x).chunk(2, -1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = GLMSelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True):
        h = hidden_states + self.self_attention(self.input_layernorm(hidden_states), attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h)), None


class GLMTransformer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, use_cache=False):
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=use_cache)
        return self.final_layernorm(hidden_states)


class GLMEmbedding(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = GLMEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config, conv_out=config.hidden_size)

    def forward(self, input_ids=None, images=None, position_ids=None, attention_mask=None, full_attention_mask=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **_):
        """With images, the single token between boi and eoi is replaced by the image features (the sequence
        grows by ``features - 3``), as published; the attention mask grows with it."""
        embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if images is not None and len(images):
            feats = self.vision(images.to(embeds.dtype))
            rows, masks = [], []
            for i in range(len(input_ids)):
                ids = input_ids[i].tolist()
                boi, eoi = ids.index(self.config.boi_token_id), ids.index(self.config.eoi_token_id)
                assert eoi - boi == 2
                rows.append(torch.cat([embeds[i, :boi], feats[i], embeds[i, eoi + 1:]]))
                if attention_mask is not None:
                    masks.append(torch.cat([attention_mask[i, :boi + 1], attention_mask.new_ones(feats.shape[1] - 2),
                                            attention_mask[i, eoi:]]))
            embeds = torch.stack(rows)
            attention_mask = torch.stack(masks) if masks else None
        b, t = embeds.shape[:2]
        mask = _causal_mask(attention_mask, b, t, embeds.dtype, embeds.device)
        return self.encoder(embeds, mask, None, use_cache=bool(use_cache))


class ChatGLMForConditionalGeneration(StandInPreTrainedModel):
    """GLM-4V-9B: stand-in mirroring the published module tree and forward signature; not the real model."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    grow_inputs = {"attention_mask": 1, "position_ids": lambda last: last + 1}

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_decoder(self):
        return self.transformer

    def forward(self, input_ids=None, images=None, position_ids=None, attention_mask=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, return_last_logit=False):
        h = self.transformer(input_ids=input_ids, images=images, position_ids=position_ids,
                             attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=use_cache)
        if return_last_logit:
            h = h[:, -1:]
        return _output(self.transformer.output_layer(h).float(), h, return_dict)


GLM_SPECIALS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                "<|end_of_image|>", "<|endoftext|>")


class ChatGLM4TokenizerStandIn(PreTrainedTokenizerFast):
    """GLM-4V's tokenizer builds the image input itself: ``apply_chat_template([{"role": "user", "image": pil,
    "content": q}], add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True)`` ->
    ``input_ids`` (with ``<|begin_of_image|><|endoftext|><|end_of_image|>``), ``attention_mask``,
    ``position_ids``, ``images [1, 3, S, S]``."""

    image_size = 28

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True, return_tensors=None,
                            return_dict=False, **kwargs):
        text, image = "[gMASK]<sop>", None
        for msg in conversation:
            text += f"<|{msg['role']}|>"
            if msg.get("image") is not None and image is None:
                image = msg["image"]
                text += "<|begin_of_image|><|endoftext|><|end_of_image|>"
            text += f"\n{msg['content']}"
        if add_generation_prompt:
            text += "<|assistant|>"
        if not tokenize:
            return text
        ids = torch.tensor(self.encode(text, add_special_tokens=False), dtype=torch.long)[None]
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "position_ids": torch.arange(ids.shape[1])[None]}
        if image is not None:
            out["images"] = _pixels(image, self.image_size, mean=0.48, std=0.27)[None]
        return BatchEncoding(out) if return_dict else ids


# ------------------------------------------------------------------------------------------- factories
@dataclasses.dataclass
class StandIn:
    """A stand-in model with the objects its family builds inputs with, and the registered processor name
    that ``AutoRoundMLLM`` should use for image-text calibration."""

    model: Any
    tokenizer: Any
    processor: Any
    model_type: str
    processor_name: str
    image_size: Tuple[int, int]
    build_inputs: Callable[["StandIn", str, Any], Dict[str, Any]]

    def inputs(self, prompt: str, image=None) -> Dict[str, Any]:
        """Model inputs for one prompt (+ image), built the way the published family does."""
        return self.build_inputs(self, prompt, image)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def make_phi3_v(seed: int = 0) -> StandIn:
    tok = _tokenizer("<|end|>", "<|user|>", "<|assistant|>")
    tok.chat_template = PHI3_CHAT
    _seeded(seed)
    model = Phi3VForCausalLM(Phi3VConfig(vocab_size=_vocab(tok), pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        content = f"<|image_1|>\n{prompt}" if image is not None else prompt
        text = s.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        return dict(s.processor(text, [image] if image is not None else None, return_tensors="pt"))

    return StandIn(model, tok, Phi3VProcessorStandIn(tok), "phi3_v", "phi3_v", (28, 28), build)


def make_cogvlm2(seed: int = 0) -> StandIn:
    tok = _tokenizer()
    _seeded(seed)
    model = CogVLMForCausalLM(CogVLMConfig(vocab_size=_vocab(tok), pad_token_id=tok.pad_token_id,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        out = s.model.build_conversation_input_ids(s.tokenizer, query=prompt, history=[],
                                                   images=[image] if image is not None else None,
                                                   template_version="chat")
        inputs = {k: out[k][None] for k in ("input_ids", "token_type_ids", "attention_mask")}
        if out["images"] is not None:
            inputs["images"] = [[out["images"][0].to(s.model.dtype)]]
        return inputs

    return StandIn(model, tok, None, "cogvlm2", "cogvlm2", (28, 28), build)


def make_deepseek_vl_v2(seed: int = 0) -> StandIn:
    tok = _tokenizer("<image>", "<|User|>", "<|Assistant|>")
    _seeded(seed)
    cfg = DeepseekVLV2Config(language_config=_deepseek_language_config(_vocab(tok)), pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = DeepseekVLV2ForCausalLM(cfg).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        conv = [{"role": "<|User|>", "content": (f"<image>\n{prompt}" if image is not None else prompt)},
                {"role": "<|Assistant|>", "content": ""}]
        out = s.processor(conversations=conv, images=[image] if image is not None else [], force_batchify=True,
                          system_prompt="")
        return {k: out[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}

    return StandIn(model, tok, DeepseekVLV2ProcessorStandIn(tok), "deepseek_vl_v2", "deepseek_vl_v2", (28, 28), build)


def make_molmo(seed: int = 0) -> StandIn:
    tok = _tokenizer(*MOLMO_TOKENS)
    _seeded(seed)
    model = MolmoForCausalLM(MolmoConfig(vocab_size=_vocab(tok), pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        out = s.processor.process(text=prompt, images=[image] if image is not None else None)
        return {k: v[None] for k, v in out.items()}

    return StandIn(model, tok, MolmoProcessorStandIn(tok), "molmo", "molmo", (32, 32), build)


def make_kimi_vl(seed: int = 0) -> StandIn:
    tok = _tokenizer(*KIMI_SPECIALS)
    _seeded(seed)
    cfg = KimiVLConfig(text_config=_deepseek_language_config(_vocab(tok)),
                       media_placeholder_token_id=tok.convert_tokens_to_ids("<|media_pad|>"),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = KimiVLForConditionalGeneration(cfg).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        text = s.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(s.processor(images=[image] if image is not None else None, text=text, return_tensors="pt"))

    return StandIn(model, tok, KimiVLProcessorStandIn(tok), "kimi_vl", "hf", (28, 28), build)


def make_chatglm(seed: int = 0) -> StandIn:
    base = _tokenizer(*GLM_SPECIALS)
    tok = ChatGLM4TokenizerStandIn(tokenizer_object=copy.deepcopy(base.backend_tokenizer), bos_token=base.bos_token,
                                   eos_token=base.eos_token, unk_token=base.unk_token, pad_token=base.pad_token)
    _seeded(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_image|>", "<|end_of_image|>")}
    cfg = ChatGLMConfig(padded_vocab_size=_vocab(tok), boi_token_id=ids["<|begin_of_image|>"],
                        eoi_token_id=ids["<|end_of_image|>"], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = ChatGLMForConditionalGeneration(cfg).eval()

    def build(s: StandIn, prompt: str, image) -> Dict[str, Any]:
        msg = {"role": "user", "content": prompt, **({"image": image} if image is not None else {})}
        return dict(s.tokenizer.apply_chat_template([msg], add_generation_prompt=True, tokenize=True,
                                                    return_tensors="pt", return_dict=True))

    return StandIn(model, tok, None, "chatglm", "chatglm", (28, 28), build)


STANDINS: Dict[str, Callable[..., StandIn]] = {
    "phi3_v": make_phi3_v, "cogvlm2": make_cogvlm2, "deepseek_vl_v2": make_deepseek_vl_v2,
    "molmo": make_molmo, "kimi_vl": make_kimi_vl, "chatglm": make_chatglm,
}

CLASSES: Sequence[Tuple[str, type, type]] = (
    ("phi3_v", Phi3VConfig, Phi3VForCausalLM), ("cogvlm2", CogVLMConfig, CogVLMForCausalLM),
    ("deepseek_vl_v2", DeepseekVLV2Config, DeepseekVLV2ForCausalLM), ("molmo", MolmoConfig, MolmoForCausalLM),
    ("kimi_vl", KimiVLConfig, KimiVLForConditionalGeneration),
    ("chatglm", ChatGLMConfig, ChatGLMForConditionalGeneration),
)


@contextlib.contextmanager
def registered():
    """Register the six stand-in configs/models with AutoConfig / AutoModelForCausalLM; undone on exit."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mapping = AutoModelForCausalLM._model_mapping
    added = []
    try:
        for model_type, cfg, model in CLASSES:
            if model_type in CONFIG_MAPPING._extra_content:
                continue  # already registered by an enclosing context
            AutoConfig.register(model_type, cfg)
            AutoModelForCausalLM.register(cfg, model)
            added.append((model_type, cfg))
        yield
    finally:
        for model_type, cfg in added:
            CONFIG_MAPPING._extra_content.pop(model_type, None)
            mapping._extra_content.pop(cfg, None)
