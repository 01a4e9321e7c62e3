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
        if family not in cache:
            vlm = FAMILIES[family]()
            ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN)
            folder = tmp_path_factory.mktemp(family)
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
    ar, vlm, folder = exports(family)
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


@pytest.mark.parametrize("family", ["gemma3", "mistral3", "llava_next", "mllama", "qwen3_vl"])
def test_unsupported_vlms_refused_before_tuning(family):
    vlm = FAMILIES[family]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RUN)
    supported = r"\['idefics3', 'llava', 'qwen2_5_vl', 'qwen2_vl', 'smolvlm'\]"
    with pytest.raises(ValueError, match=rf"'{family}'.*VLMs supported: {supported}"):
        ar.quantize(format="gguf:q4_0")
    assert ar.quantized_layers == {}


def test_llava_configs_llama_cpp_cannot_run_are_refused():
    vlm = FAMILIES["llava"]()
    vlm.model.config.vision_feature_select_strategy = "full"
    why = get_format("gguf:q4_0").check_model(vlm.model, vlm.processor)
    assert "'full'" in why and "drops the CLS" in why
    # a VLM given with its tokenizer only: the mmproj needs the image processor's mean / std
    why = get_format("gguf:q4_k_m").check_model(FAMILIES["llava"]().model, vlm.tokenizer)
    assert "image_mean" in why and "processor" in why


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
