"""No silent fallbacks: each place that falls back says so (WARNING naming the thing and the reason) or refuses."""

import logging

import pytest
import torch.nn as nn

from auto_round.config import build_settings
from auto_round.inference.convert_model import quantized_layer_schemes
from auto_round.mllm.families import Family, resolve_family_blocks
from auto_round.mllm.template import TEMPLATES, get_template
from auto_round.tuning.plan import resolve_plan
from tiny_models import tiny_llama


class _TupleLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (as Llama-4's router): it cannot be wrapped."""

    def forward(self, x):
        return super().forward(x), None


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.router = _TupleLinear(32, 32)
        self.fc = nn.Linear(32, 32)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def _plan(layer_config):
    s = build_settings(group_size=32, layer_config=layer_config)
    return resolve_plan(_Stack(), s, ["layers"])


@pytest.mark.parametrize("name,why", [("layers.0.attn.out_proj", "MultiheadAttention"),
                                      ("layers.1.router", "overrides Linear.forward")])
def test_layer_config_on_an_unswappable_layer_by_name_is_refused(name, why):
    with pytest.raises(ValueError, match=rf"layer_config\['{name}'\].*{why}"):
        _plan({name: {"bits": 8}})


def test_layer_config_regex_reaching_unswappable_layers_warns_with_each(caplog):
    with caplog.at_level(logging.WARNING, logger="auto_round.tuning.plan"):
        plan = _plan({r"layers\.0\.": {"bits": 8}})
    assert "layers.0.attn.out_proj (weight read directly by MultiheadAttention)" in caplog.text
    assert "layers.0.router (_TupleLinear overrides Linear.forward)" in caplog.text
    by_name = {lp.name: lp for lp in plan.layers}
    assert by_name["layers.0.fc"].params.bits == 8 and by_name["layers.0.router"].params is None


def test_keeping_an_unswappable_layer_in_fp_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="auto_round.tuning.plan"):
        _plan({"layers.0.router": {"bits": 16}, r"out_proj": {"bits": 16}})
    assert caplog.text == ""


def test_unknown_model_type_gets_the_generic_template_with_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="auto_round.mllm.template"):
        assert get_template("brand_new_vlm") is TEMPLATES["default"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "'brand_new_vlm' has no template and no family record" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="auto_round.mllm.template"):
        get_template("llava_onevision", family_known=True)  # a family record describes it
    assert all(r.levelno < logging.WARNING for r in caplog.records)


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)])


class _Vlm(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)])
        self.model.eyes = _Tower()


def test_family_vision_paths_missing_falls_back_structurally_with_a_warning(caplog):
    fam = Family("fake", ("fake",), ("model.layers",), ("model.visual.blocks",))
    with caplog.at_level(logging.WARNING, logger="auto_round.mllm.families"):
        text, vision, _ = resolve_family_blocks(_Vlm(), fam)
    assert (text, vision) == ("model.layers", ["model.eyes.blocks"])
    assert "family fake: none of its vision paths ('model.visual.blocks',) exist" in caplog.text


def test_model_without_family_record_announces_the_structural_search(caplog):
    with caplog.at_level(logging.WARNING, logger="auto_round.mllm.families"):
        text, vision, _ = resolve_family_blocks(_Vlm(), None)
    assert (text, vision) == ("model.layers", ["model.eyes.blocks"])
    assert "_Vlm matches no family record" in caplog.text and "model.eyes.blocks" in caplog.text


def test_family_whose_paths_exist_is_quiet(caplog):
    fam = Family("fake", ("fake",), ("model.layers",), ("model.eyes.blocks",))
    with caplog.at_level(logging.WARNING, logger="auto_round.mllm.families"):
        resolve_family_blocks(_Vlm(), fam)
    assert caplog.text == ""


def test_invalid_extra_config_regex_is_announced(caplog):
    model = tiny_llama()
    qconfig = {"bits": 4, "group_size": 32, "block_name_to_quantize": "model.layers",
               "extra_config": {"mlp.(down": {"bits": 8}, "model.layers.0.mlp.up_proj": {"bits": 16}}}
    with caplog.at_level(logging.WARNING, logger="auto_round.inference.convert_model"):
        schemes = quantized_layer_schemes(model, qconfig)
    assert "extra_config key 'mlp.(down' is neither a layer name nor a valid regex" in caplog.text
    assert "model.layers.0.mlp.up_proj" not in schemes  # the valid entries still apply
    assert schemes["model.layers.0.mlp.down_proj"].bits == 4
