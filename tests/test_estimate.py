"""The dry run's estimate counts the tuning's matmul work and the cache from the plan and the settings."""

import torch

from auto_round import AutoRound
from auto_round.estimate import estimate_run, measure_flops_per_second, tuned_unit_params
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

# per block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128
BLOCK = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192


def _plan(**settings):
    ar = AutoRound(tiny_llama(), make_tokenizer(), group_size=32, **settings)
    return ar, ar.resolve_plan()


def test_work_is_forward_and_backward_of_each_tuned_block_per_step():
    ar, plan = _plan(iters=10, nsamples=4, seqlen=32, batch_size=2, amp=False)
    assert tuned_unit_params(ar.model, plan) == [BLOCK, BLOCK]
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=3 * 2**20, flops_per_second=1e9)
    work = 2 * BLOCK * 2 * (3 * 2 * 32 * 10 + 2 * 4 * 32)  # + the FP targets and quantized inputs once
    assert est.tflops * 1e12 == work and est.seconds == work / 1e9
    assert est.cache_mib * 2**20 == 2 * 4 * 32 * 64 * 4 and est.checkpoint_mib == 3
    assert est.model_mib * 2**20 == sum(p.numel() * 4 for p in ar.model.parameters())


def test_plain_round_to_nearest_needs_no_data_cache_or_tuning():
    ar, plan = _plan(iters=0, disable_opt_rtn=True)
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=0, flops_per_second=None)
    assert est.tflops == 0 and est.cache_mib == 0 and est.tuning_mib == 0 and est.seconds is None
    assert "not timed" in est.lines()[-1]


def test_throughput_is_measured():
    assert measure_flops_per_second(torch.device("cpu"), size=128, seconds=0.05) > 1e6
