"""The dry run's estimate: the tuning's matmul work, the block cache the loop really holds, the memory of one
tuned block (against a measured run), the checkpoint per the plan, and host RAM apart from device memory."""

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from auto_round import AutoRound
from auto_round.calib import store as store_mod
from auto_round.config import build_settings
from auto_round.estimate import (checkpoint_bytes, estimate_run, loop_cache_copies, measure_flops_per_second,
                                 tuned_unit_params)
from auto_round.tuning.loop import quantize_model
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

MIB = 2**20
# per block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128
BLOCK = 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192
pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(model=None, **settings):
    ar = AutoRound(model if model is not None else tiny_llama(), make_tokenizer(), group_size=32, **settings)
    return ar, ar.resolve_plan()


def test_work_is_forward_and_backward_of_each_tuned_block_per_step():
    ar, plan = _plan(iters=10, nsamples=4, seqlen=32, batch_size=2, amp=False)
    assert tuned_unit_params(ar.model, plan) == [BLOCK, BLOCK]
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=3 * 2**20, flops_per_second=1e9)
    work = 2 * BLOCK * 2 * (3 * 2 * 32 * 10 + 2 * 4 * 32)  # + the FP targets and quantized inputs once
    assert est.tflops * 1e12 == work and est.seconds == work / 1e9
    assert est.checkpoint_mib == 3
    assert est.model_mib * 2**20 == sum(p.numel() * 4 for p in ar.model.parameters())


def test_e2e_adds_the_whole_model_passes():
    ar, plan = _plan(iters=10, nsamples=4, seqlen=32, batch_size=2, amp=False, e2e_epochs=2)
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=3 * 2**20, flops_per_second=1e9)
    blocks = 2 * BLOCK * 2 * (3 * 2 * 32 * 10 + 2 * 4 * 32)
    linear = 2 * BLOCK + 512 * 64  # the blocks and lm_head, over the 4 x 32 calibration tokens
    assert est.tflops * 1e12 == blocks + linear * 4 * 32 * 2 * (3 + 3 * 2)


def test_plain_round_to_nearest_needs_no_data_cache_or_tuning():
    ar, plan = _plan(iters=0, disable_opt_rtn=True)
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=0, flops_per_second=None)
    assert est.tflops == 0 and est.cache_mib == 0 and est.tuning_mib == 0 and est.seconds is None
    assert "not timed" in est.lines()[-1]


# ------------------------------------------------------------------------------------------ (a) the block cache
def _held_by_the_store(monkeypatch, run):
    """The most bytes the loop's TensorStore held at once during ``run()`` (each stored tensor until freed)."""
    live, peak = [0], [0]
    put = store_mod.TensorStore.put

    def counting(self, tensor):
        out = put(self, tensor)
        if isinstance(out, torch.Tensor):
            n = out.numel() * out.element_size()
            live[0] += n
            peak[0] = max(peak[0], live[0])
            weakref.finalize(out, lambda: live.__setitem__(0, live[0] - n))
        return out

    monkeypatch.setattr(store_mod.TensorStore, "put", counting)
    run()
    return peak[0]


@pytest.mark.parametrize("settings, copies", [
    (dict(iters=2), 3),  # quantized inputs + FP targets + the outputs being computed (amp: float32 all the same)
    (dict(iters=2, enable_quanted_input=False), 2),  # both chains are one list
    (dict(iters=0), 4),  # optimized RTN: inputs, FP outputs, one output per candidate (search, plain RTN)
])
def test_block_cache_is_what_the_loop_holds_at_its_peak(monkeypatch, settings, copies):
    """Before the fix the estimate was 2 copies in bf16 with amp (a quarter of the loop's 3 float32 copies at
    the default); every stored copy is float32 (``_forward_all`` stores ``out.float()``), the tiny model's
    captured inputs too (float32 model)."""
    ar, plan = _plan(nsamples=4, seqlen=32, batch_size=2, amp=True, **settings)
    copy = 4 * 32 * 64 * 4
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 2]} for i in range(0, 4, 2)]
    held = _held_by_the_store(monkeypatch, lambda: quantize_model(ar.model, plan, ar.settings, lambda: batches,
                                                                  torch.device("cpu"), progress=False))
    est = estimate_run(ar.model, plan, ar.settings, checkpoint_bytes=0)
    assert held == copies * copy and est.cache_mib * MIB == held and est.cache_copies == copies
    assert est.cache_tuning_mib * MIB == (2 * copy if settings["iters"] else 0)
    assert f"{copies} float32 copies of 4 x 32 x 64" in "\n".join(est.lines())


def test_cache_copies_follow_the_settings():
    assert loop_cache_copies(build_settings(iters=200)) == (2, 3)
    assert loop_cache_copies(build_settings(iters=0), searched=False) == (0, 3)
    assert loop_cache_copies(build_settings(iters=0, disable_opt_rtn=True)) == (0, 0)


# ------------------------------------------------------------------------------------------ (b) tuning memory
_MEASURE = r"""
import ctypes, json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from auto_round.config import build_settings
from auto_round.estimate import estimate_run
from auto_round.tuning.loop import quantize_model
from auto_round.tuning.plan import resolve_plan
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

out = []
# the first run in a process also pays one-time allocations (kernel and thread-pool set-up: about 27 MB on an
# AMD EPYC with AVX-512), which are not the tuning's: it runs once unmeasured and is left out
for nsamples, seqlen, bs in ((4, 128, 2), (4, 128, 2), (2, 512, 2)):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    s = build_settings(bits=4, group_size=128, iters=3, nsamples=nsamples, seqlen=seqlen, batch_size=bs, device="cpu")
    plan = resolve_plan(m, s, ["model.layers"])
    est = estimate_run(m, plan, s, 0, device=torch.device("cpu"))
    ids = torch.randint(0, 256, (nsamples, seqlen))
    libc.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    before = rss("VmRSS:")
    quantize_model(m, plan, s, lambda: [{"input_ids": ids[i:i + bs]} for i in range(0, nsamples, bs)],
                   torch.device("cpu"), progress=False)
    out.append({"tokens": bs * seqlen, "measured": rss("VmHWM:") - before,
                "estimated": (est.host_mib - est.model_mib) * 2**20, "tuning": est.tuning_mib * 2**20})
    del m
print(json.dumps(out[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_tuning_memory_is_within_a_quarter_of_a_measured_run():
    """One Llama block (hidden 512, intermediate 1536, 8 heads / 2 key-value heads: 3.0M tuned weights) tuned
    3 iterations on CPU in a fresh process, its peak RSS over its RSS before (float32 model, so the tuning's
    float32 weights are the model's own), after one unmeasured warm-up run. Measured here (2026-12-07, AMD
    EPYC): 92.5 MiB at 256 tokens per micro-batch (4 x 128, batch 2) and 128.4 MiB at 1024 (2 x 512, batch 2);
    estimated (records + block cache + tuning) 93.7 and 120.8 MiB: 1.01x and 0.94x. Without the warm-up the
    first run also carried about 27 MB of one-time set-up (0.79x, a failure on this machine, though it passed
    on an earlier one). The estimate before the fix (16 bytes per weight, 64 per token x hidden, 2 bf16 cache
    copies) was 0.53x and 0.61x.

    Run with a fixed glibc mmap threshold, as the large tensors of a real model behave: under glibc's default
    (dynamic, up to 32 MiB) threshold, freed activation-sized blocks stay in the heap and the same runs peaked
    at 120.7 and 181.5 MB here (the estimate 0.79x, 0.77x); at 72B sizes every activation is over 32 MiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEASURE], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in json.loads(r.stdout.strip().splitlines()[-1]):
        ratio = row["estimated"] / row["measured"]
        assert 0.8 <= ratio <= 1.25, row


def test_tuning_memory_counts_state_per_weight_and_activations_per_micro_batch():
    """Per tuned weight at least V, its gradient, the qdq's three buffers and the best state (24 B); the
    activations grow with batch_size x seqlen, not with gradient_accumulate_steps (one backward per
    micro-batch)."""
    base = dict(iters=2, nsamples=16, seqlen=64, amp=False)
    ar, plan = _plan(batch_size=8, **base)
    one = estimate_run(ar.model, plan, ar.settings, 0)
    assert one.tuning_mib * MIB >= 24 * BLOCK
    ar, plan = _plan(batch_size=2, gradient_accumulate_steps=4, **base)
    small = estimate_run(ar.model, plan, ar.settings, 0)
    assert small.tuning_mib < one.tuning_mib and small.tflops == one.tflops


# ------------------------------------------------------------------------------------------ (c) the checkpoint
def _packed(out, in_, bits, group=32):
    return out * in_ * bits / 8 + out * (in_ // group) * (2 + bits / 8)  # fp16 scale + packed zero per group


def test_checkpoint_follows_the_plan_layer_by_layer():
    """lm_head is kept FP by default: counted at its dtype (before the fix: at the quantized bits); an 8-bit
    layer_config entry is counted at 8 bits; quant_lm_head counts it packed."""
    ar, plan = _plan(seqlen=64, layer_config={"model.layers.0.mlp.down_proj": {"bits": 8}})
    total = sum(p.numel() * 4 for p in ar.model.parameters())
    quantized = {lp.name: (lp.out_features, lp.in_features) for lp in plan.quantized}
    assert "lm_head" not in quantized and len(quantized) == 14
    expect = total
    for name, (o, i) in quantized.items():
        expect += _packed(o, i, 8 if name == "model.layers.0.mlp.down_proj" else 4) - o * i * 4
    assert ar.estimated_checkpoint_bytes() == checkpoint_bytes(ar.model, plan) == int(expect)
    lm = ar.model.lm_head.weight.numel()
    ar2, plan2 = _plan(seqlen=64, quant_lm_head=True)
    assert "lm_head" in {lp.name for lp in plan2.quantized}
    assert checkpoint_bytes(ar2.model, plan2) < checkpoint_bytes(ar2.model, ar.plan) - 0.8 * lm * 4


def test_checkpoint_estimate_needs_no_resolved_plan():
    ar = AutoRound(tiny_llama(), make_tokenizer(), group_size=32, seqlen=64)
    before = ar.estimated_checkpoint_bytes()  # quantize_and_save checks the free space before the plan exists
    assert before == checkpoint_bytes(ar.model, ar.resolve_plan())


# ------------------------------------------------------------------------------------------ (d) host vs device
def test_host_ram_and_device_memory_are_reported_apart():
    """On a GPU the model and the records are in host RAM, the tuning and the cache on the device (low_gpu_mem_usage:
    the cache in host RAM, one batch on the device); on the CPU everything is one figure."""
    ar, plan = _plan(iters=2, nsamples=8, seqlen=64, batch_size=4)
    cuda = torch.device("cuda")  # on paper: nothing is allocated on it
    gpu = estimate_run(ar.model, plan, ar.settings, 0, device=cuda)
    assert gpu.host_mib == pytest.approx(gpu.model_mib + gpu.records_mib)
    assert gpu.device_mib >= gpu.cache_mib and gpu.device_mib >= gpu.tuning_mib + gpu.cache_tuning_mib
    assert gpu.device_mib < gpu.tuning_mib + gpu.cache_mib + gpu.model_mib  # no longer the sum of all
    text = "\n".join(gpu.lines())
    assert "MiB host RAM and" in text and "MiB on cuda" in text and "block cache" in text and "at peak on cuda" in text
    ar, plan = _plan(iters=2, nsamples=8, seqlen=64, batch_size=4, low_gpu_mem_usage=True)
    low = estimate_run(ar.model, plan, ar.settings, 0, device=cuda)
    assert low.host_mib == pytest.approx(low.model_mib + low.records_mib + low.cache_mib)
    assert low.device_mib < gpu.device_mib and "in host RAM" in "\n".join(low.lines())
    cpu = estimate_run(ar.model, plan, ar.settings, 0, device=torch.device("cpu"))
    assert cpu.device_mib is None and "(the device is the CPU)" in cpu.lines()[-3]
    assert cpu.host_mib >= cpu.model_mib + cpu.records_mib + cpu.cache_mib


def test_offload_dir_files_are_counted_on_disk(tmp_path):
    ar, plan = _plan(iters=2, nsamples=4, seqlen=32, batch_size=2, offload_dir=str(tmp_path))
    est = estimate_run(ar.model, plan, ar.settings, 0, device=torch.device("cuda"))
    copy = 4 * 32 * 64 * 4
    # the copies in use at the loop's peak (3), not one set per unit: each copy's files go when the loop drops it
    # (test_offload.test_files_are_freed_block_by_block...: 12 files = 3 copies of 4 batches, after every unit)
    assert est.cache_where == "offload_dir" and est.offload_mib * MIB == 3 * copy
    assert "offload_dir files up to" in est.lines()[-2]


def test_throughput_is_measured():
    assert measure_flops_per_second(torch.device("cpu"), size=128, seconds=0.05) > 1e6
