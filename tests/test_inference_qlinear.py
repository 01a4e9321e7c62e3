"""QuantLinear against F.linear with the dequantized weight; backend selection and overrides."""

import copy

import pytest
import torch
import torch.nn.functional as F

from auto_round.inference.backends import list_backends, select_backend
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.qdq import QuantParams, quantize_weight
from auto_round.quant.types import QuantizedWeight


def _quantized(out_f=96, in_f=256, bits=4, group_size=32, scheme="sym", bias=True, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(out_f, in_f)
    params = QuantParams(bits=bits, group_size=group_size, scheme=scheme)
    codes, scale, zero = quantize_weight(weight, params)
    b = torch.randn(out_f) if bias else None
    return QuantizedWeight(codes, scale, zero, bits, group_size, params.sym, bias=b)


def _reference(qw, x):
    bias = None if qw.bias is None else qw.bias.to(torch.float16).float()  # bias is stored fp16
    return F.linear(x.float(), qw.dequantize(torch.float32), bias)


def _rel_err(y, ref):
    return float((y.float() - ref).abs().max() / ref.abs().max())


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("backend", ["torch", "torch_cached", "cpu_int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("packing_format", ["auto_round", "auto_round:auto_gptq"])
def test_matches_dequantized_linear(backend, dtype, scheme, packing_format):
    qw = _quantized(scheme=scheme)
    layer = QuantLinear.from_quantized(qw, packing_format=packing_format, backend=backend)
    x = torch.randn(2, 3, qw.in_features).to(dtype)
    y = layer(x)
    assert layer.backend_name == backend
    assert y.shape == (2, 3, qw.out_features) and y.dtype == dtype
    assert _rel_err(y, _reference(qw, x)) < TOL[dtype]


def test_sym_scales_include_negative_values():
    qw = _quantized(scheme="sym")
    assert (qw.scale < 0).any() and (qw.scale > 0).any()
    layer = QuantLinear.from_quantized(qw, "auto_round:auto_gptq")
    assert (layer.scales < 0).any()


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7, 8])
def test_torch_backend_other_bit_widths(bits):
    qw = _quantized(out_f=64, in_f=128, bits=bits, scheme="asym", bias=False)
    layer = QuantLinear.from_quantized(qw, "auto_round")
    x = torch.randn(5, 128)
    assert _rel_err(layer(x), _reference(qw, x)) < 1e-5
    assert layer.backend_name == "torch"  # cpu_int4 is 4-bit only


@pytest.mark.parametrize("backend", ["torch", "torch_cached", "cpu_int4"])
def test_ragged_last_group(backend):
    qw = _quantized(out_f=48, in_f=96, group_size=64, bias=False)
    layer = QuantLinear.from_quantized(qw, backend=backend)
    assert layer.scales.shape == (2, 48)
    x = torch.randn(3, 96)
    assert _rel_err(layer(x), _reference(qw, x)) < 1e-5
    assert layer.backend_name == backend
    # 96 % 64 != 0: cpu_int4 pads the last group (tests/test_backends_speedpaths.py)
    assert QuantLinear.from_quantized(qw).select().name == "cpu_int4"


def test_buffer_shapes_and_dtypes():
    layer = QuantLinear.from_quantized(_quantized(out_f=96, in_f=256, bits=4, group_size=32))
    assert layer.qweight.shape == (256 * 4 // 32, 96) and layer.qweight.dtype == torch.int32
    assert layer.qzeros.shape == (8, 96 * 4 // 32) and layer.qzeros.dtype == torch.int32
    assert layer.scales.shape == (8, 96) and layer.scales.dtype == torch.float16
    assert layer.bias.dtype == torch.float16
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "bias"}


def test_state_is_rebuilt_after_buffers_change():
    qw = _quantized(bias=False)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(2, qw.in_features)
    layer(x)
    assert layer.backend_name == "cpu_int4"
    other = QuantLinear.from_quantized(_quantized(bias=False, seed=1))
    layer.load_state_dict(other.state_dict())
    assert torch.allclose(layer(x), other(x), atol=1e-4)
    moved = copy.deepcopy(layer).to(torch.float32)  # _apply resets the prepared state
    assert moved.backend_name is None


def test_auto_selection():
    assert select_backend("cpu", 4, 128, 4096, 4096).name == "cpu_int4"
    assert select_backend("cpu", 4, 128, 4096, 4104).name == "torch"  # out % 16 != 0
    assert select_backend("cpu", 4, 16, 4096, 4096).name == "torch"  # group size 16
    assert select_backend("cpu", 3, 128, 4096, 4096).name == "torch"
    assert select_backend("cuda", 4, 128, 4096, 4096).name == "torch"
    assert select_backend("cpu", 4, 128, 576, 1536).name == "cpu_int4"
    assert select_backend("cpu", 4, 128, 1000, 4096).name == "cpu_int4"  # padded last group
    assert list_backends()[0] == "cpu_int4" and "torch" in list_backends()
    assert list_backends()[-1] == "torch_cached"  # opt-in: never picked by "auto"


def test_override_errors_are_explicit():
    with pytest.raises(ValueError, match="bits=3"):
        select_backend("cpu", 3, 128, 256, 256, requested="cpu_int4")
    with pytest.raises(ValueError, match="group_size"):
        select_backend("cpu", 4, 512, 1024, 256, requested="cpu_int4")
    with pytest.raises(ValueError, match="out_features % 16"):
        select_backend("cpu", 4, 32, 256, 40, requested="cpu_int4")
    with pytest.raises(ValueError, match="device type 'cuda'"):
        select_backend("cuda", 4, 32, 256, 256, requested="cpu_int4")
    with pytest.raises(ValueError, match="valid"):
        select_backend("cpu", 4, 32, 256, 256, requested="marlin")
    assert select_backend("cpu", 4, 32, 256, 256, requested="torch").name == "torch"
    assert select_backend("cpu", 3, 16, 100, 40, requested="torch_cached").name == "torch_cached"


def test_layer_with_unrunnable_override_fails_on_first_use():
    layer = QuantLinear.from_quantized(_quantized(bits=3), "auto_round", backend="cpu_int4")
    with pytest.raises(ValueError, match="cpu_int4"):
        layer(torch.randn(1, 256))


def test_cpu_int4_rejects_float64_inputs():
    layer = QuantLinear.from_quantized(_quantized(), backend="cpu_int4")
    with pytest.raises(TypeError, match="cpu_int4"):
        layer(torch.randn(1, 256, dtype=torch.float64))
