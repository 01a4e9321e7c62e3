"""GGUF export for llama.cpp: formats ``gguf:q4_0``, ``gguf:q4_1``, ``gguf:q5_0``, ``gguf:q5_1``, ``gguf:q8_0``.

The file is written from the tuned integers and scales (nothing is re-quantized by llama.cpp's
quantizer): one ggml block per SignRound group of 32 (layouts in :mod:`.blocks`).

==========  =========================================  ==============================  ===========
format      tune with                                  block value                     exactness
==========  =========================================  ==============================  ===========
gguf:q4_0   bits=4 group_size=32 sym=True              d*(q-8), d = scale              bit-exact
gguf:q4_1   bits=4 group_size=32 sym=False             d*q+m, m = fp16(-scale*zero)    see below
gguf:q5_0   bits=5 group_size=32 sym=True              d*(q-16)                        bit-exact
gguf:q5_1   bits=5 group_size=32 sym=False             d*q+m                           see below
gguf:q8_0   bits=8 group_size=32 sym=True              d*(q-128) as int8               bit-exact
==========  =========================================  ==============================  ===========

Both sym styles map (``full_range`` and ``gptq`` differ only in how the scale is chosen, the grid
``scale*(q - 2^(bits-1))`` is the same); scales must be fp16 (``scale_dtype='fp16'``). For the
``_1`` types ``m`` is rounded once to fp16: ``|error| <= 2^-11 |scale*zero|``, under 0.75% (q4_1)
/ 1.6% (q5_1) of one quantization step. K-quants (``q4_k_m``, ...) are not written.

Checked before tuning (``check_model`` / ``check_layer`` / ``check_scale_dtype``): the model type
(``llama``, ``mistral`` -> arch ``llama``; ``qwen2`` -> arch ``qwen2``), its rope type
(default/linear/yarn; llama3 for llama only), that every parameter has a llama.cpp tensor name,
the tokenizer (byte-level BPE or SentencePiece, ids within the embedding), the ``gguf`` package,
and every quantized layer's bits / group size / sym / ``in_features % 32``. A layer kept in full
precision (``fp_layers``, ``layer_config bits=16``) is written as F16.

Output folder: ``<name>-<TYPE>.gguf`` (``<name>`` = last part of ``config.name_or_path``, else
``model``; e.g. ``model-Q4_0.gguf``), ``quantization_config.json`` (the run's config plus
``gguf_type`` / ``gguf_file``), ``config.json`` (the source config) and the tokenizer files
(saved by the caller).

Tensors written (GGUF shapes are listed ``[rows, row length]`` as numpy sees them; on disk ggml
reverses them, ``ne0`` = row length). ``L`` = block, ``d`` = hidden, ``f`` = intermediate, ``h`` =
head_dim, ``H``/``K`` = query/KV heads, ``V`` = ``config.vocab_size``:

=============================  ===============  ==========  =================================
tensor                          shape            type        from
=============================  ===============  ==========  =================================
token_embd.weight               [V, d]           F16         embed_tokens (never quantized)
blk.L.attn_norm.weight          [d]              F32         input_layernorm
blk.L.attn_q.weight             [H*h, d]         <TYPE>      q_proj, rows rope-permuted (llama)
blk.L.attn_k.weight             [K*h, d]         <TYPE>      k_proj, rows rope-permuted (llama)
blk.L.attn_v.weight             [K*h, d]         <TYPE>      v_proj
blk.L.attn_{q,k,v}.bias         [H*h] / [K*h]    F32         q/k/v biases (qwen2; permuted too)
blk.L.attn_output.weight        [d, H*h]         <TYPE>      o_proj
blk.L.ffn_norm.weight           [d]              F32         post_attention_layernorm
blk.L.ffn_{gate,up}.weight      [f, d]           <TYPE>      gate_proj / up_proj
blk.L.ffn_down.weight           [d, f]           <TYPE>      down_proj
output_norm.weight              [d]              F32         model.norm
output.weight                   [V, d]           F16/<TYPE>  lm_head; absent when tied (llama.cpp
                                                             then reuses token_embd)
rope_freqs.weight               [h/2]            F32         llama3 rope scaling only
=============================  ===============  ==========  =================================

A quantized layer's ``<TYPE>`` tensor holds ``in/32`` blocks per row; a layer kept FP is F16, and a
matrix beyond fp16's range is F32 (announced). The q/k row permutation is convert_hf_to_gguf's
``LlamaModel.permute`` (per head, HF's half-split rope rows -> consecutive pairs), applied to whole
rows of codes, scales and zeros, so each row's groups stay intact; qwen2 (NEOX rope) is unpermuted.

Metadata: ``general.architecture/name/file_type/quantization_version``; ``{arch}.context_length,
embedding_length, block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
attention.layer_norm_rms_epsilon, attention.key_length/value_length, rope.dimension_count,
rope.freq_base, vocab_size`` (+ ``rope.scaling.*`` for linear/yarn); the tokenizer
(``tokenizer.ggml.model/pre/tokens/token_type/merges/scores``, bos/eos/unk/pad ids,
``add_bos_token``/``add_eos_token``, ``add_space_prefix`` for SentencePiece,
``tokenizer.chat_template``; see :mod:`.vocab`, including the ``tokenizer.ggml.pre`` fallback for
unrecognised byte-level pre-tokenizers); and ``auto_round.quantization_config`` (JSON string).

Limitations: text causal LMs of the families above only (VLMs would need a separate ``mmproj``
file); one block type per file (mixed bits are refused; keep odd layers FP instead); Mistral's
sliding window is not represented (as in llama.cpp's own converter; a warning says so).
"""

from auto_round.export.gguf.blocks import BLOCK_TYPES
from auto_round.export.gguf.exporter import GGUFExporter, gguf_file_name
from auto_round.export.registry import register_format

for _bt in BLOCK_TYPES.values():
    register_format(f"gguf:{_bt.name}", GGUFExporter(_bt))

__all__ = ["GGUFExporter", "gguf_file_name", "BLOCK_TYPES"]
