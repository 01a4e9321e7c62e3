"""Numerical guards and recorded facts: no NaN checkpoint with exit 0, the config says what was used."""

import json
import logging

import pytest
import torch

from auto_round import AutoRound
from auto_round.tuning import block
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=2, group_size=32, iters=6, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_tuning_naming_the_layer(value):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    ar = AutoRound(model, make_tokenizer(), **FAST)
    with pytest.raises(ValueError, match=r"NaN or Inf: model\.layers\.1\.mlp\.up_proj"):
        ar.quantize()
    assert not ar.quantized_layers


def test_a_loss_that_turns_non_finite_keeps_the_best_finite_iteration(monkeypatch, caplog):
    real, calls = block.squared_error, []

    def flaky(out, target, mask, *rest):
        sq, n = real(out, target, mask, *rest)
        calls.append(1)
        return (sq * float("nan"), n) if len(calls) == 4 else (sq, n)  # one call per iteration: block 0, iteration 3

    monkeypatch.setattr(block, "squared_error", flaky)
    with caplog.at_level(logging.WARNING, logger="auto_round.tuning.block"):
        ar = AutoRound(tiny_llama(), make_tokenizer(), **FAST).quantize()
    assert "model.layers.0: the tuning loss became nan at iteration 3" in caplog.text
    first, second = ar.block_results
    assert first.best_iter <= 2 and second.best_iter <= 5  # the next block tunes normally
    assert all(torch.isfinite(q.scale).all() for q in ar.quantized_layers.values())


def test_a_loss_non_finite_from_the_start_is_an_error_naming_the_block(monkeypatch):
    monkeypatch.setattr(block, "squared_error", lambda out, target, mask, *rest: (out.sum() * float("nan"), 1))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0: the tuning loss is nan at iteration 0"):
        AutoRound(tiny_llama(), make_tokenizer(), **FAST).quantize()


def test_auto_gptq_refuses_5_bits_before_tuning():
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "bits": 5})
    with pytest.raises(ValueError, match=r"'auto_gptq' stores bits \(2, 3, 4, 8\), not bits=5"):
        ar.quantize(format="auto_gptq")
    assert not ar.quantized_layers


def test_saved_nsamples_is_the_count_really_used(tmp_path):
    data = tmp_path / "few.txt"
    data.write_text(" ".join(f"word{i}" for i in range(200)))  # room for only a few 32-token samples
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "iters": 1, "nsamples": 64, "dataset": str(data)})
    out = ar.quantize_and_save(tmp_path / "q", inplace=False)[0]
    used = json.loads((out / "config.json").read_text())["quantization_config"]["nsamples"]
    assert used == ar.samples_used and 0 < used < 64


def test_same_seed_gives_bit_identical_checkpoints_across_thread_counts(tmp_path):
    import hashlib

    digests = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "iters": 3})
            out = ar.quantize_and_save(tmp_path / f"t{threads}-{len(digests)}", inplace=False)[0]
            digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(before)
    assert len(set(digests)) == 1, digests


def test_activations_beyond_fp16_range_are_reported_at_export(tmp_path, caplog):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # the residual stream, and so every block output, leaves fp16
    ar = AutoRound(model, make_tokenizer(), **{**FAST, "bits": 4, "iters": 1}).quantize()
    assert ar.block_results[0].peak_activation > 65504
    with caplog.at_level(logging.WARNING, logger="auto_round.autoround"):
        ar.save_quantized(tmp_path / "q", inplace=False)
    assert "exceed the fp16 range" in caplog.text and "model.layers.0" in caplog.text
    assert ar.summary["blocks"][0]["peak_activation"] > 65504


def test_ordinary_activations_are_not_reported(tmp_path, caplog):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "bits": 4, "iters": 1}).quantize()
    with caplog.at_level(logging.WARNING, logger="auto_round.autoround"):
        ar.save_quantized(tmp_path / "q", inplace=False)
    assert "fp16 range" not in caplog.text and 0 < ar.block_results[0].peak_activation < 65504
