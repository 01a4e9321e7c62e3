"""The llm_compressor format (compressed-tensors pack-quantized): the integers on disk are exactly our codes and
zeros and the scales exactly ours, read back with compressed-tensors' own unpack function; the folder loads
through transformers' compressed-tensors quantizer; unsupported schemes are refused before tuning.

Reload paths (transformers 5.23 + compressed-tensors 0.20.1, CPU): the default one (weights stay packed,
decompressed on the first forward) loads sym checkpoints; for asym ones it fails in compressed-tensors, whose
load-time compress leaves the zero point unpacked ([out, G]) while its compressor writes it packed, as vLLM
reads it. ``CompressedTensorsConfig(dequantize=True)`` (decompress while loading) loads both.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.core_model_loading import revert_weight_conversion

from auto_round import AutoRound, AutoRoundMLLM
from auto_round.export import get_format
from auto_round.export.llm_compressor_format import scale_for_disk
from auto_round.quant.pack import pack_bits
from tiny_models import tiny_llama
from tiny_vlms import FAMILIES, make_image
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


def _ids(tok):
    return tok("the quick brown fox jumps", return_tensors="pt").input_ids


def _export(tmp_path, model=None, **kw):
    ar = AutoRound(model if model is not None else tiny_llama(), make_tokenizer(), **{**FAST, **kw})
    out = ar.quantize_and_save(tmp_path / "q", format="llm_compressor", inplace=False)[0]
    return ar, out, json.loads((out / "config.json").read_text())["quantization_config"]


def _check_tensors_are_ours(out, ar):
    """Unpacked with compressed-tensors' unpack_from_int32 (signed ints), shifted back by 2^(b-1)."""
    from compressed_tensors.compressors import unpack_from_int32

    on_disk = load_file(str(out / "model.safetensors"))
    for layer, qw in ar.quantized_layers.items():
        # save_pretrained writes a layer under its checkpoint name (llava: language_model.model.*), as it does
        # for every tensor; the config names the in-memory modules, which both loaders match against.
        name = next(iter(revert_weight_conversion(ar.model, {f"{layer}.weight": torch.empty(0)}))).rsplit(".", 1)[0]
        state = {k: v for k, v in on_disk.items() if k.rsplit(".", 1)[0] == name}
        b, h, shape = qw.bits, 1 << (qw.bits - 1), (qw.out_features, qw.in_features)
        assert f"{name}.weight" not in state, name
        assert state[f"{name}.weight_shape"].dtype == torch.int64 and state[f"{name}.weight_shape"].tolist() == list(shape)
        packed = state[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (qw.out_features, qw.in_features * b // 32)
        assert torch.equal(unpack_from_int32(packed, b, torch.Size(shape)).to(torch.int16) + h, qw.codes.to(torch.int16))
        assert torch.equal(packed, pack_bits(qw.codes.to(torch.int32), b, dim=1))  # = our own bitstream packing
        scale = state[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == qw.scale.shape  # the fp32 model's dtype, exact
        assert torch.equal(scale.to(qw.scale.dtype), qw.scale) and torch.equal(scale, qw.scale.float())
        if qw.sym:
            assert f"{name}.weight_zero_point" not in state
        else:
            zp = state[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (qw.out_features * b // 32, qw.zero.shape[1])
            got = unpack_from_int32(zp, b, torch.Size(qw.zero.shape), packed_dim=0).to(torch.int32) + h
            assert torch.equal(got, qw.zero), name


def _reload(out, dequantize, auto=None):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return (auto or AutoModelForCausalLM).from_pretrained(out, dtype=torch.float32, **kw)


def _reload_matches(out, ar, tok, paths):
    with torch.no_grad():
        ref = ar.model(_ids(tok)).logits
        for dequantize in paths:
            model = _reload(out, dequantize)
            assert torch.allclose(model(_ids(tok)).logits, ref, atol=1e-3, rtol=1e-3), dequantize
    for name, qw in ar.quantized_layers.items():  # the decompressed weights are ours, bit for bit
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize(torch.float32)), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("bits,sym,iters", [(4, True, 2), (4, False, 2), (8, True, 0), (8, False, 0), (2, False, 0)])
def test_export_is_our_integers_and_reloads(tmp_path, bits, sym, iters):
    ar, out, cfg = _export(tmp_path, bits=bits, sym=sym, iters=iters)
    assert {k: cfg[k] for k in ("quant_method", "format", "quantization_status", "ignore")} == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"]}
    assert list(cfg["config_groups"]) == ["group_0"] and cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert {k: weights[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 32}
    assert cfg["config_groups"]["group_0"]["input_activations"] is None
    assert len(ar.quantized_layers) == 14
    if sym:  # sym "full range" scales are negative where the larger extreme is negative; they must survive
        assert any((qw.scale < 0).any() for qw in ar.quantized_layers.values())
    _check_tensors_are_ours(out, ar)
    _reload_matches(out, ar, make_tokenizer(), [False, True] if sym else [True])
    assert json.loads((out / "quantization_config.json").read_text())["format"] == "llm_compressor"


def test_per_layer_schemes_get_one_group_each_by_exact_name(tmp_path):
    ar, out, cfg = _export(tmp_path, iters=0, group_size=-1, layer_config={"down_proj": {"bits": 8}})
    groups = sorted(cfg["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups] == [
        (4, "channel", None), (8, "channel", None)]
    down = sorted(n for n in ar.quantized_layers if n.endswith("down_proj"))
    assert groups[1]["targets"] == down and len(groups[0]["targets"]) == 12 and cfg["ignore"] == ["lm_head"]
    assert all(qw.scale.shape[1] == 1 for qw in ar.quantized_layers.values())
    _check_tensors_are_ours(out, ar)
    # Only the default path: transformers 5.23's dequantize=True decompresses every dense layer with the first
    # config group's scheme.
    _reload_matches(out, ar, make_tokenizer(), [False])


@pytest.mark.parametrize("kw,match", [({"bits": 3}, r"not bits=3 \(compressed-tensors releases pack 3 bits differently"),
                                      ({"bits": 5}, r"stores bits \(2, 4, 8\), not bits=5"),
                                      ({"layer_config": {"q_proj": {"bits": 6}}}, r"q_proj.*not bits=6.*fp_layers='model.layers.0.self_attn.q_proj'")])
def test_refused_before_tuning(kw, match):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, **kw})
    with pytest.raises(ValueError, match=match):
        ar.quantize(format="llm_compressor")
    assert not ar.quantized_layers


def test_check_layer_names_the_layer_and_the_fix():
    # (AutoRound's plan already halves a group size that does not divide a layer, or keeps the layer FP.)
    why = get_format("llm_compressor").check_layer("model.layers.0.mlp.down_proj", 64, 96, 4, 64, True)
    assert "group_size=64 does not divide in_features=96" in why and "fp_layers='model.layers.0.mlp.down_proj'" in why
    assert get_format("llm_compressor").check_layer("x", 64, 96, 2, 32, False) is None


def test_scale_dtype_on_disk():
    """The model's dtype (what compressed-tensors and vLLM allocate) when it holds our scales exactly."""
    exact = torch.tensor([[0.5], [-0.25]], dtype=torch.float16)
    assert scale_for_disk(exact, torch.float32).dtype == torch.float32  # fp16 -> fp32 is always exact
    assert scale_for_disk(exact, torch.bfloat16).dtype == torch.bfloat16  # bf16 holds these two
    fine = torch.tensor([[0.1], [-0.3]], dtype=torch.float16)
    kept = scale_for_disk(fine, torch.bfloat16)  # bf16 would round them: they stay ours, in fp16
    assert kept.dtype == torch.float16 and torch.equal(kept, fine)


def test_vlm_lists_its_vision_tower_in_ignore_and_reloads(tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm = FAMILIES["llava"]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **{**FAST, "iters": 0})
    out = ar.quantize_and_save(tmp_path / "q", format="llm_compressor", inplace=False)[0]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    linears = [n for n, m in vlm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    vision = [n for n in linears if "vision_tower" in n]
    assert vision and set(vision) <= set(cfg["ignore"])
    assert sorted(cfg["ignore"]) == sorted(n for n in linears if n not in ar.quantized_layers)
    # vLLM names the vision tower its own way (vision_tower.vision_model.encoder...), so the ignore entries
    # (transformers' names) miss it and a "Linear" target quantized it: the groups name the quantized layers.
    targets = [t for g in cfg["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(ar.quantized_layers)
    _check_tensors_are_ours(out, ar)
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        ref = ar.model(**inputs).logits
        got = _reload(out, dequantize=False, auto=AutoModelForImageTextToText)(**inputs).logits
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3)
