"""The tuner: beats round-to-nearest, changes every planned layer, is deterministic; every knob does what it says."""

import copy

import pytest
import torch

from auto_round.config import build_settings
from auto_round.tuning.loop import quantize_model
from auto_round.tuning.plan import resolve_plan
from auto_round.tuning.wrapper import rtn_quantize
from tiny_models import tiny_llama, tiny_qwen2

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading overhead dominates on 2 busy cores
    yield
    torch.set_num_threads(n)


def _batches(n=16, seqlen=32, bs=8, seed=0):
    ids = torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i:i + bs]} for i in range(0, n, bs)]


def _run(model, data=None, **kw):
    s = build_settings(**{"group_size": 32, "nsamples": 16, "seqlen": 32, "batch_size": 8, **kw})
    plan = resolve_plan(model, s, ["model.layers"])
    data = _batches() if data is None else data
    return quantize_model(model, plan, s, lambda: data, CPU, progress=False)


def _same_layers(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scale, b[k].scale)
                                        and torch.equal(a[k].zero, b[k].zero) for k in a)


@torch.no_grad()
def _output_mse(ref, model, data):
    return sum(((model(**b).logits - ref(**b).logits) ** 2).mean().item() for b in data)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_tuned_beats_round_to_nearest(factory):
    fp = factory()
    rtn, tuned = copy.deepcopy(fp), copy.deepcopy(fp)
    _run(rtn, bits=2, iters=0, disable_opt_rtn=True)
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


KNOBS = [{"nblocks": 2}, {"gradient_accumulate_steps": 2}, {"enable_minmax_tuning": False},
         {"enable_quanted_input": False}, {"not_use_best_mse": True}, {"low_gpu_mem_usage": True}, {"sym": False},
         {"sym_style": "gptq"}, {"offload_dir": "OFFLOAD"}]


@pytest.mark.parametrize("kw", KNOBS, ids=lambda kw: next(iter(kw)))
def test_knobs_run_and_reduce_loss(kw, tmp_path):
    """With every knob the tuning still works: each unit's best loss is clearly below its first (round-to-nearest)
    loss (measured: at most 0.76x with bits=2, iters=10). What each knob changes is checked by the tests below."""
    if kw.get("offload_dir"):
        kw = {"offload_dir": str(tmp_path / "cache")}
    _, results = _run(tiny_llama(), **{"bits": 2, "iters": 10, **kw})
    assert results and all(r.best_loss < 0.9 * r.first_loss for r in results), results


def _linears(model, prefix):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}


def test_nblocks_tunes_consecutive_blocks_as_one_unit():
    """nblocks=2 on three blocks: one unit of blocks 0 and 1 (tuned together), then block 2 alone."""
    model = tiny_llama(layers=3)
    _, results = _run(model, bits=2, iters=5, nblocks=2)
    assert [r.name for r in results] == ["model.layers.0,model.layers.1", "model.layers.2"]
    assert set(results[0].layers) == _linears(model, "model.layers.0.") | _linears(model, "model.layers.1.")
    assert set(results[1].layers) == _linears(model, "model.layers.2.")


def test_gradient_accumulation_runs_k_micro_batches_per_step(monkeypatch):
    """gradient_accumulate_steps=2: every step is a forward and a backward on each of two different batches, then
    one sign step; the result differs from one batch per step."""
    from auto_round.tuning import block

    data = _batches(bs=4)  # four batches
    plain, _ = _run(tiny_llama(), data=data, bits=2, iters=6)
    log = []
    real_fwd, real_step, real_bwd = block.run_unit_amp, block._sign_step, torch.Tensor.backward

    def fwd(blocks, hidden, *a, **k):
        log.append(("f", hidden.sum().item()))
        return real_fwd(blocks, hidden, *a, **k)

    def bwd(self, *a, **k):
        log.append(("b", None))
        return real_bwd(self, *a, **k)

    def step(*a, **k):
        log.append(("s", None))
        return real_step(*a, **k)

    monkeypatch.setattr(block, "run_unit_amp", fwd)
    monkeypatch.setattr(block, "_sign_step", step)
    monkeypatch.setattr(torch.Tensor, "backward", bwd)
    accumulated, results = _run(tiny_llama(), data=data, bits=2, iters=6, gradient_accumulate_steps=2)
    monkeypatch.undo()
    assert len(results) == 2 and len(log) == 2 * 6 * 5  # 2 units x 6 steps x (f, b, f, b, s)
    for i in range(0, len(log), 5):
        (f1, x1), (b1, _), (f2, x2), (b2, _), (s, _) = log[i:i + 5]
        assert (f1, b1, f2, b2, s) == ("f", "b", "f", "b", "s") and x1 != x2, log[i:i + 5]
    assert not _same_layers(plain, accumulated)


def _plan_params(model, **kw):
    s = build_settings(**{"group_size": 32, "bits": 2, **kw})
    return {lp.name: lp.params for lp in resolve_plan(model, s, ["model.layers"]).quantized}


def test_without_minmax_tuning_scales_stay_round_to_nearest():
    """enable_minmax_tuning=False: only the rounding is tuned, every scale and zero point is round-to-nearest's;
    by default the clip factors change some scales."""
    fp = tiny_llama()
    rtn = {n: rtn_quantize(copy.deepcopy(fp.get_submodule(n)), p) for n, p in _plan_params(fp).items()}
    off, _ = _run(copy.deepcopy(fp), bits=2, iters=10, enable_minmax_tuning=False)
    on, _ = _run(copy.deepcopy(fp), bits=2, iters=10)
    assert off.keys() == rtn.keys() == on.keys()
    assert all(torch.equal(off[n].scale, rtn[n].scale) and torch.equal(off[n].zero, rtn[n].zero) for n in rtn)
    assert any(not torch.equal(off[n].codes, rtn[n].codes) for n in rtn)  # the rounding was tuned
    assert any(not torch.equal(on[n].scale, rtn[n].scale) for n in rtn)


def _record_unit_io(monkeypatch):
    """Spy on the loop's tune_unit: per unit, the cached inputs it is tuned on and its FP targets."""
    from auto_round.tuning import loop

    seen, real = [], loop.tune_unit

    def spy(root, name, blocks, layers, inputs, targets, *a, **k):
        seen.append(([x.to("cpu") for x in inputs], [t.to("cpu") for t in targets]))
        return real(root, name, blocks, layers, inputs, targets, *a, **k)

    monkeypatch.setattr(loop, "tune_unit", spy)
    return seen


@torch.no_grad()
def _block1_inputs(model, data):
    return [model(**b, output_hidden_states=True).hidden_states[1] for b in data]


def test_quanted_input_feeds_the_quantized_chain_and_disabling_it_the_fp_chain(monkeypatch):
    """Block 1 is tuned on the output of the quantized block 0 (as the quantized model computes it); with
    enable_quanted_input=False, on block 0's FP output (block 0's own targets). amp off: plain float32 forwards."""
    data, fp = _batches(), tiny_llama()
    fp_h1 = _block1_inputs(fp, data)
    runs = {}
    for flag in (True, False):
        seen = _record_unit_io(monkeypatch)
        model = copy.deepcopy(fp)
        _run(model, data=data, bits=2, iters=10, amp=False, enable_quanted_input=flag)
        monkeypatch.undo()
        assert len(seen) == 2
        runs[flag] = (model, seen)
    (_, off), (q_model, on) = runs[False], runs[True]
    assert all(torch.equal(x, t) for x, t in zip(off[1][0], off[0][1]))
    assert all(torch.allclose(x, h, atol=1e-5) for x, h in zip(off[1][0], fp_h1))
    assert all(torch.allclose(x, h, atol=1e-5) for x, h in zip(on[1][0], _block1_inputs(q_model, data)))
    assert all((x - h).abs().max() > 1e-2 for x, h in zip(on[1][0], fp_h1))
    assert all(torch.equal(t, h) for t, h in zip(on[1][1], off[1][1]))  # the FP targets are the same either way


def test_not_use_best_mse_keeps_the_last_state_not_the_best(monkeypatch):
    """By default the parameters of the best iteration are restored; not_use_best_mse=True keeps the state after
    the last step. One block, amp off, where the best iteration is not the last one (measured: 10 of 0..11)."""
    from auto_round.tuning import block, wrapper

    real_step, real_finalize = block._sign_step, wrapper.TunableLinear.finalize
    runs = {}
    for flag in (False, True):
        states, final = [], []  # the parameters before and after every step; those finalized

        def step(wrappers, *a, **k):
            states.append([w.snapshot() for w in wrappers])
            real_step(wrappers, *a, **k)
            states.append([w.snapshot() for w in wrappers])

        def finalize(self):
            final.append(self.snapshot())
            return real_finalize(self)

        monkeypatch.setattr(block, "_sign_step", step)
        monkeypatch.setattr(wrapper.TunableLinear, "finalize", finalize)
        layers, (res,) = _run(tiny_llama(layers=1), bits=2, iters=12, amp=False, not_use_best_mse=flag)
        monkeypatch.undo()
        runs[flag] = layers, res, states[0::2], states[-1], final

    def equal(a, b):
        return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    best_layers, res, at_iter, last, final = runs[False]
    assert res.best_iter < 11 and res.best_loss < res.last_loss and not equal(at_iter[res.best_iter], last), res
    assert equal(final, at_iter[res.best_iter])
    last_layers, res, _, last, final = runs[True]
    assert equal(final, last)
    assert not _same_layers(best_layers, last_layers)


def test_asym_zero_points_vary_per_group():
    """sym=False: zero points are per group (several values in every layer, not only the sym 2^(b-1)) and scales
    positive; sym keeps every zero point at 2^(b-1) = 2."""
    asym, _ = _run(tiny_llama(), bits=2, iters=10, sym=False)
    sym, _ = _run(tiny_llama(), bits=2, iters=10)
    for n in sym:
        assert sym[n].sym and bool((sym[n].zero == 2).all()), n
        a = asym[n]
        assert not a.sym and a.zero.unique().numel() > 1 and bool((a.zero != 2).any()), (n, a.zero.unique())
        assert bool((a.scale > 0).all()) and int(a.zero.min()) >= 0 and int(a.zero.max()) <= 3


def test_sym_style_picks_the_grid():
    """With the clip factors off, scales follow each group's range (lo = min(0, min W), hi = max(0, max W),
    M = max(-lo, hi); quant/qdq.py): full_range s = M / 2^(b-1), negative when hi >= -lo, so the larger-magnitude
    extreme is level -2^(b-1) and all 2^b levels are used; gptq s = 2M / (2^b - 1), always positive."""
    fp = tiny_llama()
    full, _ = _run(copy.deepcopy(fp), bits=2, iters=5, enable_minmax_tuning=False)
    gptq, _ = _run(copy.deepcopy(fp), bits=2, iters=5, enable_minmax_tuning=False, sym_style="gptq")
    for n in full:
        g = fp.get_submodule(n).weight.detach().reshape(-1, 32)
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        m = torch.maximum(-lo, hi)
        want_full, want_gptq = torch.where(-lo > hi, m, -m) / 2, 2 * m / 3
        assert torch.allclose(full[n].scale.float().reshape(-1), want_full, rtol=2e-3, atol=0), n
        assert torch.allclose(gptq[n].scale.float().reshape(-1), want_gptq, rtol=2e-3, atol=0), n
        assert bool((full[n].zero == 2).all()) and bool((gptq[n].zero == 2).all())
    assert any(bool((full[n].scale < 0).any()) for n in full)


def test_low_gpu_mem_usage_is_bit_identical_on_cpu():
    """On CPU, low_gpu_mem_usage only keeps the cached activations on the CPU, where they already are: result and
    losses must be bit-identical to the default's (its memory saving needs a GPU to show)."""
    la, ra = _run(tiny_llama(), bits=2, iters=10)
    lb, rb = _run(tiny_llama(), bits=2, iters=10, low_gpu_mem_usage=True)
    assert _same_layers(la, lb)
    assert [(r.first_loss, r.best_loss, r.best_iter) for r in ra] == [(r.first_loss, r.best_loss, r.best_iter)
                                                                        for r in rb]


def test_plain_rtn_needs_no_data():
    model = tiny_llama()
    s = build_settings(iters=0, disable_opt_rtn=True, group_size=32)
    plan = resolve_plan(model, s, ["model.layers"])

    def no_data():
        raise AssertionError("round-to-nearest must not ask for calibration data")

    layers, results = quantize_model(model, plan, s, no_data, CPU, progress=False)
    assert len(layers) == 14 and results == []


def test_disk_offload_writes_files_gives_the_same_result_and_cleans_up(tmp_path, monkeypatch):
    """offload_dir: the cached activations go to files under that folder (the tuning reads them back from there),
    the result equals the in-memory run's, and the files are removed afterwards."""
    from auto_round.calib import store

    written, read = [], []
    real_init, real_to = store.DiskTensor.__init__, store.DiskTensor.to

    def init(self, tensor, path):
        real_init(self, tensor, path)
        written.append((path, path.is_file()))

    def to(self, *a, **k):
        read.append((self.path, self.path.is_file()))
        return real_to(self, *a, **k)

    monkeypatch.setattr(store.DiskTensor, "__init__", init)
    monkeypatch.setattr(store.DiskTensor, "to", to)
    la, _ = _run(tiny_llama(), bits=2, iters=5)
    assert not written  # in memory by default
    cache = tmp_path / "cache"
    lb, _ = _run(tiny_llama(), bits=2, iters=5, offload_dir=str(cache))
    # per batch (2): the captured input, then per unit (2) the FP targets and the quantized outputs
    assert len(written) == 2 * (1 + 2 * 2) and all(ok and cache in p.parents for p, ok in written), written
    assert read and all(ok for _, ok in read) and {p for p, _ in read} <= {p for p, _ in written}
    assert _same_layers(la, lb)
    assert list(cache.iterdir()) == [] and not any(p.exists() for p, _ in written)


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


def test_never_worse_than_the_starting_point():
    """A unit keeps its starting point (here round-to-nearest: the plain tuner's) when that has the lower output error over all the
    calibration batches: the best iteration is picked by one batch's loss, so with a learning rate far too high
    (lr 5, 4 iterations) and one easy batch (a repeated token), it picks a state far worse on the rest (measured:
    output error 1.9e-3 vs 8.4e-5 at RTN). Then the records are RTN's, bit for bit; at the default settings the
    tuned result is kept and is below its start."""
    hard = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": hard}, {"input_ids": torch.full((8, 32), 7)}]
    rtn_layers, _ = _run(tiny_llama(), data, bits=2, iters=0, disable_opt_rtn=True)
    layers, results = _run(tiny_llama(), data, bits=2, iters=4, lr=5.0, minmax_lr=5.0, enable_alg_ext=False)
    for r in results:
        assert r.kept_start and r.start_output_error < r.output_error, r
    assert _same_layers(layers, rtn_layers)
    _, results = _run(tiny_llama(), data, bits=2, iters=12)
    for r in results:
        assert not r.kept_start and r.output_error < r.start_output_error, r


def test_torch_compile_tunes_through_the_compiled_forward_with_eager_like_results():
    """``enable_torch_compile``: the tuning forward runs through one compiled ``run_unit`` (both blocks of the tiny
    Llama share its graph: one frame compiled); losses and records as eager up to float rounding (inductor's fused
    kernels sum in another order): first losses equal within 1e-3 (measured 3e-4: the loss is a squared difference of
    outputs, so their 1e-7 relative rounding weighs more in it), best losses within 25% (20 iterations of
    sign steps amplify a rounding difference into another path), records on the same grid."""
    import torch._dynamo

    from auto_round.tuning import block

    torch._dynamo.reset()
    block._COMPILED.clear()
    data = _batches()
    eager_layers, eager = _run(tiny_llama(), data, bits=2, iters=20)
    compiled_layers, compiled = _run(tiny_llama(), data, bits=2, iters=20, enable_torch_compile=True)
    assert "run_unit" in block._COMPILED
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert abs(compiled[0].first_loss - eager[0].first_loss) <= 1e-3 * eager[0].first_loss
    for e, c in zip(eager, compiled):
        assert c.best_loss < c.first_loss * 0.9 and abs(c.best_loss - e.best_loss) <= 0.25 * e.best_loss, (e, c)
    for k, qw in compiled_layers.items():
        assert qw.codes.shape == eager_layers[k].codes.shape and int(qw.codes.max()) <= 3
    block._COMPILED.clear()


def test_token_norm_loss_weighs_every_token_alike():
    """ExtendedTuner.token_norm: a token whose hidden state (and error) is 100x larger, an attention sink,
    counts as much as the others instead of 10^4 times more."""
    from auto_round.tuning.block import squared_error

    torch.manual_seed(0)
    target = torch.randn(1, 4, 8)
    out = target + 0.1 * torch.randn(1, 4, 8)
    big_t, big_o = target.clone(), out.clone()
    big_t[0, 0] *= 100
    big_o[0, 0] *= 100
    plain, n = squared_error(out, target, None)
    plain_big, _ = squared_error(big_o, big_t, None)
    norm, _ = squared_error(out, target, None, token_norm=True)
    norm_big, _ = squared_error(big_o, big_t, None, token_norm=True)
    assert n == 32 and float(plain_big) > 100 * float(plain)
    assert torch.allclose(norm_big, norm, rtol=1e-5)
    mask = torch.tensor([[True, True, False, True]])
    masked, m = squared_error(out, target, mask, token_norm=True)
    per_token = ((out - target) ** 2 / target.pow(2).mean(-1, keepdim=True)).sum(-1)[0]
    assert m == 24 and torch.allclose(masked, per_token[[0, 1, 3]].sum(), rtol=1e-5)
