"""The fast paths of the inference backends give the former results.

- ``"torch"`` (blocked dequantize + ``F.linear``) against the former whole-layer path
  ``F.linear(x, dequantize_packed(...).to(x.dtype))``: equal weights in every dtype; equal outputs
  in fp32 (one GEMM call, as before); bf16 within 2**-7 of the output's max (blocks are smaller
  GEMMs, not promised to round alike; measured equal on every case here); fp16 within 2**-10 (its
  weight is handed over in ``[out, in]`` order, whose sums round differently).
- ``"torch_cached"`` (dequantize once): the same values, built once, never picked by ``"auto"``.
- ``"cpu_int4"`` on layers with a padded last group (``in_features % group_size != 0``): equal to
  the kernel on the explicitly zero-padded layer, close to ``"torch"``.

No timings here: bench/bench_qlinear.py measures them.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from auto_round.inference import backends
from auto_round.inference.backends import dequantize_packed, dequantize_rows, select_backend
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight

HALF_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # max |y - former| / max |former|


def _qw(out_f, in_f, bits=4, group_size=32, scheme="sym", seed=0, bias=False):
    torch.manual_seed(seed)
    params = QuantParams(bits=bits, group_size=group_size, scheme=scheme)
    codes, scale, zero = quantize_weight(torch.randn(out_f, in_f), params)
    b = torch.randn(out_f) if bias else None
    return QuantizedWeight(codes, scale, zero, bits, group_size, params.sym, bias=b)


def _layer(qw, backend="torch", packing_format="auto_round"):
    layer = QuantLinear.from_quantized(qw, packing_format=packing_format, backend=backend)
    layer.post_init()
    assert layer.backend_name == backend
    return layer


def _former(state, x):
    """The "torch" backend before the blocked path: whole-layer dequantize, one F.linear."""
    w = dequantize_packed(state["qweight"], state["zeros"], state["scales"], state["bits"],
                          state["group_size"], state["in_features"])
    return F.linear(x, w.to(x.dtype))


def _assert_like_former(y, former):
    assert y.dtype == former.dtype and y.shape == former.shape
    if y.dtype in HALF_TOL:
        err = float((y.float() - former.float()).abs().max() / former.float().abs().max())
        assert err <= HALF_TOL[y.dtype], err
    else:
        assert torch.equal(y, former)


# Shapes: whole groups; a padded last group; in*bits not a multiple of 32; in < group_size;
# out_features not a multiple of the block width.
SHAPES = [(96, 256, 32), (48, 96, 64), (1040, 300, 128), (64, 40, 64), (50, 100, 32)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("packing_format", ["auto_round", "auto_round:auto_gptq"])
def test_blocked_weight_rows_equal_dequantize_packed(bits, scheme, packing_format):
    for out_f, in_f, gs in SHAPES:
        qw = _qw(out_f, in_f, bits, gs, scheme)
        state = _layer(qw, packing_format=packing_format)._state
        whole = dequantize_packed(state["qweight"], state["zeros"], state["scales"], bits, gs, in_f)
        assert torch.equal(whole, qw.dequantize(torch.float32))
        for out_major, (start, stop) in itertools.product([False, True], [(0, out_f), (0, 16), (16, out_f)]):
            rows = dequantize_rows(state, start, stop, out_major)
            assert rows.dtype == torch.float32 and torch.equal(rows, whole[start:stop])
            assert (rows.stride(-1) == 1) if out_major else (rows.stride(0) == 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("block", [None, 1 << 12])  # None: the default; 2**12: many small blocks
def test_torch_backend_equals_former_path(bits, scheme, block, monkeypatch):
    if block:
        monkeypatch.setattr(backends, "CPU_BLOCK_WEIGHTS", block)
    for (out_f, in_f, gs), dtype in itertools.product(SHAPES, [torch.float32, torch.bfloat16, torch.float16]):
        layer = _layer(_qw(out_f, in_f, bits, gs, scheme))
        for shape in [(1, in_f), (5, in_f), (2, 3, in_f)]:
            x = torch.randn(*shape).to(dtype)
            _assert_like_former(layer(x), _former(layer._state, x))


def test_blocks_split_half_precision_calls_only(monkeypatch):
    """1040x2048 spans several default-size blocks on CPU, the last one partial; bf16/fp16 calls
    run one GEMM per block, fp32 calls one GEMM for the layer."""
    layer = _layer(_qw(1040, 2048, 4, 128, "asym"))
    rows = backends._block_rows(torch.device("cpu"), 2048, 1040)
    assert rows < 1040 and 1040 % rows
    assert backends._block_rows(torch.device("meta"), 2048, 1040) == 1040  # one block off CPU
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))
    for dtype, n_calls in [(torch.bfloat16, -(-1040 // rows)), (torch.float16, -(-1040 // rows)),
                           (torch.float32, 1)]:
        calls.clear()
        x = torch.randn(3, 2048).to(dtype)
        y = layer(x)
        assert len(calls) == n_calls
        monkeypatch.setattr(F, "linear", linear)
        _assert_like_former(y, _former(layer._state, x))
        monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))


def test_torch_backend_gradients_flow_to_the_input():
    """With autograd on, blocks get their own weight tensors (no scratch reuse)."""
    qw = _qw(1040, 512, 4, 128, "asym", bias=True)
    layer = _layer(qw)
    x = torch.randn(4, 512, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    bias = qw.bias.to(torch.float16).float()
    F.linear(x_ref, qw.dequantize(torch.float32), bias).square().sum().backward()
    assert float((x.grad - x_ref.grad).abs().max() / x_ref.grad.abs().max()) < 1e-5


# ----------------------------------------------------------------------------------------------
# torch_cached


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_cached_equals_torch_backend(bits, scheme):
    for (out_f, in_f, gs), dtype in itertools.product(SHAPES, [torch.float32, torch.bfloat16, torch.float16]):
        qw = _qw(out_f, in_f, bits, gs, scheme, bias=True)
        cached, plain = _layer(qw, "torch_cached"), _layer(qw, "torch")
        x = torch.randn(2, 3, in_f).to(dtype)
        y = cached(x)
        rows = dequantize_rows(cached._state, 0, out_f, out_major=dtype != torch.float32)
        assert torch.equal(cached._state["weight"], rows.to(dtype))
        if dtype == torch.float32:
            assert torch.equal(y, plain(x))
        y_former = _former(cached._state, x) + cached.bias.to(dtype)
        err = float((y.float() - y_former.float()).abs().max() / y_former.float().abs().max())
        assert err <= HALF_TOL.get(dtype, 0.0), err


def test_cached_weight_is_built_once_per_dtype():
    qw = _qw(96, 256, 4, 32)
    layer = _layer(qw, "torch_cached")
    assert "weight" not in layer._state  # nothing is dequantized before the first forward
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    layer(x)
    weight = layer._state["weight"]
    assert weight.shape == (96, 256) and weight.dtype == torch.bfloat16
    assert torch.equal(weight.float(), qw.dequantize(torch.bfloat16).float())
    layer(x)
    assert layer._state["weight"] is weight  # reused
    layer(x.float())
    assert layer._state["weight"].dtype == torch.float32  # another dtype replaces it
    layer.to(torch.float32)  # moving the buffers drops the prepared state, cache included
    assert layer._state is None


def test_cached_weight_built_under_inference_mode_serves_autograd_later():
    qw = _qw(96, 256, 4, 32)
    layer = _layer(qw, "torch_cached")
    with torch.inference_mode():
        layer(torch.randn(1, 256))
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize(torch.float32).sum(0).expand(2, -1))


def test_cached_is_opt_in_only():
    assert not backends.get_backend("torch_cached").auto
    for args in [("cpu", 4, 128, 4096, 4096), ("cpu", 3, 128, 4096, 4096), ("cuda", 4, 128, 4096, 4096),
                 ("cpu", 4, 16, 4096, 4104)]:
        assert select_backend(*args).name != "torch_cached"
    assert select_backend("cpu", 3, 128, 256, 256, requested="torch_cached").name == "torch_cached"
    assert "torch_cached" in backends.list_backends()


# ----------------------------------------------------------------------------------------------
# cpu_int4 on padded last groups

# (out, in, group_size): G = ceil(in / group_size) groups, the last one padded.
RAGGED = [(48, 96, 64), (64, 100, 32), (32, 40, 64), (80, 1000, 128)]


def _padded_equivalent(qw):
    """The same layer with the padded group made whole: extra input columns of code = z."""
    groups = qw.scale.shape[1]
    pad = groups * qw.group_size - qw.in_features
    fill = qw.zero[:, -1:].to(qw.codes.dtype).expand(-1, pad)
    codes = torch.cat([qw.codes, fill], dim=1)
    return QuantizedWeight(codes, qw.scale, qw.zero, qw.bits, qw.group_size, qw.sym, bias=qw.bias)


def test_cpu_int4_is_selected_for_padded_last_groups():
    for out_f, in_f, gs in RAGGED:
        assert select_backend("cpu", 4, gs, in_f, out_f).name == "cpu_int4"
    assert select_backend("cpu", 4, 64, 96, 40).name == "torch"  # out_features % 16 still holds
    with pytest.raises(ValueError, match="out_features % 16"):
        select_backend("cpu", 4, 64, 96, 40, requested="cpu_int4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("packing_format", ["auto_round", "auto_round:auto_gptq", "auto_round:auto_awq"])
def test_cpu_int4_padded_group_equals_padded_layer(dtype, scheme, packing_format, monkeypatch):
    # every token count through the kernel, fp16/fp32 included (by default they take "torch")
    monkeypatch.setitem(backends.CPU_INT4_MAX_TOKENS, dtype, 1 << 20)
    for out_f, in_f, gs in RAGGED:
        qw = _qw(out_f, in_f, 4, gs, scheme, bias=True)
        ragged = _layer(qw, "cpu_int4", packing_format)
        assert ragged._state["pad_inputs"] == qw.scale.shape[1] * gs - in_f > 0
        whole = _layer(_padded_equivalent(qw), "cpu_int4", packing_format)
        assert whole._state["pad_inputs"] == 0
        assert torch.equal(ragged._state["packed"], whole._state["packed"])
        x = torch.randn(2, 3, in_f).to(dtype)
        y = ragged(x)
        assert torch.equal(y, whole(F.pad(x, (0, qw.scale.shape[1] * gs - in_f))))
        ref = _layer(qw, "torch", packing_format)(x)
        err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
        assert err < {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype], err


def test_cpu_int4_padded_layers_logits_match_torch_backend():
    """A small stack of layers with padded last groups (hidden 112, group size 32) and an output
    head: the logits on cpu_int4 (kernel, bf16) match those on the torch backend to bf16 rounding
    (the kernel dequantizes as ``(q - 8) * s + s * (8 - z)`` and sums in its own order)."""
    torch.manual_seed(0)
    specs = [(256, 112), (112, 256), (512, 112)]  # (out, in): up, down, head
    qws = [_qw(o, i, 4, 32, "asym", seed=k, bias=True) for k, (o, i) in enumerate(specs)]

    def logits(backend, x):
        for k, qw in enumerate(qws):
            x = _layer(qw, backend)(x)
            if k < len(qws) - 1:
                x = F.silu(x)
        return x

    x = torch.randn(1, 7, 112, dtype=torch.bfloat16)
    assert backends._cpu_int4_uses_kernel(x)
    y_int4, y_torch = logits("cpu_int4", x), logits("torch", x)
    err = float((y_int4.float() - y_torch.float()).abs().max() / y_torch.float().abs().max())
    assert err < 3e-2, err


def test_cpu_int4_long_calls_take_the_torch_path():
    qw = _qw(96, 256, 4, 32, "asym")
    int4, plain = _layer(qw, "cpu_int4"), _layer(qw, "torch")
    limit = backends.CPU_INT4_MAX_TOKENS[torch.bfloat16]
    x = torch.randn(limit + 1, 256, dtype=torch.bfloat16)
    assert not backends._cpu_int4_uses_kernel(x)
    assert torch.equal(int4(x), plain(x))
    x16 = torch.randn(1, 256, dtype=torch.float16)  # fp16: slower than "torch" at any count
    assert not backends._cpu_int4_uses_kernel(x16)
    assert torch.equal(int4(x16), plain(x16))
    x32 = torch.randn(backends.CPU_INT4_MAX_TOKENS[torch.float32] + 1, 256)
    assert not backends._cpu_int4_uses_kernel(x32)
    assert torch.equal(int4(x32), plain(x32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_int4_kernel_still_serves_every_dtype(dtype, monkeypatch):
    """fp16 calls no longer reach the kernel by default; forced there, it still agrees."""
    monkeypatch.setitem(backends.CPU_INT4_MAX_TOKENS, dtype, 1 << 20)
    qw = _qw(96, 256, 4, 32, "asym", bias=True)
    int4, plain = _layer(qw, "cpu_int4"), _layer(qw, "torch")
    x = torch.randn(2, 3, 256).to(dtype)
    assert backends._cpu_int4_uses_kernel(x)
    y, ref = int4(x), plain(x)
    assert y.dtype == dtype and f"sz_{str(dtype).split('.')[-1]}" in int4._state
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype], err
