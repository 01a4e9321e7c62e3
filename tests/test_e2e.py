"""End-to-end scale tuning (``e2e_epochs``): its gradient, its loss, what it changes and what it refuses."""

import json

import pytest
import torch
import torch.nn.functional as F

import auto_round.autoround as autoround_module
from auto_round import AutoRound
from auto_round.autoround import _check_parallel
from auto_round.config import build_settings
from auto_round.tuning.e2e import _ScaledLinearFn, topk_kl
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(bits=2, group_size=32, iters=4, nsamples=8, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


@pytest.mark.parametrize("in_, gs", [(64, 32), (80, 32)])  # 80: a last group of 16, as a padded layer has
def test_scaled_linear_gradient_is_that_of_the_dequantized_weight(in_, gs):
    g = torch.Generator().manual_seed(0)
    groups = -(-in_ // gs)
    codes = torch.randint(0, 4, (6, in_), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 4, (6, groups), generator=g, dtype=torch.int32)  # asym zero points
    scale = torch.rand(6, groups, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(3, 5, in_, generator=g, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x_, s_: _ScaledLinearFn.apply(x_, s_, codes, zero, gs, bias), (x, scale))
    # and the forward is the dequantized layer's
    idx = torch.arange(in_) // gs
    w = scale.detach()[:, idx] * (codes.double() - zero.double()[:, idx])
    torch.testing.assert_close(_ScaledLinearFn.apply(x, scale, codes, zero, gs, bias), F.linear(x, w, bias))


def test_topk_kl_is_zero_for_the_teacher_and_the_full_kl_at_full_k():
    g = torch.Generator().manual_seed(1)
    p = F.log_softmax(torch.randn(7, 50, generator=g), -1)
    q = F.log_softmax(torch.randn(7, 50, generator=g), -1)
    v, i = p.topk(8, -1)
    assert float(topk_kl(p, v, i)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(q, v, i)) > 0
    v, i = p.topk(50, -1)
    full = (p.exp() * (p - q)).sum()
    assert float(topk_kl(q, v, i)) == pytest.approx(float(full), rel=1e-4)
    # the top-k + tail divergence never exceeds the full one (data processing inequality)
    v, i = p.topk(8, -1)
    assert float(topk_kl(q, v, i)) <= float(full) + 1e-6


def _tuned(e2e_epochs, **over):
    ar = AutoRound(tiny_llama(), make_tokenizer(), e2e_epochs=e2e_epochs, **{**RUN, **over})
    ar.quantize()
    return ar


def test_e2e_keeps_the_codes_trains_the_scales_and_lowers_the_kl(tmp_path):
    plain, tuned = _tuned(0), _tuned(3, e2e_lr=2e-2)
    assert plain.e2e is None and plain.summary["e2e"] is None
    info = tuned.summary["e2e"]
    assert info["kept"] and info["kl_after"] < 0.8 * info["kl_before"], info
    assert info["steps"] == 3 * 4 and len(info["epoch_kl"]) == 3
    assert set(tuned.quantized_layers) == set(plain.quantized_layers)
    moved = 0
    for name, rec in tuned.quantized_layers.items():
        ref = plain.quantized_layers[name]
        assert torch.equal(rec.codes, ref.codes) and torch.equal(rec.zero, ref.zero), name  # block-wise part unchanged
        assert rec.scale.dtype == ref.scale.dtype == torch.float16
        moved += int(not torch.equal(rec.scale, ref.scale))
        weight = tuned.model.get_submodule(name).weight
        assert torch.equal(weight, rec.dequantize(weight.dtype)), name  # the model runs the stored scales
    assert moved == len(tuned.quantized_layers)
    assert "e2e" in tuned.phase_seconds and "e2e_teacher" in tuned.phase_seconds
    # the export holds the trained scales: reloaded, the model gives the in-memory logits
    from auto_round.inference import load_quantized

    out = tmp_path / "q"
    tuned.save_quantized(out, format="auto_round", inplace=False)
    cfg = json.loads((out / "quantization_config.json").read_text())
    assert cfg["e2e_epochs"] == 3 and cfg["e2e_lr"] == 2e-2
    ids = make_tokenizer()("the quick brown fox jumps", return_tensors="pt").input_ids
    reloaded = load_quantized(str(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned.model(ids).logits, atol=2e-4, rtol=1e-4)


def test_a_stage_that_does_not_lower_the_kl_keeps_the_block_wise_scales(caplog):
    plain, diverged = _tuned(0), _tuned(1, e2e_lr=50.0)  # relative Adam steps of 50: scales 50x off, far worse
    info = diverged.summary["e2e"]
    assert not info["kept"] and not info["kl_after"] < info["kl_before"], info
    assert "block-wise scales are kept" in caplog.text
    for name, rec in diverged.quantized_layers.items():
        assert torch.equal(rec.scale, plain.quantized_layers[name].scale), name
        weight = diverged.model.get_submodule(name).weight
        assert torch.equal(weight, plain.model.get_submodule(name).weight), name


def test_refusals_come_before_any_tuning(monkeypatch):
    def no_tuning(*a, **k):
        raise AssertionError("tuning started")

    monkeypatch.setattr(autoround_module, "quantize_model", no_tuning)
    from test_export_gguf_k import llama_256

    with pytest.raises(ValueError, match=r"e2e_epochs=1 trains float group scales.*K-quant.*gguf:q4_0"):
        AutoRound(llama_256(), make_tokenizer(), e2e_epochs=1, **{**RUN, "group_size": 32}).quantize(
            format="gguf:q4_k_m")
    with pytest.raises(ValueError, match="e2e_epochs needs calibration data"):
        AutoRound(tiny_llama(), None, e2e_epochs=1, **RUN).quantize()
    with pytest.raises(ValueError, match=r"e2e_epochs=2 .*low_cpu_mem_usage"):
        build_settings(e2e_epochs=2, low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"e2e_epochs=-1"):
        build_settings(e2e_epochs=-1)
    with pytest.raises(ValueError, match=r"e2e_lr=0"):
        build_settings(e2e_epochs=1, e2e_lr=0)
    with pytest.raises(ValueError, match=r"e2e_epochs=1 with 2 data-parallel processes"):
        _check_parallel(build_settings(e2e_epochs=1, batch_size=2, nsamples=4), 2)


def test_cli_flag(model_dir, tmp_path, capsys):
    from auto_round.cli import main

    out = tmp_path / "o"
    assert main(["--model", str(model_dir), "--bits", "2", "--group_size", "32", "--iters", "2", "--nsamples", "4",
                 "--seqlen", "32", "--batch_size", "2", "--dataset", "auto_round:offline_corpus", "--e2e_epochs", "1",
                 "--e2e_lr", "0.001", "--output_dir", str(out)]) == 0
    assert "e2e       1 epochs of scale tuning: calibration KL" in capsys.readouterr().out
    (cfg,) = [json.loads(p.read_text()) for p in out.rglob("quantization_config.json")]
    assert cfg["e2e_epochs"] == 1 and cfg["e2e_lr"] == 0.001


def test_image_text_batches_run_whole_and_text_batches_split_by_sample():
    from auto_round import AutoRoundMLLM
    from auto_round.tuning.e2e import _chunks
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()  # pixel patches of a batch's images packed along one axis, image_grid_thw
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, dataset="auto_round:offline_image_text",
                       bits=4, group_size=32, iters=1, nsamples=4, batch_size=2, seqlen=512, e2e_epochs=1,
                       e2e_lr=2e-2)
    batch = ar.calibration_batches()[0]
    assert "pixel_values" in batch and len(list(_chunks(batch, torch.device("cpu")))) == 1
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert [keep.shape for _, keep in _chunks(text, torch.device("cpu"))] == [(1, batch["input_ids"].shape[1])] * 2
    ar.quantize()
    info = ar.summary["e2e"]
    assert info["kept"] and info["kl_after"] < info["kl_before"], info
    for name, rec in ar.quantized_layers.items():
        weight = ar.model.get_submodule(name).weight
        assert torch.equal(weight, rec.dequantize(weight.dtype)), name


def test_the_default_learning_rate_follows_each_layers_bit_width():
    """Wider layers take smaller default rates (a relative scale change moves a weight by up to 2**(bits-1) of its
    steps); measured, the best rate halves every two bits."""
    s = build_settings(e2e_epochs=1)
    assert s.resolved_e2e_lr(2) == pytest.approx(1.5e-3) and s.resolved_e2e_lr(4) == pytest.approx(7.5e-4)
    assert s.resolved_e2e_lr(3) == pytest.approx(1.5e-3 / 2 ** 0.5) and s.resolved_e2e_lr(8) == pytest.approx(1.5e-3 / 8)
    given = build_settings(e2e_epochs=1, e2e_lr=1e-3)
    assert given.resolved_e2e_lr(2) == given.resolved_e2e_lr(4) == 1e-3  # a given rate holds for every width


def test_mixed_widths_train_with_their_own_default_rates(tmp_path):
    """Two bit widths in one plan: one Adam group per width at its default rate, recorded in the summary and
    the saved config (``e2e_lr`` of the global scheme, ``e2e_lr_by_bits`` for all)."""
    ar = AutoRound(tiny_llama(), make_tokenizer(), e2e_epochs=1, **{**RUN, "iters": 1},
                   layer_config={"model.layers.0.mlp.down_proj": {"bits": 4, "group_size": 32}})
    ar.quantize()
    info = ar.summary["e2e"]
    assert info["lr"] == {"2": pytest.approx(1.5e-3), "4": pytest.approx(7.5e-4)}, info
    ar.save_quantized(tmp_path / "q", format="auto_round", inplace=False)
    cfg = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert cfg["e2e_lr"] == pytest.approx(1.5e-3)
    assert cfg["e2e_lr_by_bits"] == {"2": pytest.approx(1.5e-3), "4": pytest.approx(7.5e-4)}
