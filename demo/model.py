"""A LLaVA-shaped vision-language model whose language model is a real causal LM.

Used by ``make demo`` and the benchmarks: the language model's weights are real (SmolLM2-135M
from :mod:`demo.assets`), the CLIP-style vision tower and projector are small and random.
Every multimodal code path runs, and text quality after quantization is measurable by perplexity;
answers about images are not meaningful (the vision tower is untrained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

import torch

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hub_weight_names(model: Any) -> list:
    """The weight renamings that make ``save_pretrained`` of a model built from a config write the tensor names
    of the hub's checkpoints of its class, as it does for a model that ``from_pretrained`` loaded.

    transformers 5 keeps CLIP's tower flat in memory (``vision_tower.embeddings``) and puts the
    ``vision_model.`` level back on save only for a loaded model: for a built one it drops the prefix change
    (it cannot know where the weights came from). Every folder saved from such a model (all our formats go
    through ``save_pretrained``) then has ``vision_tower.embeddings.*``, which transformers reads but vLLM's CLIP
    loader refuses ("There is no module or parameter named 'vision_tower.embeddings'"). Set as the model's
    ``_weight_conversions`` (what ``from_pretrained`` records), the full mapping is reverted on save, the
    prefix change included."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model, add_legacy=False)


def build_llava_with_lm(lm_dir: Union[str, Path], image_size: int = 64, patch_size: int = 16,
                        vision_hidden: int = 64, vision_layers: int = 2, seed: int = 0) -> Tuple[Any, Any, Any]:
    """Return ``(model, tokenizer, processor)``: LLaVA around the causal LM saved in ``lm_dir``.

    The tokenizer gains an ``<image>`` token; the language model's embeddings grow by one row.
    The processor expands ``<image>`` to ``(image_size / patch_size)^2`` placeholder tokens.
    """
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    lm.resize_token_embeddings(len(tok))
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    cfg = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_index=image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      projector_hidden_act="gelu", tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.eval()
    model._weight_conversions = hub_weight_names(model)
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
    return model, tok, processor
