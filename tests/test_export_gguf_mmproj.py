"""GGUF export of vision-language models: the text ``.gguf`` plus the ``mmproj-*-F16.gguf``.

The expected mmproj tensors are written out here from llama.cpp's conventions (convert_hf_to_gguf
``MmprojModel`` / ``Qwen2VLVisionModel``, the legacy LLaVA converter, clip.cpp), independently of
the exporter's table: names, numpy shapes, types and values (F16 = the weight rounded to fp16,
F32 = the value itself). Tiny random VLMs from ``tests/tiny_vlms.py``, RTN (iters=0).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from auto_round.export import get_format  # noqa: E402
from auto_round.export.gguf.mmproj import VISION_ARCHS, plan_mmproj, write_mmproj  # noqa: E402
from auto_round.mllm.autoround_mllm import AutoRoundMLLM  # noqa: E402
from auto_round.quant.qdq import QuantParams, quantize_weight  # noqa: E402
from auto_round.quant.types import QuantizedWeight  # noqa: E402
from tiny_vlms import FAMILIES, make_image  # noqa: E402
from tiny_vlms_gguf import GGUF_FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(bits=4, sym=True, group_size=32, iters=0, nsamples=2, seqlen=32, dataset="auto_round:offline_corpus")
F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (AutoRoundMLLM, folder), each quantized (RTN) and exported as gguf:q4_0 once."""
    cache = {}

    def get(family: str):
        """``family``: a seed-zoo name, or ``gguf:<name>`` for a tests/tiny_vlms_gguf.py variant."""
        if family not in cache:
            vlm = GGUF_FAMILIES[family[5:]]() if family.startswith("gguf:") else FAMILIES[family]()
            ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN)
            folder = tmp_path_factory.mktemp(family.replace(":", "_"))
            ar.quantize_and_save(folder, format="gguf:q4_0", inplace=False, overwrite=True)
            cache[family] = (ar, vlm, folder)
        return cache[family]

    return get


def _files(folder: Path):
    text = [p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj-")]
    mm = list(folder.glob("mmproj-*.gguf"))
    assert len(text) == 1 and len(mm) == 1, sorted(folder.iterdir())
    return gguf.GGUFReader(text[0]), gguf.GGUFReader(mm[0]), text[0], mm[0]


def _field(reader, key):
    return reader.fields[key].contents()


def _check_tensors(reader, expected):
    """``expected``: {name: (tensor [numpy shape], type)}; exactly these tensors, these values."""
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(expected)
    for name, (value, qtype) in expected.items():
        t = got[name]
        assert t.tensor_type == qtype, name
        data = np.array(t.data)
        assert data.shape == tuple(value.shape), (name, data.shape, tuple(value.shape))
        want = value.detach().float().half().float() if qtype == F16 else value.detach().float()
        assert torch.equal(torch.from_numpy(data.astype(np.float32)), want), name


def _clip_block(p, i):
    """convert_image_encoder_to_gguf's CLIP block names (fc1 -> ffn_up, fc2 -> ffn_down: HF's order)."""
    pre = f"model.vision_tower.encoder.layers.{i}."
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "ln1": "layer_norm1",
             "ln2": "layer_norm2"}
    out = {}
    for g, hf in parts.items():
        w, b = p[pre + hf + ".weight"], p[pre + hf + ".bias"]
        out[f"v.blk.{i}.{g}.weight"] = (w, F32 if w.dim() == 1 else F16)
        out[f"v.blk.{i}.{g}.bias"] = (b, F32)
    return out


def test_llava_mmproj_tensors_and_metadata(exports):
    ar, vlm, folder = exports("llava")
    text, mm, text_path, mm_path = _files(folder)
    assert (text_path.name, mm_path.name) == ("model-Q4_0.gguf", "mmproj-model-F16.gguf")
    p = dict(ar.model.named_parameters())
    v = "model.vision_tower."
    expected = {
        "v.class_embd": (p[v + "embeddings.class_embedding"], F32),
        "v.patch_embd.weight": (p[v + "embeddings.patch_embedding.weight"], F16),
        "v.position_embd.weight": (p[v + "embeddings.position_embedding.weight"], F32),
        "v.pre_ln.weight": (p[v + "pre_layrnorm.weight"], F32), "v.pre_ln.bias": (p[v + "pre_layrnorm.bias"], F32),
        # legacy llava names clip.cpp's 'mlp' projector reads: linear_1 -> mm.0, linear_2 -> mm.2
        "mm.0.weight": (p["model.multi_modal_projector.linear_1.weight"], F16),
        "mm.0.bias": (p["model.multi_modal_projector.linear_1.bias"], F32),
        "mm.2.weight": (p["model.multi_modal_projector.linear_2.weight"], F16),
        "mm.2.bias": (p["model.multi_modal_projector.linear_2.bias"], F32),
        # vision_feature_layer=-2 of 2 blocks: only block 0 runs; no post_ln (features precede it)
        **_clip_block(p, 0),
    }
    _check_tensors(mm, expected)
    vc = ar.model.config.vision_config
    ip = vlm.processor.image_processor
    meta = {
        "general.architecture": "clip", "general.type": "mmproj", "general.file_type": 1,
        "clip.projector_type": "mlp", "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "clip.use_gelu": False, "clip.vision.image_size": 28, "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": vc.hidden_size, "clip.vision.feed_forward_length": vc.intermediate_size,
        "clip.vision.block_count": 1, "clip.vision.attention.head_count": vc.num_attention_heads,
        "clip.vision.projection_dim": 64, "clip.vision.feature_layer": [1],
    }
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert _field(mm, "clip.vision.image_mean") == pytest.approx(list(ip.image_mean))
    assert _field(mm, "clip.vision.image_std") == pytest.approx(list(ip.image_std))
    assert _field(mm, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(vc.layer_norm_eps)
    # The text file: the language model only, as a llama file, with the VLM's image token in its vocab.
    assert _field(text, "general.architecture") == "llama"
    names = {t.name for t in text.tensors}
    assert len(names) == 2 + 2 * 9 + 1 and not any(n.startswith(("v.", "mm.")) for n in names)
    tokens, types = _field(text, "tokenizer.ggml.tokens"), _field(text, "tokenizer.ggml.token_type")
    image_id = ar.model.config.image_token_index
    assert tokens[image_id] == "<image>" and types[image_id] == 3  # CONTROL
    for layer, qw in ar.quantized_layers.items():
        assert layer.startswith("model.language_model.layers.")
    config = json.loads((folder / "quantization_config.json").read_text())
    assert config["gguf_mmproj_file"] == "mmproj-model-F16.gguf"
    assert config["gguf_mmproj_vision_layers_dequantized"] == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_mmproj_tensors_and_metadata(exports, family):
    ar, vlm, folder = exports(family if family == "qwen2_vl" else "gguf:" + family)  # 2.5: the 112-pixel window
    text, mm, _, _ = _files(folder)
    p = dict(ar.model.named_parameters())
    vc = ar.model.config.vision_config
    conv = p["model.visual.patch_embed.proj.weight"]  # [out, 3, 2, 14, 14]: one Conv2d per frame
    expected = {"v.patch_embd.weight": (conv[:, :, 0], F16), "v.patch_embd.weight.1": (conv[:, :, 1], F16),
                "mm.0.weight": (p["model.visual.merger.mlp.0.weight"], F16),
                "mm.0.bias": (p["model.visual.merger.mlp.0.bias"], F32),
                "mm.2.weight": (p["model.visual.merger.mlp.2.weight"], F16),
                "mm.2.bias": (p["model.visual.merger.mlp.2.bias"], F32),
                "v.post_ln.weight": (p["model.visual.merger.ln_q.weight"], F32)}
    if family == "qwen2_vl":
        expected["v.post_ln.bias"] = (p["model.visual.merger.ln_q.bias"], F32)
    mlp = {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"} if family == "qwen2_vl" else \
        {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(vc.depth):
        pre = f"model.visual.blocks.{i}."
        h = vc.embed_dim if family == "qwen2_vl" else vc.hidden_size
        for kind in ("weight", "bias"):
            qkv = p[pre + "attn.qkv." + kind]  # rows q, k, v
            for j, k in enumerate("qkv"):
                expected[f"v.blk.{i}.attn_{k}.{kind}"] = (qkv[j * h:(j + 1) * h], F16 if kind == "weight" else F32)
            expected[f"v.blk.{i}.attn_out.{kind}"] = (p[pre + "attn.proj." + kind], F16 if kind == "weight" else F32)
            for g, hf in mlp.items():
                expected[f"v.blk.{i}.{g}.{kind}"] = (p[pre + hf + "." + kind], F16 if kind == "weight" else F32)
        for n in ("norm1", "norm2"):
            for kind in ("weight", "bias") if family == "qwen2_vl" else ("weight",):
                expected[f"v.blk.{i}.ln{n[-1]}.{kind}"] = (p[pre + n + "." + kind], F32)
    _check_tensors(mm, expected)
    qwen25 = family == "qwen2_5_vl"
    meta = {"clip.projector_type": "qwen2.5vl_merger" if qwen25 else "qwen2vl_merger",
            "clip.vision.block_count": vc.depth, "clip.vision.patch_size": 14, "clip.vision.spatial_merge_size": 2,
            "clip.vision.attention.head_count": vc.num_heads, "clip.vision.projection_dim": 64,
            "clip.vision.embedding_length": h, "clip.vision.image_size": 560}
    if qwen25:
        meta.update({"clip.use_silu": True, "clip.vision.n_wa_pattern": 2})  # full attention in block 1
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert ("clip.use_silu" in mm.fields) == qwen25
    # text: llama.cpp's qwen2vl arch with M-RoPE sections (padded to 4)
    assert _field(text, "general.architecture") == "qwen2vl"
    assert _field(text, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]
    assert {t.name for t in text.tensors} >= {"blk.0.attn_q.bias", "token_embd.weight", "output.weight"}
    image_id = ar.model.config.image_token_id
    assert _field(text, "tokenizer.ggml.tokens")[image_id] == "<|image_pad|>"


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_mmproj_tensors_and_metadata(exports, family):
    ar, vlm, folder = exports(family)
    text, mm, _, _ = _files(folder)
    p = dict(ar.model.named_parameters())
    v = "model.vision_model."
    expected = {  # SmolVLMModel writes the embeddings F32
        "v.patch_embd.weight": (p[v + "embeddings.patch_embedding.weight"], F32),
        "v.patch_embd.bias": (p[v + "embeddings.patch_embedding.bias"], F32),
        "v.position_embd.weight": (p[v + "embeddings.position_embedding.weight"], F32),
        "v.post_ln.weight": (p[v + "post_layernorm.weight"], F32), "v.post_ln.bias": (p[v + "post_layernorm.bias"], F32),
        "mm.model.fc.weight": (p["model.connector.modality_projection.proj.weight"], F16),
    }
    pre = v + "encoder.layers.0."
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "ln1": "layer_norm1",
             "ln2": "layer_norm2"}
    for g, hf in parts.items():
        w = p[pre + hf + ".weight"]
        expected[f"v.blk.0.{g}.weight"] = (w, F32 if w.dim() == 1 else F16)
        expected[f"v.blk.0.{g}.bias"] = (p[pre + hf + ".bias"], F32)
    _check_tensors(mm, expected)
    meta = {"clip.projector_type": "idefics3", "clip.use_gelu": True, "clip.vision.projector.scale_factor": 2,
            "clip.vision.preproc_image_size": 128, "clip.vision.image_size": 64, "clip.vision.patch_size": 16,
            "clip.vision.block_count": 1, "clip.vision.projection_dim": 64}
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert _field(mm, "clip.vision.image_mean") == pytest.approx([0.5, 0.5, 0.5])
    assert _field(text, "general.architecture") == "llama"  # model.text_model.* + lm_head
    tokens = _field(text, "tokenizer.ggml.tokens")
    assert {"<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>"} <= set(tokens)


def test_tuned_vision_layers_are_written_dequantized(exports, tmp_path):
    """quant_nontext_module: a tuned vision layer goes into the mmproj as its dequantized weights (F16)."""
    ar, vlm, _ = exports("llava")
    name = "model.vision_tower.encoder.layers.0.mlp.fc1"
    w = ar.model.get_submodule(name).weight.detach()
    codes, scale, zero = quantize_weight(w, QuantParams(bits=4, group_size=32, scheme="sym", scale_dtype=torch.float16))
    qw = QuantizedWeight(codes, scale, zero, 4, 32, True, ar.model.get_submodule(name).bias.detach())
    arch = next(a for a in VISION_ARCHS if a.name == "llava")
    planned = {t.name: t for t in plan_mmproj(ar.model, {name: qw}, arch)}
    assert torch.equal(planned["v.blk.0.ffn_up.weight"].value(), qw.dequantize())
    path = tmp_path / "mmproj-x-F16.gguf"
    write_mmproj(path, ar.model, {name: qw}, vlm.processor.image_processor)
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "v.blk.0.ffn_up.weight")
    assert torch.equal(torch.from_numpy(np.array(t.data).astype(np.float32)), qw.dequantize().half().float())


@pytest.mark.parametrize("family", ["mllama", "qwen3_vl"])
def test_unsupported_vlms_refused_before_tuning(family):
    vlm = FAMILIES[family]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN)
    supported = (r"\['gemma3', 'idefics3', 'llava', 'llava_next', 'mistral3', 'qwen2_5_vl', 'qwen2_vl', "
                 r"'smolvlm'\]")
    with pytest.raises(ValueError, match=rf"'{family}'.*VLMs supported: {supported}"):
        ar.quantize(format="gguf:q4_0")
    assert ar.quantized_layers == {}


# The seed zoo's shapes of the newer families are ones llama.cpp cannot run (tests/tiny_vlms_gguf.py).
@pytest.mark.parametrize("family, needles", [
    ("gemma3", ["layer_types=['sliding_attention', 'full_attention']", "every 6th layer", "format='auto_round'"]),
    ("mistral3", ["text rms_norm_eps=1e-06", "vision eps 1e-05", "format='auto_round'"]),
    ("llava_next", ["language model ('granite')", "['llama', 'mistral', 'qwen2']"]),
    ("qwen2_5_vl", ["window_size=28", "windows by 112 pixels", "format='auto_round'"]),
])
def test_seed_shapes_llama_cpp_cannot_run_are_refused_before_tuning(family, needles):
    vlm = FAMILIES[family]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN)
    with pytest.raises(ValueError) as err:
        ar.quantize(format="gguf:q4_0")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert ar.quantized_layers == {}


def test_qwen_configs_llama_cpp_cannot_run_are_refused():
    """llama.cpp's qwen2vl graphs merge 2x2 patches, and the 2.5 one windows by 112 pixels with a vision rope base
    of 10000, none of them read from the file: other values are refused, not written into a file that runs wrong."""
    fmt = get_format("gguf:q4_0")
    vlm = FAMILIES["qwen2_vl"]()
    vlm.model.config.vision_config.spatial_merge_size = 3
    assert "spatial_merge_size=3" in fmt.check_model(vlm.model, vlm.processor)
    vlm = GGUF_FAMILIES["qwen2_5_vl"]()
    assert fmt.check_model(vlm.model, vlm.processor) is None  # the 112-pixel window: runs (tested with llama.cpp)
    vc = vlm.model.config.vision_config
    vc.rope_parameters = {**vc.rope_parameters, "rope_theta": 20000.0}
    assert "rope_theta=20000" in fmt.check_model(vlm.model, vlm.processor)
    vc.rope_parameters, vc.window_size = {**vc.rope_parameters, "rope_theta": 10000.0}, 224
    assert "window_size=224" in fmt.check_model(vlm.model, vlm.processor)


def test_llava_configs_llama_cpp_cannot_run_are_refused():
    vlm = FAMILIES["llava"]()
    vlm.model.config.vision_feature_select_strategy = "full"
    why = get_format("gguf:q4_0").check_model(vlm.model, vlm.processor)
    assert "'full'" in why and "drops the CLS" in why
    # a VLM given with its tokenizer only: the mmproj needs the image processor's mean / std
    why = get_format("gguf:q4_k_m").check_model(FAMILIES["llava"]().model, vlm.tokenizer)
    assert "image_mean" in why and "processor" in why


def _siglip_block(p, pre, i):
    """A SigLIP / CLIP encoder block's tensors (fc1 -> ffn_up, fc2 -> ffn_down)."""
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "ln1": "layer_norm1",
             "ln2": "layer_norm2"}
    out = {}
    for g, hf in parts.items():
        w, b = p[f"{pre}encoder.layers.{i}.{hf}.weight"], p[f"{pre}encoder.layers.{i}.{hf}.bias"]
        out[f"v.blk.{i}.{g}.weight"] = (w, F32 if w.dim() == 1 else F16)
        out[f"v.blk.{i}.{g}.bias"] = (b, F32)
    return out


def test_gemma3_mmproj_and_text_file(exports):
    """Gemma3VisionModel's file: F32 embeddings, soft_emb_norm + 1, the [vision, text] projection as
    stored, the pooling factor; the text file is llama.cpp's gemma3 arch with every norm + 1."""
    ar, vlm, folder = exports("gguf:gemma3")
    text, mm, _, _ = _files(folder)
    p = dict(ar.model.named_parameters())
    v, proj = "model.vision_tower.", "model.multi_modal_projector."
    expected = {
        "v.patch_embd.weight": (p[v + "embeddings.patch_embedding.weight"], F32),
        "v.patch_embd.bias": (p[v + "embeddings.patch_embedding.bias"], F32),
        "v.position_embd.weight": (p[v + "embeddings.position_embedding.weight"], F32),
        "v.post_ln.weight": (p[v + "post_layernorm.weight"], F32),
        "v.post_ln.bias": (p[v + "post_layernorm.bias"], F32),
        "mm.input_projection.weight": (p[proj + "mm_input_projection_weight"], F16),  # [32 vision, 64 text]
        "mm.soft_emb_norm.weight": (p[proj + "mm_soft_emb_norm.weight"] + 1, F32),
        **_siglip_block(p, v, 0),
    }
    _check_tensors(mm, expected)
    assert next(t for t in mm.tensors if t.name == "mm.input_projection.weight").data.shape == (32, 64)
    meta = {"clip.projector_type": "gemma3", "clip.use_gelu": True, "clip.vision.projector.scale_factor": 2,
            "clip.vision.image_size": 56, "clip.vision.patch_size": 14, "clip.vision.block_count": 1,
            "clip.vision.embedding_length": 32, "clip.vision.projection_dim": 64}
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert _field(mm, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    # text: gemma3 arch, tied output, Gemma's norms written as 1 + weight
    assert _field(text, "general.architecture") == "gemma3"
    assert _field(text, "gemma3.attention.sliding_window") == 16
    assert _field(text, "gemma3.rope.freq_base") == pytest.approx(1e6)  # the full-attention layers' rope
    assert _field(text, "gemma3.attention.key_length") == 16
    got = {t.name: t for t in text.tensors}
    assert "output.weight" not in got and len(got) == 2 + 6 * 13
    lm = "model.language_model."
    for gname, hf in (("blk.0.attn_norm", "layers.0.input_layernorm"), ("blk.0.post_attention_norm",
                      "layers.0.post_attention_layernorm"), ("blk.0.ffn_norm", "layers.0.pre_feedforward_layernorm"),
                      ("blk.5.post_ffw_norm", "layers.5.post_feedforward_layernorm"),
                      ("blk.0.attn_q_norm", "layers.0.self_attn.q_norm"),
                      ("blk.3.attn_k_norm", "layers.3.self_attn.k_norm"),
                      ("output_norm", "norm")):
        t = got[gname + ".weight"]
        assert t.tensor_type == F32
        assert torch.equal(torch.from_numpy(np.array(t.data)), p[f"{lm}{hf}.weight"].detach().float() + 1), gname
    assert _field(text, "tokenizer.ggml.tokens")[ar.model.config.image_token_id] == "<image_soft_token>"


def test_gemma3_configs_llama_cpp_cannot_run_are_refused():
    fmt = get_format("gguf:q4_0")
    vlm = GGUF_FAMILIES["gemma3"]()
    assert fmt.check_model(vlm.model, vlm.processor) is None
    vlm.model.config.text_config.query_pre_attn_scalar = 32
    why = fmt.check_model(vlm.model, vlm.processor)
    assert "query_pre_attn_scalar=32" in why and "1/sqrt(16)" in why
    vlm = GGUF_FAMILIES["gemma3"]()
    vlm.model.config.mm_tokens_per_image = 2
    why = fmt.check_model(vlm.model, vlm.processor)
    assert "mm_tokens_per_image=2" in why and "square" in why


@pytest.mark.parametrize("family", ["llava_next", "llava_next_siglip"])
def test_llava_next_mmproj_tensors_and_metadata(exports, family):
    ar, vlm, folder = exports(f"gguf:{family}")
    text, mm, _, _ = _files(folder)
    p = dict(ar.model.named_parameters())
    v = "model.vision_tower."
    clip = family == "llava_next"
    expected = {
        "v.patch_embd.weight": (p[v + "embeddings.patch_embedding.weight"], F16),
        "v.position_embd.weight": (p[v + "embeddings.position_embedding.weight"], F32),
        "v.image_newline": (p["model.image_newline"], F32),
        "mm.0.weight": (p["model.multi_modal_projector.linear_1.weight"], F16),
        "mm.0.bias": (p["model.multi_modal_projector.linear_1.bias"], F32),
        "mm.2.weight": (p["model.multi_modal_projector.linear_2.weight"], F16),
        "mm.2.bias": (p["model.multi_modal_projector.linear_2.bias"], F32),
        **_siglip_block(p, v, 0),
    }
    if clip:  # CLS + pre_layrnorm; feature layer -2 of 2: block 0 only
        expected.update({"v.class_embd": (p[v + "embeddings.class_embedding"], F32),
                         "v.pre_ln.weight": (p[v + "pre_layrnorm.weight"], F32),
                         "v.pre_ln.bias": (p[v + "pre_layrnorm.bias"], F32)})
    else:  # SigLIP: patch bias; feature layers [-2, -1]: both blocks; never post_layernorm
        expected["v.patch_embd.bias"] = (p[v + "embeddings.patch_embedding.bias"], F32)
        expected.update(_siglip_block(p, v, 1))
    _check_tensors(mm, expected)
    meta = {"clip.projector_type": "mlp", "clip.has_llava_projector": True, "clip.use_gelu": not clip,
            "clip.vision.image_grid_pinpoints": [28, 56, 56, 28, 56, 56],
            "clip.vision.mm_patch_merge_type": "spatial_unpad", "clip.vision.feature_layer": [1] if clip else [1, 2],
            "clip.vision.block_count": 1 if clip else 2, "clip.vision.image_size": 28, "clip.vision.projection_dim": 64}
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert _field(text, "general.architecture") == "llama"
    assert not any(t.name.startswith(("v.", "mm.")) or "newline" in t.name for t in text.tensors)


def test_llava_next_configs_llama_cpp_cannot_run_are_refused():
    fmt = get_format("gguf:q4_0")
    vlm = GGUF_FAMILIES["llava_next_siglip"]()
    vlm.model.config.vision_feature_select_strategy = "default"  # would drop SigLIP's first patch
    why = fmt.check_model(vlm.model, vlm.processor)
    assert "vision_feature_select_strategy='default'" in why and "'full'" in why and "format='auto_round'" in why


def _permuted(w, n_head):
    """convert's LlamaModel.permute: per head, rows (2, hd/2) -> (hd/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_mistral3_mmproj_tensors_and_metadata(exports):
    """LlavaVisionModel's pixtral file: q/k rows permuted per head, the patch merger, mm.1 / mm.2, and
    the [IMG_BREAK] embedding taken from the language model's embed_tokens."""
    ar, vlm, folder = exports("gguf:mistral3")
    text, mm, _, _ = _files(folder)
    p = dict(ar.model.named_parameters())
    v, proj = "model.vision_tower.", "model.multi_modal_projector."
    brk = vlm.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
    expected = {
        "v.patch_embd.weight": (p[v + "patch_conv.weight"], F16), "v.pre_ln.weight": (p[v + "ln_pre.weight"], F32),
        "mm.input_norm.weight": (p[proj + "norm.weight"], F32),
        "mm.patch_merger.weight": (p[proj + "patch_merger.merging_layer.weight"], F16),
        "mm.1.weight": (p[proj + "linear_1.weight"], F16), "mm.2.weight": (p[proj + "linear_2.weight"], F16),
        "v.token_embd.img_break": (p["model.language_model.embed_tokens.weight"][brk], F32),
    }
    for i in range(2):
        pre = f"{v}transformer.layers.{i}."
        expected.update({
            f"v.blk.{i}.attn_q.weight": (_permuted(p[pre + "attention.q_proj.weight"], 2), F16),
            f"v.blk.{i}.attn_k.weight": (_permuted(p[pre + "attention.k_proj.weight"], 2), F16),
            f"v.blk.{i}.attn_v.weight": (p[pre + "attention.v_proj.weight"], F16),
            f"v.blk.{i}.attn_out.weight": (p[pre + "attention.o_proj.weight"], F16),
            f"v.blk.{i}.ffn_gate.weight": (p[pre + "feed_forward.gate_proj.weight"], F16),
            f"v.blk.{i}.ffn_up.weight": (p[pre + "feed_forward.up_proj.weight"], F16),
            f"v.blk.{i}.ffn_down.weight": (p[pre + "feed_forward.down_proj.weight"], F16),
            f"v.blk.{i}.ln1.weight": (p[pre + "attention_norm.weight"], F32),
            f"v.blk.{i}.ln2.weight": (p[pre + "ffn_norm.weight"], F32)})
    _check_tensors(mm, expected)
    meta = {"clip.projector_type": "pixtral", "clip.use_silu": True, "clip.vision.spatial_merge_size": 2,
            "clip.vision.block_count": 2, "clip.vision.image_size": 112, "clip.vision.patch_size": 14,
            "clip.vision.attention.head_count": 2, "clip.vision.projection_dim": 64}
    for key, value in meta.items():
        assert _field(mm, key) == value, key
    assert "clip.use_gelu" not in mm.fields
    assert _field(mm, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert _field(text, "general.architecture") == "llama"  # Mistral's text model, lm_head untied
    assert {"output.weight", "token_embd.weight"} <= {t.name for t in text.tensors}


def test_mistral3_feature_layer_and_refusals(tmp_path):
    fmt = get_format("gguf:q4_0")
    vlm = GGUF_FAMILIES["mistral3"]()
    vlm.model.config.vision_feature_layer = -2  # the output of block 0: the file holds that block only
    path = tmp_path / "mmproj-x-F16.gguf"
    write_mmproj(path, vlm.model, {}, vlm.processor.image_processor, tokenizer=vlm.tokenizer)
    mm = gguf.GGUFReader(path)
    assert _field(mm, "clip.vision.block_count") == 1 and not any(t.name.startswith("v.blk.1.") for t in mm.tensors)
    vlm.model.config.vision_feature_layer = [-2, -1]
    assert "vision_feature_layer=[-2, -1]" in fmt.check_model(vlm.model, vlm.processor)
    vlm = GGUF_FAMILIES["mistral3"]()
    with pytest.raises(ValueError, match=r"\[IMG_BREAK\]'s embedding: give the processor"):
        write_mmproj(path, vlm.model, {}, vlm.processor.image_processor)  # no tokenizer


# ---------------------------------------------------------------------------------- llama.cpp (optional)
def _llamacpp_python():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gguf_mmproj import llamacpp_python

    return llamacpp_python()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_llama_cpp_mtmd_runs_the_pair(exports, family, tmp_path):
    """llama.cpp's mtmd loads the pair, encodes an image and generates. Qwen2-VL: image embeddings
    equal ours to fp16 noise and the greedy tokens are ours. LLaVA: llama.cpp's llava graph puts CLS
    last (ggml-org/llama.cpp#25814), so it is compared with our model run in that order. Idefics3:
    embeddings only (llama-cpp-python 0.3.36's mtmd helper aborts decoding the text after its image
    slices: GGML_ASSERT(idx >= 0) in mtmd-helper.cpp)."""
    python = _llamacpp_python()
    if python is None:
        pytest.skip("llama_cpp is not importable (build .venv-llamacpp: see bench/bench_gguf_mmproj.py)")
    from bench_gguf_mmproj import as_in_files, cls_last_features, compare_logits, our_image_features, run_llamacpp

    side = {"llava": 28, "qwen2_vl": 112, "idefics3": 64}[family]  # qwen2vl needs >= 8 image tokens
    if family == "idefics3":  # one 64-px tile (preproc_image_size 64): llama.cpp resizes nothing
        vlm = FAMILIES[family]()
        vlm.processor.image_processor.size = {"longest_edge": side}
        vlm.processor.image_processor.do_image_splitting = False
        ar, folder = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN), tmp_path / "export"
        ar.quantize_and_save(folder, format="gguf:q4_0", inplace=False)
    else:
        ar, vlm, folder = exports(family)
    _, _, text_path, mm_path = _files(folder)
    proc = vlm.processor
    if family == "qwen2_vl":
        proc.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}
    image = make_image((side, side))
    got = run_llamacpp(python, text_path, mm_path, image, "<|user|>\n<image>What is shown?<|assistant|>\n", tmp_path)
    assert "error" not in got, got.get("error")
    assert ("eval_error" in got) == (family == "idefics3"), got.get("eval_error")
    model = as_in_files(ar.model, ar.quantized_layers)
    inputs = proc.image_processor(images=[image], return_tensors="pt")
    scale = float(np.abs(our_image_features(model, inputs)).max())
    if family == "llava":
        ours = cls_last_features(model, inputs["pixel_values"])
        assert np.abs(got["embd"][0] - ours).max() < 1e-3 * scale
        return
    for embd in got["embd"]:  # idefics3: the 1x1 tile and the overview, both of the same pixels
        assert np.abs(embd - our_image_features(model, inputs)).max() < 2e-3 * scale
    if family == "idefics3":
        return
    cmp = compare_logits(model, proc, "<|user|>\n<image>What is shown?<|assistant|>\n",
                         "<|vision_start|><|image_pad|><|vision_end|>", image, got)
    assert cmp["prompt_ids_equal"] and cmp["top1_agree"], cmp
    assert cmp["max_logit_diff"] < 0.05 * cmp["logit_range"], cmp


@pytest.mark.parametrize("family", ["gemma3", "llava_next_siglip", "mistral3"])
def test_llama_cpp_mtmd_runs_the_new_families(family, tmp_path):
    """bench_gguf_mmproj's comparison for the tests/tiny_vlms_gguf.py variants: llama.cpp's image
    embeddings equal ours to fp16 noise (LLaVA-NeXT: per tile, in mtmd's order, tiles then overview);
    Gemma-3 and Mistral-3: the same next-token argmax on llama.cpp's own token ids."""
    python = _llamacpp_python()
    if python is None:
        pytest.skip("llama_cpp is not importable (build .venv-llamacpp: see bench/bench_gguf_mmproj.py)")
    from bench_gguf_mmproj import bench_one

    rec = bench_one(family, "q4_0", python, tmp_path)
    assert "error" not in rec and "shape_mismatch" not in rec, rec
    assert rec["max_diff_vs_ours_fp16"] < 2e-3 * rec["max_abs_ours"], rec
    if family != "llava_next_siglip":
        assert rec["top1_agree"] and rec["max_logit_diff"] < 0.05 * rec["logit_range"], rec


def test_llama_cpp_qwen2_5_vl_four_windows(tmp_path):
    """Qwen2.5-VL at its real 112-pixel window (the only one llama.cpp's graph runs; other windows are refused)
    on a 224x224 image, so block 0 attends within 4 windows of 4x4 merge units: llama.cpp's embeddings equal
    ours to fp16 noise, as Qwen2-VL's (before the refusal, the seed zoo's 28-pixel model gave 8.3e-4 of 0.098)."""
    python = _llamacpp_python()
    if python is None:
        pytest.skip("llama_cpp is not importable (build .venv-llamacpp: see bench/bench_gguf_mmproj.py)")
    from bench_gguf_mmproj import bench_one

    rec = bench_one("qwen2_5_vl", "q4_0", python, tmp_path)
    assert "error" not in rec and rec["window_size"] == 112 and rec["n_image_tokens"] == 64, rec
    assert rec["max_diff_vs_ours_fp16"] < 2e-3 * rec["max_abs_ours"], rec
    assert rec["prompt_ids_equal"] and rec["top1_agree"], rec
