"""Pure-math tests of quantize-dequantize against hand-computed values."""

import pytest
import torch

from auto_round.quant.qdq import QuantParams, dequantize, group_view, qdq_weight, quantize_weight


def test_sym_full_range_positive_extreme_gets_negative_scale():
    # A = 1, B = 2 -> M = 2, B >= A -> s = -2/8; 2 maps to level -8 (code 0).
    w = torch.tensor([[-1.0, 0.5, 0.25, 2.0]])
    codes, s, z = quantize_weight(w, QuantParams(4, 4, "sym"))
    assert s.item() == -0.25 and z.item() == 8
    assert codes.tolist() == [[12, 6, 7, 0]]
    assert torch.equal(qdq_weight(w, QuantParams(4, 4, "sym")), w)


def test_sym_full_range_negative_extreme_positive_scale():
    w = torch.tensor([[-2.0, 1.0, 0.3, 0.0]])
    codes, s, z = quantize_weight(w, QuantParams(4, 4, "sym"))
    assert s.item() == 0.25
    assert codes.tolist() == [[0, 12, 9, 8]]
    assert torch.allclose(qdq_weight(w, QuantParams(4, 4, "sym")), torch.tensor([[-2.0, 1.0, 0.25, 0.0]]))


def test_asym_two_bits():
    w = torch.tensor([[-1.0, 0.0, 0.4, 2.0]])
    codes, s, z = quantize_weight(w, QuantParams(2, 4, "asym"))
    assert s.item() == 1.0 and z.item() == 1
    assert codes.tolist() == [[0, 1, 1, 3]]
    assert torch.allclose(qdq_weight(w, QuantParams(2, 4, "asym")), torch.tensor([[-1.0, 0.0, 0.0, 2.0]]))


def test_gptq_sym_grid():
    w = torch.tensor([[-1.0, 0.5]])
    p = QuantParams(4, 2, "sym_gptq")
    codes, s, z = quantize_weight(w, p)
    assert z.item() == 8
    assert abs(s.float().item() - 2 / 15) < 1e-3
    assert codes.tolist() == [[0, 12]]  # round(-7.5) = -8 (half to even), round(3.75) = 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym", "sym_gptq"])
@pytest.mark.parametrize("gs,in_", [(32, 64), (64, 64), (128, 200), (7, 30)])
def test_codes_dequantize_to_qdq(bits, scheme, gs, in_):
    torch.manual_seed(0)
    w = torch.randn(6, in_)
    p = QuantParams(bits, gs, scheme)
    codes, s, z = quantize_weight(w, p)
    assert codes.shape == (6, in_) and s.shape == (6, -(-in_ // gs)) and s.dtype == torch.float16
    assert int(codes.max()) <= 2**bits - 1
    assert torch.allclose(dequantize(codes, s, z, gs), qdq_weight(w, p), atol=1e-5)
    err = (qdq_weight(w, p) - w).abs().mean()
    assert err < w.abs().mean() * {2: 0.6, 3: 0.35}.get(bits, 0.25)


def test_padded_last_group_uses_only_real_values():
    w = torch.tensor([[1.0, -1.0, 0.5, 0.25, 8.0]])
    gv = group_view(w, 4)
    assert gv.shape == (1, 2, 4) and gv[0, 1].tolist() == [8.0, 0, 0, 0]
    out = qdq_weight(w, QuantParams(4, 4, "sym"))
    assert out.shape == (1, 5) and out[0, 4].item() == 8.0


def test_scale_is_fp16_representable_and_clamped():
    w = torch.zeros(2, 8)
    codes, s, z = quantize_weight(w, QuantParams(4, 8, "sym"))
    assert torch.all(s.float().abs() >= 1e-5 * 0.99)
    assert torch.equal(dequantize(codes, s, z, 8), torch.zeros(2, 8))


def test_straight_through_gradients_reach_v_alpha_beta():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    p = QuantParams(4, 8, "asym")
    v = torch.zeros(4, 16, requires_grad=True)
    a = torch.ones(4, 2, requires_grad=True)
    b = torch.ones(4, 2, requires_grad=True)
    qdq_weight(w, p, v, a, b).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_v_shifts_rounding_by_one_level():
    w = torch.tensor([[0.0, 0.26, -1.0, 0.5]])  # A > B: s = +1/8, 0.26/s = 2.08
    p = QuantParams(4, 4, "sym")
    base = quantize_weight(w, p)[0]
    shifted = quantize_weight(w, p, v=torch.tensor([[0.0, 0.45, 0.0, 0.0]]))[0]
    assert int(shifted[0, 1]) - int(base[0, 1]) == 1


def test_clip_factors_shrink_the_range():
    w = torch.tensor([[-1.0, 0.0, 0.5, 4.0]])
    p = QuantParams(4, 4, "asym")
    _, s_full, _ = quantize_weight(w, p)
    _, s_clip, _ = quantize_weight(w, p, alpha=torch.ones(1, 1), beta=torch.full((1, 1), 0.5))
    assert s_clip.item() < s_full.item()


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="bits=9"):
        QuantParams(9, 32)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantParams(4, 0)
