"""Layer plan: block discovery, overrides, refusals."""

import pytest
import torch.nn as nn

from auto_round.config import build_settings
from auto_round.models.blocks import find_text_block_list, resolve_block_names, structural_block_lists
from auto_round.tuning.plan import resolve_plan
from tiny_models import tiny_llama, tiny_opt, tiny_qwen2


def test_block_lists_found_for_families():
    assert find_text_block_list(tiny_llama()) == "model.layers"
    assert find_text_block_list(tiny_opt()) == "model.decoder.layers"


def test_structural_fallback_for_unknown_layout():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(3)])

    assert find_text_block_list(Odd()) == "stack"
    assert structural_block_lists(Odd()) == ["stack"]


def test_default_plan_quantizes_block_linears_only():
    m = tiny_llama()
    plan = resolve_plan(m, build_settings(group_size=32), ["model.layers"])
    assert len(plan.quantized) == 14
    assert {lp.name for lp in plan.kept_fp} == {"lm_head"}
    assert plan.kept_fp[0].reason == "outside the tuned blocks"
    assert all(lp.params.group_size == 32 for lp in plan.quantized)


def test_group_size_minus_one_is_per_row():
    plan = resolve_plan(tiny_llama(), build_settings(group_size=-1), ["model.layers"])
    down = next(lp for lp in plan.quantized if lp.name.endswith("down_proj"))
    assert down.params.group_size == 128


def test_layer_config_exact_regex_and_fp():
    s = build_settings(group_size=32, layer_config={"model.layers.0.self_attn.q_proj": {"bits": 8},
                                                    r"mlp\.down_proj": {"bits": 16}})
    plan = resolve_plan(tiny_llama(), s, ["model.layers"])
    by = {lp.name: lp for lp in plan.layers}
    assert by["model.layers.0.self_attn.q_proj"].params.bits == 8
    assert by["model.layers.1.mlp.down_proj"].params is None
    assert by["model.layers.1.mlp.down_proj"].reason == "layer_config bits >= 16"


def test_unmatched_layer_config_key_is_error():
    with pytest.raises(ValueError, match="matches no linear layer"):
        resolve_plan(tiny_llama(), build_settings(layer_config={"nope": {"bits": 8}}), ["model.layers"])
    with pytest.raises(ValueError, match="unknown field"):
        resolve_plan(tiny_llama(), build_settings(layer_config={"q_proj": {"bitz": 8}}), ["model.layers"])


def test_fp_layers():
    plan = resolve_plan(tiny_llama(), build_settings(fp_layers="mlp"), ["model.layers"])
    assert len(plan.quantized) == 8
    with pytest.raises(ValueError, match="fp_layers entry 'zzz'"):
        resolve_plan(tiny_llama(), build_settings(fp_layers="zzz"), ["model.layers"])


def test_quant_lm_head_refused_when_tied_and_allowed_otherwise():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        resolve_plan(tiny_qwen2(), build_settings(quant_lm_head=True), ["model.layers"])
    plan = resolve_plan(tiny_llama(), build_settings(quant_lm_head=True, group_size=32), ["model.layers"])
    head = next(lp for lp in plan.layers if lp.name == "lm_head")
    assert head.params is not None and head.block is None


def test_to_quant_block_names_validated():
    with pytest.raises(ValueError, match="not a ModuleList"):
        resolve_block_names(tiny_llama(), "model.norm")
    assert resolve_block_names(tiny_llama(), "model.layers") == ["model.layers"]


def test_format_capability_reported_before_tuning():
    def check(name, out, in_, params):
        return "too wide" if "down_proj" in name else None

    with pytest.raises(ValueError, match="down_proj.*too wide"):
        resolve_plan(tiny_llama(), build_settings(), ["model.layers"], check)
