"""Automatic mixed bits: option names, stored-bit costs, fused groups, the budget solver, and a run."""

import itertools

import pytest
import torch

from auto_round import AutoRound
from auto_round.config import build_settings
from auto_round.tuning.autoscheme import (SchemeOption, group_key, layer_groups, parse_options, scheme_bits,
                                          solve_budget)
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_options_both_spellings_and_errors():
    opts = parse_options("W2G64, W4A16,W3G128asym")
    assert [(o.bits, o.group_size, o.sym) for o in opts] == [(2, 64, True), (4, 128, True), (3, 128, False)]
    with pytest.raises(ValueError, match="'Q4'"):
        parse_options("W2G64,Q4")
    with pytest.raises(ValueError, match="at least two"):
        parse_options("W4G128")
    with pytest.raises(ValueError, match="bits=9"):
        parse_options("W9G128,W4G128")


def test_settings_need_both_and_check_early():
    with pytest.raises(ValueError, match="scheme_options"):
        build_settings(avg_bits=3.0)
    with pytest.raises(ValueError, match="'X1'"):
        build_settings(avg_bits=3.0, scheme_options="W2G64,X1")
    with pytest.raises(ValueError, match="positive"):
        build_settings(avg_bits=-1.0, scheme_options="W2G64,W4G128")


def test_scheme_bits_counts_scales_and_zeros():
    assert scheme_bits(SchemeOption("a", 4, 128, True), 10, 256) == 10 * 256 * 4 + 10 * 2 * 16
    assert scheme_bits(SchemeOption("a", 4, 128, False), 10, 256) == 10 * 256 * 4 + 10 * 2 * (16 + 4)
    assert scheme_bits(SchemeOption("a", 16, -1, True), 10, 256) == 10 * 256 * 16


def test_fused_layers_share_a_group():
    assert group_key("model.layers.3.self_attn.q_proj") == group_key("model.layers.3.self_attn.v_proj")
    assert group_key("model.layers.3.self_attn.q_proj") != group_key("model.layers.4.self_attn.q_proj")
    assert group_key("model.layers.3.self_attn.o_proj") != group_key("model.layers.3.self_attn.q_proj")
    assert group_key("m.layers.1.mlp.experts.0.down_proj") == group_key("m.layers.1.mlp.experts.7.down_proj")
    assert list(layer_groups(["a.gate_proj", "a.up_proj", "a.down_proj"]).values()) == [["a.gate_proj", "a.up_proj"],
                                                                                      ["a.down_proj"]]


def _brute(scores, costs, budget):
    best, pick = float("inf"), None
    for choice in itertools.product(*[range(len(r)) for r in scores]):
        c = sum(costs[i][o] for i, o in enumerate(choice))
        s = sum(scores[i][o] for i, o in enumerate(choice))
        if c <= budget and s < best:
            best, pick = s, list(choice)
    return best, pick


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force_and_keeps_the_budget(seed):
    g = torch.Generator().manual_seed(seed)
    n = 7
    sizes = (torch.randint(1, 5, (n,), generator=g) * 1000).tolist()
    costs = [[s * 2.5, s * 4.25] for s in sizes]
    scores = [[float(torch.rand(1, generator=g)) * 10 + 1, float(torch.rand(1, generator=g))] for _ in range(n)]
    budget = sum(s for s in sizes) * 3.2
    picks = solve_budget(scores, costs, budget)
    assert sum(costs[i][o] for i, o in enumerate(picks)) <= budget
    best, _ = _brute(scores, costs, budget)
    assert sum(scores[i][o] for i, o in enumerate(picks)) == pytest.approx(best)  # exact
    # With few states the costs are rounded up: still within the budget, close to the optimum.
    rough = solve_budget(scores, costs, budget, max_states=200)
    assert sum(costs[i][o] for i, o in enumerate(rough)) <= budget


def test_solver_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="avg_bits"):
        solve_budget([[1.0, 0.0]], [[100.0, 200.0]], 50.0)


def test_mixed_bits_run_meets_the_budget_and_beats_uniform_low_bits():
    kw = dict(group_size=32, iters=0, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")
    ar = AutoRound(tiny_llama(), make_tokenizer(), avg_bits=3.0, scheme_options="W2G32,W4G32", **kw)
    ar.quantize()
    rep = ar.mixed_bits
    assert rep["avg_bits"] <= 3.0 + 1e-9
    bits = {q.bits for q in ar.quantized_layers.values()}
    assert bits == {2, 4}
    by_name = {n: q.bits for n, q in ar.quantized_layers.items()}
    for i in range(2):  # fused groups share a scheme
        p = f"model.layers.{i}."
        assert by_name[p + "self_attn.q_proj"] == by_name[p + "self_attn.k_proj"] == by_name[p + "self_attn.v_proj"]
        assert by_name[p + "mlp.gate_proj"] == by_name[p + "mlp.up_proj"]
    assert ar.summary["mixed_bits"]["layers_per_option"]["W4G32"] > 0
    # the user's own layer_config wins over the choice
    ar2 = AutoRound(tiny_llama(), make_tokenizer(), avg_bits=3.0, scheme_options="W2G32,W4G32",
                    layer_config={"model.layers.0.mlp.down_proj": {"bits": 8}}, **kw)
    ar2.quantize()
    assert ar2.quantized_layers["model.layers.0.mlp.down_proj"].bits == 8


def test_mixed_bits_on_a_vlm_keeps_the_vision_tower_fp():
    from auto_round import AutoRoundMLLM
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, bits=4, group_size=32, iters=0, nsamples=4,
                       seqlen=48, batch_size=2, avg_bits=3.0, scheme_options="W2G32,W4G32")
    ar.quantize()
    assert ar.mixed_bits["avg_bits"] <= 3.0 + 1e-9
    assert {q.bits for q in ar.quantized_layers.values()} == {2, 4}
    assert not any("visual" in n for n in ar.quantized_layers)


def test_mixed_bits_with_a_format_that_chooses_its_own_types_is_refused_before_scoring(monkeypatch):
    from auto_round.tuning import autoscheme

    def must_not_score(*a, **k):
        raise AssertionError("scored before the refusal")

    monkeypatch.setattr(autoscheme, "delta_loss_scores", must_not_score)
    ar = AutoRound(tiny_llama(), make_tokenizer(), group_size=32, iters=0, nsamples=4, seqlen=32, batch_size=2,
                   dataset="auto_round:offline_corpus", avg_bits=3.0, scheme_options="W2G32,W4G32")
    with pytest.raises(ValueError, match=r"avg_bits=3.0 .*'gguf:q4_k_m'.*drop avg_bits"):
        ar.quantize(format="gguf:q4_k_m")
