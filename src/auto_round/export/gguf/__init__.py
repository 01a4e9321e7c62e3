"""GGUF export for llama.cpp: ``gguf:q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0`` and the K-quant types.

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
/ 1.6% (q5_1) of one quantization step.

K-quant file types ``gguf:q2_k_s``, ``q3_k_m``, ``q4_k_s``, ``q4_k_m``, ``q5_k_s``, ``q5_k_m``,
``q6_k`` (:mod:`.kmix`, :mod:`.kblocks`, :mod:`auto_round.quant.kquant`): the format chooses every
layer's type in the plan, before tuning, by llama.cpp's own rules (e.g. ``q4_k_m``: Q4_K, with Q6_K
for attn_v and ffn_down of the blocks ``use_more_bits`` picks, and for ``output``); the bits /
group_size / sym settings are not used. A K-type layer is tuned on the K grid itself: its 6-bit
(Q4_K/Q5_K/Q3_K), 8-bit (Q6_K) or 4-bit (Q2_K) sub-block scales and mins are quantized against the
super-block's fp16 ``d``/``dmin`` inside the tuner's qdq, so the file holds the tuned codes,
sub-block scales, mins and ``d``/``dmin`` bit for bit (ggml's dequantization equals our weights
exactly). A row that is not whole super-blocks of 256 takes llama.cpp's fallback type (q2_k/q3_k
-> q4_0, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), is tuned as that type, and the plan lists it;
a row that is not even a multiple of 32 stays F16 (kept in full precision, with the reason). The
embeddings stay F16 (llama.cpp's quantizer would store ``token_embd`` at the base type). Other
formats of the same run must store these layers: ``fake`` does; integer-zero formats
(``auto_round``, ``auto_gptq``, ...) are refused before tuning.

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

Vision-language models (:mod:`.mmproj`; ``AutoRoundMLLM`` hands the exporter its processor): the
language model is written as above (``model.language_model.*`` + ``lm_head``, the VLM's tokenizer,
image token included, as the vocabulary; LLaVA's / LLaVA-NeXT's / Mistral-3's llama/mistral/qwen2 LM by
its text arch, Qwen2-VL / Qwen2.5-VL's as arch ``qwen2vl`` with ``rope.dimension_sections`` =
``mrope_section`` padded to 4, Gemma-3's as arch ``gemma3``: every ``*norm.weight`` written + 1 (convert's
Gemma3Model; Gemma3RMSNorm scales by 1 + weight), ``attention.sliding_window``, the full-attention layers'
rope as ``rope.freq_base``, ``final_logit_softcapping`` when set; llama.cpp hard-codes the sliding
pattern (every 6th layer full), the sliding layers' rope base 10000 and the attention scale, so
Gemma-3 configs with another ``layer_types``, sliding rope or ``query_pre_attn_scalar`` are refused),
plus ``mmproj-<name>-F16.gguf`` (``general.architecture clip``, ``general.type mmproj``) for
llama.cpp's mtmd. Supported: ``llava`` (CLIP tower, strategy ``default``, projector ``mlp``),
``qwen2_vl`` (``qwen2vl_merger``), ``qwen2_5_vl`` (``qwen2.5vl_merger``), ``idefics3`` / ``smolvlm``
(``idefics3``; Llama text model), ``gemma3`` (``gemma3``: SigLIP, avg-pool, soft_emb_norm, input
projection), ``llava_next`` (``mlp`` with AnyRes: a CLIP tower with strategy ``default`` or a SigLIP one
with ``full``, one or several feature layers) and ``mistral3`` (``pixtral``: Pixtral tower, patch merger,
``[IMG_BREAK]``). Any other VLM (mllama, qwen3_vl, ...) is refused before tuning, naming its model_type
and these. Keys: ``clip.projector_type``, ``clip.has_vision_encoder``,
``clip.vision.{image_size, patch_size, embedding_length, feed_forward_length, block_count,
attention.head_count, attention.layer_norm_epsilon, projection_dim (= text hidden), image_mean,
image_std}`` (mean / std from the processor's image processor); llava: ``clip.has_llava_projector``,
``clip.vision.feature_layer`` (``vision_feature_layer`` made non-negative: 0 = embeddings),
``clip.use_gelu`` (False: CLIP's quick_gelu); qwen: ``clip.vision.spatial_merge_size``, image_size
560 (the converter's default), 2.5: ``clip.use_silu``, ``clip.vision.n_wa_pattern``
(``fullatt_block_indexes[0] + 1``); idefics3: ``clip.use_gelu`` True,
``clip.vision.projector.scale_factor``, ``clip.vision.preproc_image_size`` (the processor's
``longest_edge``); gemma3: ``clip.use_gelu`` True, ``clip.vision.projector.scale_factor`` (the pool
kernel, patches per side / sqrt(``mm_tokens_per_image``), written only when not clip.cpp's default 4);
llava_next: llava's keys plus ``clip.vision.image_grid_pinpoints`` (flattened) and
``clip.vision.mm_patch_merge_type`` = ``spatial_unpad`` (``clip.use_gelu`` True for a SigLIP tower);
mistral3: ``clip.use_silu`` (or ``use_gelu``), ``clip.vision.spatial_merge_size``, layer-norm eps 1e-5
(Pixtral's; the text ``rms_norm_eps`` transformers uses in the patch merger must equal it),
``block_count`` = the blocks before ``vision_feature_layer`` (an int). ``L`` = vision block, ``e`` = vision hidden, ``m`` = its MLP
width, ``p`` = patch size, ``P`` = positions, ``d`` = text hidden, ``i`` = projector input:

===============================  ================  ====  ==========================================
mmproj tensor                    shape (numpy)     type  from
===============================  ================  ====  ==========================================
v.class_embd                     [e]               F32   llava: embeddings.class_embedding
v.patch_embd.weight              [e, 3, p, p]      F16   patch_embedding (qwen: Conv3d frame 0;
                                                         idefics3: F32, as are its bias and
                                                         position_embd)
v.patch_embd.bias                [e]               F32   idefics3: patch_embedding.bias
v.patch_embd.weight.1            [e, 3, p, p]      F16   qwen: Conv3d frame 1
v.position_embd.weight           [P, e]            F32   llava, idefics3: position_embedding
v.pre_ln.{weight,bias}           [e]               F32   llava: pre_layrnorm
v.blk.L.ln1 / ln2.{weight,bias}  [e]               F32   layer_norm1/2 (qwen: norm1/2; 2.5: no bias)
v.blk.L.attn_{q,k,v}.weight      [e, e]            F16   q/k/v_proj (qwen: attn.qkv split in 3)
v.blk.L.attn_{q,k,v}.bias        [e]               F32   their biases
v.blk.L.attn_out.{weight,bias}   [e, e] / [e]      F16/  out_proj (qwen: attn.proj)
                                                   F32
v.blk.L.ffn_up.{weight,bias}     [m, e] / [m]      F16/  mlp.fc1 (qwen2.5: mlp.up_proj)
                                                   F32
v.blk.L.ffn_gate.{weight,bias}   [m, e] / [m]      F16/  qwen2.5: mlp.gate_proj
                                                   F32
v.blk.L.ffn_down.{weight,bias}   [e, m] / [e]      F16/  mlp.fc2 (qwen2.5: mlp.down_proj)
                                                   F32
v.post_ln.{weight,bias}          [e]               F32   qwen: merger.ln_q (2.5: RMSNorm, no bias);
                                                         idefics3: post_layernorm
mm.0.{weight,bias}               [*, i] / [*]      F16/  llava: multi_modal_projector.linear_1;
                                                   F32   qwen: merger.mlp.0
mm.2.{weight,bias}               [d, *] / [d]      F16/  llava: linear_2; qwen: merger.mlp.2
                                                   F32
mm.model.fc.weight               [d, e*s*s]        F16   idefics3: connector.modality_projection.proj
                                                         (after pixel shuffle by s = scale_factor)
mm.input_projection.weight       [e, d]            F16   gemma3: mm_input_projection_weight as stored
mm.soft_emb_norm.weight          [e]               F32   gemma3: mm_soft_emb_norm + 1
v.image_newline                  [d]               F32   llava_next: image_newline (not used by mtmd)
v.blk.L.ffn_gate.weight          [m, e]            F16   mistral3: feed_forward.gate_proj (pixtral's
                                                         q/k rows permuted per head, like convert)
mm.input_norm.weight             [e]               F32   mistral3: multi_modal_projector.norm
mm.patch_merger.weight           [e, e*s*s]        F16   mistral3: patch_merger.merging_layer
mm.1 / mm.2.weight               [d, e] / [d, d]   F16   mistral3: linear_1 / linear_2 (+ biases F32)
v.token_embd.img_break           [d]               F32   mistral3: embed_tokens[[IMG_BREAK]]
===============================  ================  ====  ==========================================

LLaVA writes blocks ``0 .. max(feature_layer) - 1`` only and no ``post_ln`` (its features precede
post_layernorm), as llama.cpp's legacy converter does. A vision layer tuned with
``quant_nontext_module=True`` is written as its tuned weights dequantized to F16 (exact, at F16 size;
with a K-quant mix the plan keeps vision layers FP instead, noted there). Known llama.cpp defect:
its llava graph appends the CLS embedding after the patches (ggml-org/llama.cpp#25814), so
llama.cpp's LLaVA-1.5 image embeddings differ from transformers' for any correct file
(``bench/bench_gguf_mmproj.py`` measures it); Qwen2-VL, Idefics3, Gemma-3 and Mistral-3 agree to
fp16 noise. LLaVA-NeXT in mtmd: each AnyRes tile, then the overview, is encoded as its own image of
``(image_size/patch_size)^2`` tokens, without transformers' unpadding, ``image_newline`` rows and order
(overview first), so llama.cpp's image token sequence differs from transformers' for any correct file;
per tile the embeddings agree (SigLIP tower; a CLIP tower also has the CLS-last defect).

Limitations: text causal LMs and the VLMs above only; a legacy type is one block type per file (mixed bits are refused; keep odd layers FP instead; the K types mix by their rules); Mistral's
sliding window is not represented (as in llama.cpp's own converter; a warning says so).
"""

from auto_round.export.gguf.blocks import BLOCK_TYPES
from auto_round.export.gguf.exporter import GGUFExporter, GGUFKExporter, gguf_file_name
from auto_round.export.gguf.kmix import KMIXES
from auto_round.export.registry import register_format

for _bt in BLOCK_TYPES.values():
    register_format(f"gguf:{_bt.name}", GGUFExporter(_bt))
for _mix in KMIXES.values():
    register_format(f"gguf:{_mix.name}", GGUFKExporter(_mix))

__all__ = ["GGUFExporter", "GGUFKExporter", "gguf_file_name", "BLOCK_TYPES", "KMIXES"]
