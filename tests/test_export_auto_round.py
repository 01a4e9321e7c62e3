"""The auto_round format: tensors on disk, reload through transformers, capability checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoRoundConfig, LlamaConfig, LlamaForCausalLM

from auto_round.export.registry import Exporter, available_formats, get_format, register_format
from auto_round.inference import load_quantized
from auto_round.inference.convert_model import (
    LayerScheme,
    infer_target_device,
    quantized_layer_schemes,
)
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

VOCAB = 300


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg).eval()


def _fake_quantize(model, bits=4, group_size=32, scheme="sym", names=None):
    """QuantizedWeight per Linear in the blocks; weights replaced by their qdq values."""
    params = QuantParams(bits=bits, group_size=group_size, scheme=scheme)
    layers = {}
    for name, module in model.named_modules():
        wanted = name in names if names is not None else name.startswith("model.layers.")
        if isinstance(module, nn.Linear) and wanted:
            codes, scale, zero = quantize_weight(module.weight.data, params)
            qw = QuantizedWeight(codes, scale, zero, bits, group_size, params.sym)
            layers[name] = qw
            module.weight.data = qw.dequantize(module.weight.dtype)
    return layers


def _config(bits=4, group_size=32, sym=True, extra=None):
    return {
        "quant_method": "auto-round",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "data_type": "int",
        "block_name_to_quantize": "model.layers",
        "extra_config": extra or {},
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _tensors(path: Path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sym4(tmp_path_factory, ids):
    """A sym 4-bit export; returns (dir, fake-quant logits, original state dict)."""
    model = _tiny_llama()
    layers = _fake_quantize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("sym4")
    get_format("auto_round").save(model, layers, out, _config(), inplace=False)
    return out, _logits(model, ids), before, model


def test_files_and_config(sym4):
    out, _, _, _ = sym4
    assert {"config.json", "quantization_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["packing_format"] == "auto_round:auto_gptq"
    assert qc["quant_method"] == "auto-round" and qc["block_name_to_quantize"] == "model.layers"
    assert json.loads((out / "quantization_config.json").read_text()) == qc


def test_tensor_names_shapes_dtypes(sym4):
    out, _, _, _ = sym4
    t = _tensors(out)
    p = "model.layers.0.mlp.down_proj"  # in 128, out 64, group 32 -> 4 groups
    assert t[f"{p}.qweight"].shape == (128 * 4 // 32, 64) and t[f"{p}.qweight"].dtype == torch.int32
    assert t[f"{p}.qzeros"].shape == (4, 64 * 4 // 32) and t[f"{p}.qzeros"].dtype == torch.int32
    assert t[f"{p}.scales"].shape == (4, 64) and t[f"{p}.scales"].dtype == torch.float16
    assert f"{p}.weight" not in t and f"{p}.g_idx" not in t
    assert (t[f"{p}.qzeros"] == 0x77777777).all()  # sym 4-bit zeros stored as z - 1 = 7
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t
    assert sum(k.endswith(".qweight") for k in t) == 14


def test_inplace_false_leaves_model_untouched(sym4):
    _, _, before, model = sym4
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reload_matches_fake_quant_logits(sym4, ids):
    out, ref, _, _ = sym4
    model = AutoModelForCausalLM.from_pretrained(out)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.backend_name == "cpu_int4"
    assert isinstance(model.lm_head, nn.Linear)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)


def test_load_quantized_with_backend_override(sym4, ids):
    out, ref, _, _ = sym4
    model = load_quantized(str(out), backend="torch")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {m.backend_name for m in layers} == {"torch"}
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="valid"):
        load_quantized(str(out), backend="no_such_backend")


@pytest.mark.parametrize("bits,packing", [(4, "auto_round:auto_awq"), (3, "auto_round")])
def test_asym_export_uses_raw_zeros(tmp_path, ids, bits, packing):
    """4-bit asym goes out in the AWQ packing (what the reference writes and vLLM reads), other bits raw."""
    model = _tiny_llama()
    layers = _fake_quantize(model, scheme="asym", bits=bits)
    ref = _logits(model, ids)
    get_format("auto_round").save(model, layers, tmp_path, _config(sym=False, bits=bits), inplace=True)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # inplace replaced it
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["packing_format"] == packing
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), ref, atol=1e-4, rtol=1e-4)


def test_3bit_export_round_trip(tmp_path, ids):
    model = _tiny_llama()
    layers = _fake_quantize(model, bits=3)
    ref = _logits(model, ids)
    get_format("auto_round").save(model, layers, tmp_path, _config(bits=3), inplace=False)
    t = _tensors(tmp_path)
    assert t["model.layers.1.mlp.gate_proj.qweight"].shape == (64 * 3 // 32, 128)
    assert t["model.layers.1.mlp.gate_proj.qzeros"].shape == (2, 128 * 3 // 32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[1].mlp.gate_proj.backend_name == "torch"
    torch.testing.assert_close(_logits(reloaded, ids), ref, atol=1e-4, rtol=1e-4)


def test_extra_config_keeps_fp_and_quantizes_lm_head(tmp_path, ids):
    model = _tiny_llama()
    fp_name = "model.layers.1.self_attn.o_proj"
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != fp_name]
    layers = _fake_quantize(model, names=[n for n in names if n != "lm_head"])
    layers.update(_fake_quantize(model, bits=8, names=["lm_head"]))
    ref = _logits(model, ids)
    extra = {fp_name: {"bits": 16}, "lm_head": {"bits": 8, "group_size": 32, "sym": True}}
    get_format("auto_round").save(model, layers, tmp_path, _config(extra=extra), inplace=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, nn.Linear)
    assert isinstance(reloaded.lm_head, QuantLinear) and reloaded.lm_head.bits == 8
    torch.testing.assert_close(_logits(reloaded, ids), ref, atol=1e-4, rtol=1e-4)


def test_gptq_checkpoint_loads_through_auto_round_config(sym4, tmp_path, ids):
    out, ref, _, _ = sym4
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    for key in [k for k in state if k.endswith(".qweight")]:
        in_features = state[key].shape[0] * 32 // 4
        state[key.replace(".qweight", ".g_idx")] = (torch.arange(in_features) // 32).int()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "desc_act": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=AutoRoundConfig(backend="auto")
    )
    assert model.model.layers[0].mlp.up_proj.packing_format == "auto_round:gptq"
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    # act-order checkpoints are read too (their g_idx decides; tests/test_foreign_checkpoints.py permutes it)
    config["quantization_config"]["desc_act"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=AutoRoundConfig())
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)


def test_check_layer_reports_unstorable_layers():
    fmt = get_format("auto_round")
    assert fmt.check_layer("ok", 64, 128, 4, 32, True) is None
    reason = fmt.check_layer("lm_head", 300, 64, 4, 32, True)  # 300 * 4 % 32 != 0
    assert "out_features=300" in reason and "fp_layers" in reason and "layer_config" in reason
    assert "in_features=100" in fmt.check_layer("odd", 64, 100, 4, 20, True)
    assert fmt.check_layer("x", 64, 64, 3, 32, True) is None  # 64 * 3 % 32 == 0
    assert "bits" in fmt.check_layer("x", 64, 64, 16, 32, True)
    assert "asym" in get_format("auto_round:auto_gptq").check_layer("x", 64, 64, 4, 32, False)


def test_save_refuses_unstorable_layer(tmp_path):
    model = _tiny_llama()
    layers = _fake_quantize(model, names=["lm_head"])  # out 300 at 4 bits
    with pytest.raises(ValueError, match="lm_head"):
        get_format("auto_round").save(model, layers, tmp_path, _config(), inplace=False)


def test_registry_names_and_errors():
    assert {"auto_round", "auto_round:auto_gptq", "auto_round:gptq"} <= set(available_formats())
    with pytest.raises(ValueError, match="already registered"):
        register_format("auto_round", get_format("auto_round"))
    with pytest.raises(ValueError, match="auto_round"):
        get_format("auto_roundd")
    assert isinstance(get_format("auto_round:gptq"), Exporter)


def test_infer_target_device():
    assert infer_target_device(None) == "cpu"
    assert infer_target_device("cpu") == "cpu"
    assert infer_target_device({"model": "cpu", "lm_head": "disk"}) == "cpu"
    assert infer_target_device({"model": "cuda:0", "lm_head": "cpu"}) == "cuda"
    assert infer_target_device("cuda:1") == "cuda"


def test_layer_schemes_from_config_regex_and_overrides():
    model = _tiny_llama()
    extra = {
        r".*mlp\.down_proj": {"bits": 16},
        "model.layers.0.self_attn.q_proj": {"group_size": -1, "bits": 8, "sym": False},
        "lm_head": {"bits": 8, "group_size": 32},
    }
    config = _config(extra=extra)
    config["block_name_to_quantize"] = ["model.layers"]
    schemes = quantized_layer_schemes(model, config)
    assert not any(name.endswith("down_proj") for name in schemes)
    assert schemes["model.layers.0.self_attn.q_proj"] == LayerScheme(8, 64, False)
    assert schemes["model.layers.1.self_attn.q_proj"] == LayerScheme(4, 32, True)
    assert schemes["lm_head"] == LayerScheme(8, 32, True)
    assert len(schemes) == 2 * 6 + 1
    with pytest.raises(ValueError, match="data_type"):
        quantized_layer_schemes(model, {**config, "data_type": "mx_fp"})
