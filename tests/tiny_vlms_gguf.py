"""Tiny random VLMs shaped so that llama.cpp's mtmd can run their GGUF pair, for the mmproj tests and
``bench/bench_gguf_mmproj.py``.

The seed zoo (``tests/tiny_vlms.py``) builds these families in shapes llama.cpp cannot represent, which
the exporter refuses (tested there): its Gemma-3 has 2 text layers with full attention on layer 1
(llama.cpp hard-codes every 6th layer), its LLaVA-NeXT has a Granite text model (no llama.cpp text arch
written here) and its Mistral-3 normalises the patch merger with text ``rms_norm_eps=1e-6`` (llama.cpp with
Pixtral's 1e-5) and has images of 4 tokens (llama.cpp's pixtral preprocessing upscales to at least 8), and
its Qwen2.5-VL windows by 28 pixels (one merge unit; llama.cpp always windows by 112).
The variants here change only that, with the seed zoo's tokenizers, processors and sizes otherwise.
"""

from __future__ import annotations

import torch

from tiny_vlms import TEXT, TinyVLM, _chat_template, _finish, _ids, _tok_ids, _tokenizer, _vocab, _wake_, tiny_qwen2_5_vl


def tiny_gemma3_gguf(seed: int = 0) -> TinyVLM:
    """Gemma-3 with 6 text layers (layer 5 full attention, the others a 16-token sliding window: the
    pattern llama.cpp's gemma3 arch hard-codes); SigLIP 56x56 / 14 -> 16 patches, avg-pooled 2x2 to 4
    image tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = _tokenizer(named={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                            "eoi_token": "<end_of_image>"})
    img_id, boi_id, eoi_id = _ids(tok, "<image_soft_token>", "<start_of_image>", "<end_of_image>")
    cfg = Gemma3Config(
        text_config=dict(**{**TEXT, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         vocab_size=_vocab(tok), **_tok_ids(tok)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=img_id, boi_token_index=boi_id, eoi_token_index=eoi_id,
    )
    torch.manual_seed(seed)
    model = _finish(Gemma3ForConditionalGeneration(cfg), tok)
    _wake_(model, lambda n: n.endswith("mm_input_projection_weight"), -0.2, 0.2)  # inits to zeros
    # norms init to 0 (scale 1 + 0): give them values, so the +1 convention is exercised
    _wake_(model, lambda n: n.endswith("norm.weight") and "vision_tower" not in n, -0.3, 0.3)
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}),
                           tokenizer=tok, image_seq_length=4, chat_template=_chat_template("<start_of_image>"))
    return TinyVLM(model, proc, tok, "gemma3", "<image_soft_token>",
                   notes="tiny_gemma3 with 6 text layers: llama.cpp's sliding pattern; norms woken to U(-0.3, 0.3)")


def tiny_llava_next_gguf(seed: int = 0, tower: str = "clip") -> TinyVLM:
    """LLaVA-NeXT with a Llama text model (the llava-v1.6-vicuna layout). ``tower="clip"``: CLIP 28x28 / 14,
    feature layer -2, strategy 'default'; ``"siglip"``: the Granite-Vision layout (SigLIP, feature
    layers [-2, -1], strategy 'full'). Pinpoints [[28, 56], [56, 28], [56, 56]]: a 56x56 image is 4 tiles
    of 28 plus the 28x28 overview."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = _tokenizer("<image>")
    (img_id,) = _ids(tok, "<image>")
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    clip = tower == "clip"
    vision = dict(model_type="clip_vision_model" if clip else "siglip_vision_model", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    vision.update(projection_dim=32) if clip else vision.update(vision_use_head=False)
    strategy = "default" if clip else "full"
    cfg = LlavaNextConfig(
        text_config=dict(model_type="llama", **TEXT, vocab_size=_vocab(tok), **_tok_ids(tok)),
        vision_config=vision, image_token_index=img_id, image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2 if clip else [-2, -1], vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(cfg), tok)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if clip else 0, chat_template=_chat_template("<image>"))
    return TinyVLM(model, proc, tok, "llava_next", "<image>", image_size=(56, 56), n_image_tokens=24,
                   notes=f"LLaVA-NeXT, Llama text, {tower} tower")


def tiny_mistral3_gguf(seed: int = 0) -> TinyVLM:
    """Mistral-3 with text ``rms_norm_eps=1e-5`` (Mistral-Small-3.1's; transformers normalises the patch
    merger with it) and 112x112 images (8x8 patches of 14, merged 2x2 to 4x4 = 16 image tokens)."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor,
                              PixtralProcessor)

    tok = _tokenizer("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    (img_id,) = _ids(tok, "[IMG]")
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", **TEXT, head_dim=16, sliding_window=None, rms_norm_eps=1e-5,
                         vocab_size=_vocab(tok), **_tok_ids(tok)),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, image_size=112, patch_size=14, hidden_act="silu"),
        image_token_index=img_id, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = _finish(Mistral3ForConditionalGeneration(cfg), tok)
    _wake_(model, lambda n: n.endswith("norm.weight"), 0.5, 1.5)  # RMSNorm weights init to 1
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 112}, patch_size={"height": 14, "width": 14}),
        tokenizer=tok, patch_size=14, spatial_merge_size=2, chat_template=_chat_template("[IMG]"))
    return TinyVLM(model, proc, tok, "mistral3", "[IMG]", image_size=(112, 112), n_image_tokens=16,
                   notes="Mistral-3 / Pixtral, 2 vision blocks, 112x112 -> 16 [IMG] + 3 [IMG_BREAK] + [IMG_END]")


def tiny_qwen2_5_vl_gguf(seed: int = 0) -> TinyVLM:
    """The seed zoo's Qwen2.5-VL with Qwen2.5-VL's real window of 112 pixels (4 merge units a side at patch 14),
    the only one llama.cpp's qwen2.5vl graph runs: a 224x224 image is 4 windows of 16 image tokens."""
    vlm = tiny_qwen2_5_vl(seed, window_size=112)
    vlm.notes += " GGUF variant: window_size=112 (llama.cpp's hard-coded window)."
    return vlm


GGUF_FAMILIES = {
    "gemma3": tiny_gemma3_gguf,
    "llava_next": tiny_llava_next_gguf,
    "llava_next_siglip": lambda seed=0: tiny_llava_next_gguf(seed, tower="siglip"),
    "mistral3": tiny_mistral3_gguf,
    "qwen2_5_vl": tiny_qwen2_5_vl_gguf,
}
