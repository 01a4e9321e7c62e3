"""The tuner: beats round-to-nearest, changes every planned layer, is deterministic."""

import copy

import pytest
import torch

from auto_round.config import build_settings
from auto_round.tuning.loop import quantize_model
from auto_round.tuning.plan import resolve_plan
from tiny_models import tiny_llama, tiny_qwen2

CPU = torch.device("cpu")


def _batches(n=16, seqlen=32, bs=8, seed=0):
    ids = torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i:i + bs]} for i in range(0, n, bs)]


def _run(model, **kw):
    s = build_settings(**{"group_size": 32, "nsamples": 16, "seqlen": 32, "batch_size": 8, **kw})
    plan = resolve_plan(model, s, ["model.layers"])
    data = _batches()
    return quantize_model(model, plan, s, lambda: data, CPU, progress=False)


@torch.no_grad()
def _output_mse(ref, model, data):
    return sum(((model(**b).logits - ref(**b).logits) ** 2).mean().item() for b in data)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_tuned_beats_round_to_nearest(factory):
    fp = factory()
    rtn, tuned = copy.deepcopy(fp), copy.deepcopy(fp)
    _run(rtn, bits=2, iters=0)
    _, results = _run(tuned, bits=2, iters=30)
    assert len(results) == 2
    for r in results:
        assert r.best_loss < r.first_loss * 0.9, r
    held_out = _batches(seed=1)
    assert _output_mse(fp, tuned, held_out) < _output_mse(fp, rtn, held_out)


def test_every_planned_layer_changed_and_on_grid():
    fp = tiny_llama()
    model = copy.deepcopy(fp)
    layers, _ = _run(model, bits=3, iters=5)
    plan_names = {n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(layers) == plan_names
    for name in plan_names:
        w0, w1 = fp.get_submodule(name).weight, model.get_submodule(name).weight
        assert not torch.equal(w0, w1), name
        assert torch.allclose(w1, layers[name].dequantize(), atol=1e-6)
        groups = w1.reshape(w1.shape[0], -1, 32)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 8
    assert torch.equal(fp.lm_head.weight, model.lm_head.weight)


def test_same_seed_same_output_different_seed_differs():
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    la, _ = _run(a, bits=2, iters=10, seed=7)
    lb, _ = _run(b, bits=2, iters=10, seed=7)
    lc, _ = _run(c, bits=2, iters=10, seed=8, nsamples=16)
    assert all(torch.equal(la[k].codes, lb[k].codes) and torch.equal(la[k].scale, lb[k].scale) for k in la)
    assert any(not torch.equal(la[k].codes, lc[k].codes) for k in la)


@pytest.mark.parametrize("kw", [{"nblocks": 2}, {"gradient_accumulate_steps": 2, "batch_size": 4},
                                {"enable_minmax_tuning": False}, {"enable_quanted_input": False},
                                {"not_use_best_mse": True}, {"low_gpu_mem_usage": True}, {"sym": False},
                                {"sym_style": "gptq"}, {"offload_dir": "OFFLOAD"}])
def test_knobs_run_and_reduce_loss(kw, tmp_path):
    if kw.get("offload_dir"):
        kw = {"offload_dir": str(tmp_path / "cache")}
    _, results = _run(tiny_llama(), **{"bits": 2, "iters": 10, **kw})
    assert results and all(r.best_loss <= r.first_loss for r in results)
    if kw.get("nblocks") == 2:
        assert len(results) == 1 and results[0].name == "model.layers.0,model.layers.1"


def test_rtn_needs_no_data():
    model = tiny_llama()
    s = build_settings(iters=0, group_size=32)
    plan = resolve_plan(model, s, ["model.layers"])

    def no_data():
        raise AssertionError("round-to-nearest must not ask for calibration data")

    layers, results = quantize_model(model, plan, s, no_data, CPU, progress=False)
    assert len(layers) == 14 and results == []


def test_disk_offload_gives_the_same_result_and_cleans_up(tmp_path):
    a, b = tiny_llama(), tiny_llama()
    la, _ = _run(a, bits=2, iters=5)
    lb, _ = _run(b, bits=2, iters=5, offload_dir=str(tmp_path / "cache"))
    assert all(torch.equal(la[k].codes, lb[k].codes) for k in la)
    assert list((tmp_path / "cache").iterdir()) == []


def test_amp_dtype_choice(monkeypatch):
    from auto_round.tuning import block

    s_on, s_off = build_settings(amp=True), build_settings(amp=False)
    monkeypatch.setattr(block, "cpu_has_fast_bf16", lambda: True)
    assert block.amp_dtype(CPU, s_on, torch.float32) is torch.bfloat16
    assert block.amp_dtype(CPU, s_off, torch.float32) is None
    monkeypatch.setattr(block, "cpu_has_fast_bf16", lambda: False)
    assert block.amp_dtype(CPU, s_on, torch.float32) is None
    cuda = torch.device("cuda")
    assert block.amp_dtype(cuda, s_on, torch.float16) is torch.float16
    assert block.amp_dtype(cuda, s_on, torch.float32) is torch.bfloat16


@pytest.mark.parametrize("amp", [True, False])
def test_tuning_under_autocast_and_without_both_beat_rtn(amp, monkeypatch):
    from auto_round.tuning import block

    monkeypatch.setattr(block, "cpu_has_fast_bf16", lambda: True)  # autocast on any CPU
    seen = []
    real = block.run_unit

    def spy(blocks, hidden, extra):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(blocks, hidden, extra)

    monkeypatch.setattr(block, "run_unit", spy)
    _, results = _run(tiny_llama(), bits=2, iters=10, amp=amp)
    # Targets, tuned steps and the next block's inputs all run the same way.
    assert seen and set(seen) == {amp}
    assert all(r.best_loss < r.first_loss for r in results)


class _WritesIntoFloat32(torch.nn.Module):
    """A block that fills a preallocated float32 buffer with a Linear's output (as CogVLM2's experts
    do): under bf16 autocast that raises a dtype error."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        out = torch.empty(x.shape, dtype=torch.float32)
        out[...] = 0
        out.index_put_((torch.arange(x.shape[0]),), self.proj(x))
        return x + out


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_WritesIntoFloat32(), _WritesIntoFloat32()])

    def forward(self, x, **_):  # the capture passes use_cache=False
        for b in self.layers:
            x = b(x)
        return x


def test_block_that_cannot_run_under_autocast_falls_back_to_float32(monkeypatch, caplog):
    from auto_round.tuning import block

    monkeypatch.setattr(block, "cpu_has_fast_bf16", lambda: True)
    torch.manual_seed(0)
    model = _Stack()
    with pytest.raises(RuntimeError, match="dtype"):  # the premise: this block fails under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.layers[0](torch.randn(4, 32))
    s = build_settings(group_size=32, nsamples=8, seqlen=4, batch_size=4, bits=2, iters=5)
    plan = resolve_plan(model, s, ["layers"])
    data = [{"x": torch.randn(4, 4, 32)} for _ in range(2)]
    with caplog.at_level("WARNING"):
        layers, results = quantize_model(model, plan, s, lambda: data, CPU, progress=False)
    assert set(layers) == {"layers.0.proj", "layers.1.proj"} and len(results) == 2
    assert "autocast failed" in caplog.text and "float32" in caplog.text
