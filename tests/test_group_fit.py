"""No padded groups on disk: a group size that does not divide a layer is halved until it does, else FP."""

import json

import pytest
import torch
from safetensors import safe_open

from auto_round import AutoRound
from auto_round.config import build_settings
from auto_round.tuning.plan import fit_group_size, resolve_plan
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


@pytest.mark.parametrize("in_features,gs,fitted", [(576, 128, 64), (1536, 128, 128), (576, -1, 576), (96, 128, 32),
                                                   (576, 96, 96), (100, 32, None), (600, 128, None), (64, 32, 32)])
def test_fit_group_size(in_features, gs, fitted):
    assert fit_group_size(in_features, gs) == fitted


def _model(hidden):
    # hidden 96: q/k/v/o/gate/up read 96 inputs (96 % 64 != 0), down_proj reads 128
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                                        tie_word_embeddings=False)).eval()


def test_plan_reports_the_fitted_group_size_and_fp_layers():
    plan = resolve_plan(_model(96), build_settings(group_size=64), ["model.layers"])
    by = {lp.name: lp for lp in plan.layers}
    assert by["model.layers.0.self_attn.q_proj"].params.group_size == 32
    assert by["model.layers.0.mlp.down_proj"].params.group_size == 64 and not by["model.layers.0.mlp.down_proj"].note
    assert any("group_size 64 -> 32" in line and "q_proj" in line for line in plan.summary_lines())
    plan = resolve_plan(_model(80), build_settings(group_size=64), ["model.layers"])  # 80: no group >= 32 divides
    by = {lp.name: lp for lp in plan.layers}
    assert by["model.layers.0.self_attn.q_proj"].params is None
    assert "in_features=80" in by["model.layers.0.self_attn.q_proj"].reason
    assert by["model.layers.0.mlp.down_proj"].params.group_size == 64


def test_fitted_layers_are_stored_unpadded_recorded_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    ar = AutoRound(_model(96), tok, group_size=64, **FAST)
    out = ar.quantize_and_save(tmp_path / "q", inplace=False)[0]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.scales").get_shape() == [96 // 32, 96]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape() == [128 // 64, 96]
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra["model.layers.1.mlp.up_proj"]["group_size"] == 32 and "model.layers.1.mlp.down_proj" not in extra
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ar.model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)


def test_auto_gptq_names_the_group_size_that_fits_before_tuning():
    ar = AutoRound(_model(96), make_tokenizer(), group_size=64, **FAST)
    with pytest.raises(ValueError, match=r"group_size=32 \(it divides every layer\)"):
        ar.quantize(format="auto_gptq")
    assert not ar.quantized_layers
