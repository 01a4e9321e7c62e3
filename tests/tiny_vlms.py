"""A zoo of tiny random vision-language models with offline processors, for tests.

Each factory in ``FAMILIES`` builds (seeded, CPU, ~0.05 s once the shared tokenizer is trained) a model
from the REAL transformers config and ``*ForConditionalGeneration`` class of its family, at tiny sizes,
plus the family's REAL processor class around the byte-level BPE tokenizer of
``tests/tokenizer_fixture.make_tokenizer`` (deep-copied) with the family's special tokens added. Nothing
is downloaded.

Sizes: text hidden 64, 2 decoder layers (mllama: 3, one of them cross-attention), 4 heads / 2 kv heads,
intermediate 128; vision hidden 32, 1-2 vision layers; tiny images (``TinyVLM.image_size``). The
tokenizer's 512 ids plus the family's special tokens are covered by the model's vocabulary (rounded up
to a multiple of 32: 544). Every nn.Linear has in_features divisible by 32 except llama4's
``vision_model.patch_embedding.linear`` (3*14*14 = 588, as in the real model).

Uniform way to get model inputs (works for every family)::

    vlm = FAMILIES["qwen2_vl"]()
    inputs = vlm.inputs(["What is shown?"], images=[make_image(vlm.image_size)])
    out = vlm.model.generate(**inputs, max_new_tokens=3)

``TinyVLM.inputs`` calls ``processor.apply_chat_template(conversation(s), add_generation_prompt=True,
tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True,
"padding_side": side, **vlm.processor_kwargs})`` with the PIL image inside the message
(``{"type": "image", "image": img}``), then casts floating tensors to the model dtype. Equivalent
calls that also work for every family (same input_ids):

* messages with a bare ``{"type": "image"}`` and ``processor_kwargs={"images": [img]}``;
* ``prompt = processor.apply_chat_template(messages, add_generation_prompt=True)`` then
  ``processor(text=prompt, images=[img], add_special_tokens=False, return_tensors="pt")``
  (``add_special_tokens=False`` because the template already starts with the BOS).

The chat template of every processor emits the family's image placeholder for each
``{"type": "image"}`` item and the processor expands it to the number of image tokens the tiny model
expects. Per-family quirks are in ``TinyVLM.notes`` and in ``tests/TINY_VLMS.md``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch

from tokenizer_fixture import make_tokenizer

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


@dataclasses.dataclass
class TinyVLM:
    model: Any
    processor: Any
    tokenizer: Any
    model_type: str
    image_token: str
    notes: str
    image_size: tuple[int, int] = (56, 56)  # (height, width) of the test image the processor is sized for
    n_image_tokens: int = 4  # image_token ids in input_ids for one image of image_size
    supports_text_only: bool = True  # text-only forward/generate works (True for every family here)
    padding_side: str = "left"
    # Extra processor call kwargs this family needs (also needed with a processor reloaded from disk).
    processor_kwargs: dict = dataclasses.field(default_factory=dict)

    def messages(self, text: str, with_image: bool = True, image=None) -> list[dict]:
        content: list[dict] = []
        if with_image:
            content.append({"type": "image", "image": image} if image is not None else {"type": "image"})
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def inputs(self, texts: list[str] | str, images: list | None = None, padding_side: str | None = None):
        """Batch of chat prompts (one image per sample when ``images`` is given), padded, as torch tensors."""
        if isinstance(texts, str):
            texts = [texts]
        if images is not None and len(images) != len(texts):
            raise ValueError("give one image per text")
        convs = [self.messages(t, with_image=images is not None, image=None if images is None else images[i])
                 for i, t in enumerate(texts)]
        # padding_side is passed per call: some processors (internvl, llama4) force "left" in their call defaults.
        side = padding_side or self.padding_side
        out = self.processor.apply_chat_template(
            convs if len(convs) > 1 else convs[0], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": side, **self.processor_kwargs})
        # Some image processors (llama4) return bfloat16 pixel_values: match the model's dtype.
        dtype = self.model.dtype
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                out[key] = value.to(dtype)
        return out


def make_image(size: tuple[int, int] = (56, 56), seed: int = 0):
    """A deterministic RGB PIL image of ``size`` = (height, width)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    h, w = size
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGB")


def _tokenizer(*specials: str, named: dict[str, str] | None = None):
    """A private copy of the shared test tokenizer with ``specials`` added as special tokens.

    ``named`` (e.g. ``{"image_token": "<image>"}``) are also added and registered as named model-specific
    special tokens, so ``tok.image_token`` / ``tok.image_token_id`` work (what processors read), exactly
    like a hub tokenizer whose config has ``extra_special_tokens`` as a dict.
    """
    tok = copy.deepcopy(make_tokenizer())
    wanted = list(specials) + [v for v in (named or {}).values() if v not in specials]
    new = [s for s in wanted if s not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    if named:
        tok._set_model_specific_special_tokens(special_tokens=dict(named))
    return tok


def _vocab(tok, multiple: int = 32) -> int:
    return -(-len(tok) // multiple) * multiple


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _tok_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _finish(model, tok):
    model.eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model


def _wake_(model, predicate: Callable[[str], bool], low: float = -0.1, high: float = 0.1) -> None:
    """Re-initialise (seeded by the caller) parameters that the family inits to zero but that are
    non-zero in trained checkpoints, so the image actually influences the logits (uniform [low, high))."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if predicate(name):
                param.uniform_(low, high)


def _chat_template(image: str) -> str:
    """A jinja chat template in the style of the shared test tokenizer's, emitting ``image`` for every
    ``{"type": "image"}`` content item (string contents work too)."""
    item = ("{% if item['type'] == 'image' %}" + image
            + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}")
    return (
        "{{ bos_token }}"
        "{% for message in messages %}<|{{ message['role'] }}|>\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}" + item + "{% endfor %}{% endif %}"
        "{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


# --------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# --------------------------------------------------------------------------------------------------

QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_tok():
    tok = _tokenizer(*QWEN_SPECIALS)
    tok.chat_template = None
    return tok


def _qwen_image_processor(cls, patch: int, merge: int = 2, side: int = 56, frames: int = 1):
    px = side * side * frames  # glm4v's smart_resize counts the temporal_patch_size=2 frames in the budget
    return cls(size={"shortest_edge": px, "longest_edge": px}, patch_size=patch, temporal_patch_size=2,
               merge_size=merge)


def tiny_qwen2_vl(seed: int = 0) -> TinyVLM:
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tok()
    img_id, vid_id, vs_id, ve_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                        "<|vision_end|>")
    cfg = Qwen2VLConfig(
        text_config=dict(**TEXT, vocab_size=_vocab(tok), rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **_tok_ids(tok)),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=img_id, video_token_id=vid_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2VLForConditionalGeneration(cfg), tok)
    proc = Qwen2VLProcessor(
        image_processor=_qwen_image_processor(Qwen2VLImageProcessor, 14),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
        chat_template=_chat_template(QWEN_IMAGE))
    return TinyVLM(model, proc, tok, "qwen2_vl", "<|image_pad|>",
                   notes="56x56 image -> 4x4 patches of 14 -> 4 image tokens after 2x2 merge. pixel_values are "
                         "flat [patches, 3*2*14*14=1176] with image_grid_thw [n_images, 3]; position ids are 3D "
                         "mrope, computed inside the model from input_ids + image_grid_thw + mm_token_type_ids "
                         "(the processor returns mm_token_type_ids; keep it in the inputs).")


def tiny_qwen2_5_vl(seed: int = 0, window_size: int = 28) -> TinyVLM:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tok()
    img_id, vid_id, vs_id, ve_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                        "<|vision_end|>")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**TEXT, vocab_size=_vocab(tok), rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **_tok_ids(tok)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           fullatt_block_indexes=[1]),
        image_token_id=img_id, video_token_id=vid_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2_5_VLForConditionalGeneration(cfg), tok)
    proc = Qwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(Qwen2VLImageProcessor, 14),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
        chat_template=_chat_template(QWEN_IMAGE))
    return TinyVLM(model, proc, tok, "qwen2_5_vl", "<|image_pad|>",
                   notes="Like qwen2_vl: 56x56 image -> 16 patches -> 4 image tokens; flat pixel_values [16, 1176] "
                         "+ image_grid_thw (+ mm_token_type_ids for the 3D mrope positions). Vision block 0 uses "
                         "window attention (window_size=28: each 2x2-patch merge unit is its own window), block 1 "
                         "full attention (fullatt_block_indexes=[1]). Vision MLP is gated "
                         "(gate_proj/up_proj/down_proj).")


def tiny_qwen3_vl(seed: int = 0) -> TinyVLM:
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tok = _qwen_tok()
    img_id, vid_id, vs_id, ve_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                        "<|vision_end|>")
    cfg = Qwen3VLConfig(
        text_config=dict(**TEXT, head_dim=16, vocab_size=_vocab(tok), rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         **_tok_ids(tok)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=img_id, video_token_id=vid_id, vision_start_token_id=vs_id, vision_end_token_id=ve_id,
    )
    torch.manual_seed(seed)
    model = _finish(Qwen3VLForConditionalGeneration(cfg), tok)
    proc = Qwen3VLProcessor(
        image_processor=_qwen_image_processor(Qwen2VLImageProcessor, 16, side=64),
        tokenizer=tok, video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        chat_template=_chat_template(QWEN_IMAGE))
    return TinyVLM(model, proc, tok, "qwen3_vl", "<|image_pad|>", image_size=(64, 64),
                   notes="64x64 image -> 4x4 patches of 16 -> 4 image tokens; flat pixel_values [16, 3*2*16*16=1536] "
                         "+ image_grid_thw. Learned position embedding (num_position_embeddings=16, interpolated). "
                         "Deepstack: the output of vision block 0 goes through model.visual.deepstack_merger_list[0] "
                         "and is added to the hidden states of text layer 0 at the image positions.")


# --------------------------------------------------------------------------------------------------
# Llama-3.2-Vision (mllama)
# --------------------------------------------------------------------------------------------------


def tiny_mllama(seed: int = 0) -> TinyVLM:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tok = _tokenizer("<|image|>", "<|python_tag|>")
    (img_id,) = _ids(tok, "<|image|>")
    cfg = MllamaConfig(
        text_config=dict(**{**TEXT, "num_hidden_layers": 3}, cross_attention_layers=[1], vocab_size=_vocab(tok),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_tok_ids(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, attention_heads=2, num_hidden_layers=2,
                           num_global_layers=1, intermediate_layers_indices=[0], vision_output_dim=64,
                           image_size=28, patch_size=14, max_num_tiles=2,
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        image_token_index=img_id,
    )
    torch.manual_seed(seed)
    model = _finish(MllamaForConditionalGeneration(cfg), tok)
    # tanh gates (cross-attention, tile/positional embeddings) init to 0: open them like a trained model's.
    _wake_(model, lambda n: n.endswith("gate"), 0.5, 1.0)
    proc = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2),
        tokenizer=tok, chat_template=_chat_template("<|image|>"))
    return TinyVLM(model, proc, tok, "mllama", "<|image|>", image_size=(28, 28),
                   n_image_tokens=1,
                   notes="Cross-attention VLM: ONE <|image|> token in the text (not expanded); the image goes through "
                         "the vision model as tiles of 28x28 (max_num_tiles=2, aspect ratios [1,1],[1,2],[2,1]; a "
                         "28x28 image is 1 tile) and reaches the text model only through the cross-attention "
                         "decoder layer(s) (text layer 1 of 3 is a MllamaCrossAttentionDecoderLayer). Inputs: "
                         "pixel_values [batch, n_images, max_tiles, 3, 28, 28], aspect_ratio_ids [batch, n_images], "
                         "aspect_ratio_mask [batch, n_images, max_tiles], cross_attention_mask "
                         "[batch, seq, n_images, max_tiles]. Text-only works: without pixel_values / "
                         "cross_attention_states the cross-attention layers are skipped. Text model has 3 layers "
                         "(self, cross, self) so a self-attention layer follows the cross-attention one. The vision "
                         "model concatenates the final hidden state with intermediate layer 0 -> "
                         "vision_output_dim=64 = 2*32 into the projector (model.model.multi_modal_projector is itself "
                         "one nn.Linear). embed_tokens has vocab_size+8 rows. The tanh gates (cross_attn_attn_gate, "
                         "cross_attn_mlp_gate, positional-embedding gates) init to 0 in transformers, which would "
                         "cut the image off; the factory sets them to U(0.5, 1).")


# --------------------------------------------------------------------------------------------------
# Gemma 3
# --------------------------------------------------------------------------------------------------


def tiny_gemma3(seed: int = 0) -> TinyVLM:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = _tokenizer(named={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                            "eoi_token": "<end_of_image>"})
    img_id, boi_id, eoi_id = _ids(tok, "<image_soft_token>", "<start_of_image>", "<end_of_image>")
    cfg = Gemma3Config(
        text_config=dict(**TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"], vocab_size=_vocab(tok),
                         **_tok_ids(tok)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=img_id, boi_token_index=boi_id, eoi_token_index=eoi_id,
    )
    torch.manual_seed(seed)
    model = _finish(Gemma3ForConditionalGeneration(cfg), tok)
    _wake_(model, lambda n: n.endswith("mm_input_projection_weight"), -0.2, 0.2)  # inits to zeros
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}),
        tokenizer=tok, image_seq_length=4, chat_template=_chat_template("<start_of_image>"))
    return TinyVLM(model, proc, tok, "gemma3", "<image_soft_token>",
                   notes="Template placeholder is <start_of_image> (boi); the processor expands it to "
                         "'\\n\\n<start_of_image>' + 4 x <image_soft_token> + '<end_of_image>\\n\\n'. 56x56 image -> "
                         "SigLIP 4x4=16 patches -> projector avg-pools 2x2 -> mm_tokens_per_image=4. The processor "
                         "returns token_type_ids (1 on image tokens): image tokens attend bidirectionally. "
                         "The projector is NOT an nn.Linear: model.model.multi_modal_projector."
                         "mm_input_projection_weight is an nn.Parameter [vision_hidden, text_hidden] used with "
                         "torch.matmul; transformers inits it to zeros (image ignored), so the factory sets it to "
                         "U(-0.2, 0.2). Text: layer 0 sliding (window 16), layer 1 full attention; tied lm_head.")


# --------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM
# --------------------------------------------------------------------------------------------------

IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i + 1}_col_{j + 1}>" for i in range(2) for j in range(2))
IDEFICS_NOTES = (
    "Image splitting is ON (as in the real checkpoints): the processor resizes the image to longest edge 128 "
    "(image_size=(128,128)), splits it into 2x2 tiles of 64 + 1 global 64x64 image = 5 sub-images; each goes "
    "through the vision model (64/16 -> 16 patches) and the connector's pixel-shuffle (scale_factor=2) -> 4 "
    "<image> tokens per sub-image = 20 <image> tokens, with <fake_token_around_image>, <row_i_col_j> and "
    "<global-img> tags around them. pixel_values [batch, max_sub_images, 3, 64, 64] (+ pixel_attention_mask "
    "[batch, max_sub_images, 64, 64]); padded sub-images are all-zero and dropped in the model. The connector "
    "input is vision_hidden*scale_factor**2 = 32*4 = 128.")


def _idefics_tok():
    tok = _tokenizer(*IDEFICS_SPECIALS)
    tok.chat_template = None
    return tok


def _idefics_image_kwargs():
    return dict(size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True)


def tiny_idefics3(seed: int = 0) -> TinyVLM:
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    tok = _idefics_tok()
    (img_id,) = _ids(tok, "<image>")
    cfg = Idefics3Config(
        text_config=dict(model_type="llama", **TEXT, vocab_size=_vocab(tok), tie_word_embeddings=False,
                         **_tok_ids(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        image_token_id=img_id, scale_factor=2, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = _finish(Idefics3ForConditionalGeneration(cfg), tok)
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessor(**_idefics_image_kwargs()), tokenizer=tok,
                             image_seq_len=4, chat_template=_chat_template("<image>"))
    assert len(tok) <= model.config.text_config.vocab_size
    return TinyVLM(model, proc, tok, "idefics3", "<image>", image_size=(128, 128),
                   n_image_tokens=20,
                   notes="Text model is Llama. " + IDEFICS_NOTES)


def tiny_smolvlm(seed: int = 0) -> TinyVLM:
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor)

    tok = _idefics_tok()
    (img_id,) = _ids(tok, "<image>")
    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", **TEXT, vocab_size=_vocab(tok), tie_word_embeddings=False,
                         **_tok_ids(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        image_token_id=img_id, scale_factor=2, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = _finish(SmolVLMForConditionalGeneration(cfg), tok)
    proc = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**_idefics_image_kwargs()), tokenizer=tok,
                            video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                            chat_template=_chat_template("<image>"))
    return TinyVLM(model, proc, tok, "smolvlm", "<image>", image_size=(128, 128),
                   n_image_tokens=20,
                   notes="Needs the `num2words` package (SmolVLMProcessor imports it). Text model is Llama. "
                         + IDEFICS_NOTES)


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5 (also JoyCaption's class) / LLaVA-NeXT (Granite-Vision) / Mistral-Small-3.1 (mistral3)
# --------------------------------------------------------------------------------------------------


def tiny_llava(seed: int = 0) -> TinyVLM:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer("<image>")
    (img_id,) = _ids(tok, "<image>")
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", **TEXT, vocab_size=_vocab(tok), **_tok_ids(tok)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=32),
        image_token_index=img_id, image_seq_length=4, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = _finish(LlavaForConditionalGeneration(cfg), tok)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_chat_template("<image>"))
    return TinyVLM(model, proc, tok, "llava", "<image>", image_size=(28, 28),
                   notes="LLaVA-1.5 layout: CLIP vision tower (28x28 -> 2x2 patches + CLS), "
                         "vision_feature_layer=-2 and strategy 'default' (CLS dropped) -> 4 <image> tokens; "
                         "pixel_values [batch, 3, 28, 28]. As in the real model, the LAST CLIP encoder layer "
                         "(and post_layernorm) does not feed the LM (feature layer -2), so it sees no "
                         "calibration signal. JoyCaption uses the same class with a SigLIP tower and "
                         "vision_feature_select_strategy='full'.")


def tiny_llava_next(seed: int = 0) -> TinyVLM:
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = _tokenizer("<image>")
    (img_id,) = _ids(tok, "<image>")
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    cfg = LlavaNextConfig(
        text_config=dict(model_type="granite", **TEXT, vocab_size=_vocab(tok), embedding_multiplier=12.0,
                         logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                         tie_word_embeddings=True, **_tok_ids(tok)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                           vision_use_head=False),
        image_token_index=img_id, image_grid_pinpoints=pinpoints, vision_feature_layer=[-2, -1],
        vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(cfg), tok)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        chat_template=_chat_template("<image>"))
    return TinyVLM(model, proc, tok, "llava_next", "<image>", image_size=(56, 56),
                   n_image_tokens=24,
                   notes="Granite-Vision layout: LLaVA-NeXT with a SigLIP tower (no CLS, strategy 'full'), Granite "
                         "text model, multi-layer features (vision_feature_layer=[-2,-1] -> projector input "
                         "2*32=64). AnyRes: a 56x56 image picks pinpoint 56x56 -> 4 tiles of 28 + 1 base image; "
                         "pixel_values [batch, 5, 3, 28, 28] plus image_sizes [batch, 2]; 24 <image> tokens = 4 "
                         "(base) + 16 (tiles, unpadded) + 4 (image_newline, an nn.Parameter model.model."
                         "image_newline). Token count depends on the image size (anyres).")


def tiny_mistral3(seed: int = 0) -> TinyVLM:
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor,
                              PixtralProcessor)

    tok = _tokenizer("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    (img_id,) = _ids(tok, "[IMG]")
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", **TEXT, head_dim=16, sliding_window=None, vocab_size=_vocab(tok),
                         **_tok_ids(tok)),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, image_size=56, patch_size=14, hidden_act="silu"),
        image_token_index=img_id, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = _finish(Mistral3ForConditionalGeneration(cfg), tok)
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 56}, patch_size={"height": 14, "width": 14}),
        tokenizer=tok, patch_size=14, spatial_merge_size=2, chat_template=_chat_template("[IMG]"))
    return TinyVLM(model, proc, tok, "mistral3", "[IMG]", image_size=(56, 56),
                   notes="Pixtral vision tower (2D rope, no CLS), 56x56 image -> 4x4 patches of 14 -> "
                         "projector patch_merger (2x2 spatial merge) -> 4 [IMG] tokens laid out as "
                         "[IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]. pixel_values [batch, 3, H, W] (padded to "
                         "the largest image) + image_sizes [batch, 2]; token count depends on the image size. "
                         "Template placeholder is one [IMG]; PixtralProcessor expands it.")


# --------------------------------------------------------------------------------------------------
# Aria
# --------------------------------------------------------------------------------------------------


def tiny_aria(seed: int = 0) -> TinyVLM:
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaImageProcessor, AriaProcessor

    tok = _tokenizer(named={"image_token": "<|img|>"})
    (img_id,) = _ids(tok, "<|img|>")
    cfg = AriaConfig(
        text_config=dict(**TEXT, vocab_size=_vocab(tok), moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
                         **_tok_ids(tok)),
        vision_config=dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=490, patch_size=14),
        projector_patch_to_query_dict={1225: 4}, image_token_index=img_id, vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = _finish(AriaForConditionalGeneration(cfg), tok)
    proc = AriaProcessor(image_processor=AriaImageProcessor(max_image_size=490, min_image_size=28),
                         tokenizer=tok, size_conversion={490: 4}, chat_template=_chat_template("<|img|>"))
    # AriaProcessor's class-level call defaults force max_image_size=980; override them on this instance.
    proc.images_kwargs = {"max_image_size": 490, "split_image": False}
    return TinyVLM(model, proc, tok, "aria", "<|img|>", image_size=(56, 56),
                   processor_kwargs={"max_image_size": 490},
                   notes="AriaImageProcessor only accepts max_image_size 490 or 980, so the tiny model still sees "
                         "490x490 crops (pixel_values [n_crops, 3, 490, 490] + pixel_mask [n_crops, 490, 490]) "
                         "-> 35x35=1225 patches of 14 in the (Idefics3-style) vision tower; the projector's 4 "
                         "learned queries cross-attend to them (projector_patch_to_query_dict={1225: 4}, "
                         "processor size_conversion={490: 4}) -> 4 <|img|> tokens. AriaProcessor's class defaults "
                         "force max_image_size=980 at call time: the factory overrides proc.images_kwargs on the "
                         "instance (a processor reloaded from disk needs max_image_size=490 per call: "
                         "TinyVLM.processor_kwargs). Text is MoE: "
                         "mlp.experts.gate_up_proj / down_proj are 3D nn.Parameters (NOT nn.Linear, 4 experts, "
                         "top-2), mlp.router.weight an nn.Parameter, mlp.shared_experts.{gate,up,down}_proj are "
                         "nn.Linear. The projector's cross_attn.multihead_attn is a torch nn.MultiheadAttention "
                         "whose out_proj is an nn.Linear subclass read by weight (do not swap it).")


# --------------------------------------------------------------------------------------------------
# GLM-4.1V (glm4v)
# --------------------------------------------------------------------------------------------------

GLM_SPECIALS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>",
                "<|end_of_video|>")


def tiny_glm4v(seed: int = 0) -> TinyVLM:
    from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessor, Glm4vProcessor,
                              Glm4vVideoProcessor)

    tok = _tokenizer(*GLM_SPECIALS)
    tok.chat_template = None
    bi, img, ei, bv, vid, ev = _ids(tok, *GLM_SPECIALS)
    cfg = Glm4vConfig(
        text_config=dict(**TEXT, vocab_size=_vocab(tok), rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2]}, **_tok_ids(tok)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=img, video_token_id=vid, image_start_token_id=bi, image_end_token_id=ei,
        video_start_token_id=bv, video_end_token_id=ev,
    )
    torch.manual_seed(seed)
    model = _finish(Glm4vForConditionalGeneration(cfg), tok)
    proc = Glm4vProcessor(
        image_processor=_qwen_image_processor(Glm4vImageProcessor, 14, frames=2),
        tokenizer=tok, video_processor=Glm4vVideoProcessor(patch_size=14, merge_size=2),
        chat_template=_chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    return TinyVLM(model, proc, tok, "glm4v", "<|image|>",
                   notes="Qwen2-VL-like inputs: 56x56 image -> 16 patches of 14 -> 4 <|image|> tokens between "
                         "<|begin_of_image|>/<|end_of_image|>; flat pixel_values [16, 1176] + image_grid_thw; 3D "
                         "mrope (partial_rotary_factor 0.5, mrope_section [1,1,2]). Vision: blocks, then a "
                         "Conv2d downsample (2x2 merge, NOT Linear) into out_hidden_size, then the gated merger "
                         "(proj / gate_proj / up_proj / down_proj, all nn.Linear). Text MLP uses a fused "
                         "gate_up_proj Linear; each text layer has 4 RMSNorms (post_self_attn/post_mlp too).")


# --------------------------------------------------------------------------------------------------
# InternVL (InternVL3 -hf layout)
# --------------------------------------------------------------------------------------------------


def tiny_internvl(seed: int = 0) -> TinyVLM:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    tok = _tokenizer(named={"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    (img_id,) = _ids(tok, "<IMG_CONTEXT>")
    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", **TEXT, vocab_size=_vocab(tok), tie_word_embeddings=False,
                         **_tok_ids(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=img_id, image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(cfg), tok)
    _wake_(model, lambda n: n.endswith(("embeddings.cls_token", "embeddings.position_embeddings")))  # zeros
    proc = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=True,
                                              min_patches=1, max_patches=4),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size={"height": 56, "width": 56}),
        image_seq_length=4, chat_template=_chat_template("<IMG_CONTEXT>\n"))
    return TinyVLM(model, proc, tok, "internvl", "<IMG_CONTEXT>",
                   notes="InternVL3-hf layout (InternViT-style vision tower with layer-scale lambda_1/lambda_2 "
                         "params, Qwen2 text). Template placeholder <IMG_CONTEXT> is expanded to "
                         "<img> + 4*n_tiles <IMG_CONTEXT> + </img>. GotOcr2ImageProcessor crops to 56x56 tiles "
                         "(crop_to_patches, max 4 tiles + a thumbnail when >1 tile); a 56x56 image is 1 tile -> "
                         "4 tokens (16 patches, pixel-shuffle downsample_ratio 0.5). pixel_values "
                         "[total_tiles, 3, 56, 56] (tiles of all samples concatenated, no batch dim). The "
                         "vision CLS token is dropped (strategy 'default'). Projector input = 32*4 = 128.")


# --------------------------------------------------------------------------------------------------
# Llama 4
# --------------------------------------------------------------------------------------------------

LLAMA4_SPECIALS = ("<|image_start|>", "<|image|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                   "<|tile_y_separator|>")


def tiny_llama4(seed: int = 0) -> TinyVLM:
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    tok = _tokenizer(*LLAMA4_SPECIALS)
    boi, patch, eoi = _ids(tok, "<|image_start|>", "<|patch|>", "<|image_end|>")
    cfg = Llama4Config(
        text_config=dict(**TEXT, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                         num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=2,
                         attention_chunk_size=32, vocab_size=_vocab(tok),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_tok_ids(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                           projector_output_dim=64, vision_output_dim=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        boi_token_index=boi, eoi_token_index=eoi, image_token_index=patch,
    )
    torch.manual_seed(seed)
    model = _finish(Llama4ForConditionalGeneration(cfg), tok)
    proc = Llama4Processor(image_processor=Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=4),
                           tokenizer=tok, patch_size=14, pixel_shuffle_ratio=0.5,
                           chat_template=_chat_template("<|image|>"))
    return TinyVLM(model, proc, tok, "llama4", "<|patch|>",
                   notes="Template placeholder is <|image|>; the processor expands it to <|image_start|> "
                         "[tiles...] <|image|> + 4 <|patch|> + <|image_end|>; the model's image_token_index is "
                         "<|patch|>. 56x56 image -> 1 tile (16 patches of 14 + CLS dropped, pixel-shuffle 0.5 -> "
                         "4 tokens). pixel_values [total_tiles, 3, 56, 56], returned as bfloat16 by "
                         "Llama4ImageProcessor (TinyVLM.inputs casts them to the model dtype). Text: layer 0 dense "
                         "(feed_forward = Llama4TextMLP, intermediate_size_mlp=128), layer 1 MoE (feed_forward = "
                         "Llama4TextMoe: experts.gate_up_proj / experts.down_proj are 3D nn.Parameters, "
                         "router is an nn.Linear SUBCLASS (Llama4Router), shared_expert is a normal MLP); "
                         "layer 1 is NoPE (no_rope_layer_interval=2), layer 0 uses chunked attention (chunk 32). "
                         "Vision: vision_adapter (pixel-shuffle MLP: mlp.fc1 in 128, mlp.fc2) inside the vision "
                         "model, then multi_modal_projector.linear_1.")


FAMILIES: dict[str, Callable[[], TinyVLM]] = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "mllama": tiny_mllama,
    "gemma3": tiny_gemma3,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "mistral3": tiny_mistral3,
    "aria": tiny_aria,
    "glm4v": tiny_glm4v,
    "internvl": tiny_internvl,
    "llama4": tiny_llama4,
}


def skip_on_upstream_break(name: str) -> None:
    """Skip (with the refusal's own message) when an installed release is known to break ``name``'s family
    (:mod:`auto_round.compat`); on every other version the test runs."""
    from auto_round.compat import active_break
    from auto_round.mllm.families import family_for

    family = family_for(name)
    why = active_break(family.name, family.upstream_breaks) if family is not None else None
    if why:
        pytest.skip(why)
