"""Tiny random causal LMs built from real transformers config classes (offline, CPU).

Sizes: hidden 64, 2 layers, vocab 512, so group size 32 divides every layer.
"""

from __future__ import annotations

import torch

VOCAB = 512


def tiny_llama(seed: int = 0, layers: int = 2, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, **over)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2, **over):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, **over)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, layers: int = 2, **over):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64, **over)
    return OPTForCausalLM(cfg).eval()


FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "opt": tiny_opt}
