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


def _qdq_autograd(w, p, v, a, b):
    """The op-by-op expression the fused qdq must equal (values and straight-through gradients)."""
    from auto_round.quant.qdq import round_ste, scale_zero

    out, in_ = w.shape
    wg = group_view(w, p.group_size)
    s, z = scale_zero(wg, p, a, b)
    x = wg / s + v.reshape(wg.shape)
    q = (round_ste(x) + z).clamp(0, p.maxq)
    return (s * (q - z)).reshape(out, -1)[:, :in_]


@pytest.mark.parametrize("scheme", ["sym", "asym", "sym_gptq"])
@pytest.mark.parametrize("bits,gs,in_", [(4, 8, 24), (2, 8, 20), (3, 16, 16), (8, 4, 10)])
def test_fused_qdq_matches_op_by_op_autograd(scheme, bits, gs, in_):
    torch.manual_seed(bits * 100 + gs + in_)
    p = QuantParams(bits, gs, scheme)
    w = torch.randn(6, in_, requires_grad=True)
    g = -(-in_ // gs)
    # Clip factors below 1 push some codes past the clamp, so both branches of the mask are hit.
    v0 = (torch.rand(6, g * gs) - 0.5)
    a0, b0 = torch.rand(6, g) * 0.5 + 0.5, torch.rand(6, g) * 0.5 + 0.5
    upstream = torch.randn(6, in_)
    grads = []
    for fn in (qdq_weight, _qdq_autograd):
        w.grad = None
        v, a, b = (t.clone().requires_grad_(True) for t in (v0, a0, b0))
        y = fn(w, p, v, a, b)
        (y * upstream).sum().backward()
        grads.append((y.detach(), w.grad.clone(), v.grad, a.grad, b.grad))
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    # The clamp really was active somewhere, and not everywhere.
    wg = group_view(w.detach(), gs)
    from auto_round.quant.qdq import scale_zero
    s, z = scale_zero(wg, p, a0, b0)
    r = torch.round(wg / s + v0.reshape(wg.shape)) + z
    clamped = (r < 0) | (r > p.maxq)
    assert clamped.any() and not clamped.all()


def test_workspace_gives_the_same_values_and_gradients_step_after_step():
    from auto_round.quant.qdq import QDQWorkspace, group_range, qdq_groups, scale_zero_from_range

    p = QuantParams(3, 16, "asym")
    wg = group_view(torch.randn(8, 40, generator=torch.Generator().manual_seed(3)), 16)
    lo, hi = group_range(wg)
    params = {key: (torch.zeros(wg.shape, requires_grad=True), torch.ones(8, 3, requires_grad=True),
                    torch.ones(8, 3, requires_grad=True)) for key in ("plain", "work")}
    work = {"plain": None, "work": QDQWorkspace(wg)}
    for step in range(3):
        up = torch.randn(wg.shape, generator=torch.Generator().manual_seed(step))
        got = {}
        for key, (v, a, b) in params.items():
            s, z = scale_zero_from_range(lo, hi, p, a, b)
            (qdq_groups(wg, s, z, v, p.maxq, work[key]) * up).sum().backward()
            got[key] = (v.grad.clone(), a.grad.clone(), b.grad.clone())
            with torch.no_grad():  # a sign step, so the next step starts from new parameters
                for t in (v, a, b):
                    t.sub_(t.grad.sign() * 0.05)
                    t.grad = None
        for want, have in zip(got["plain"], got["work"]):
            assert torch.equal(want, have)


def test_tunable_linear_called_twice_per_forward_and_accumulating_micro_batches():
    from auto_round.tuning.wrapper import TunableLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x1, x2 = torch.randn(4, 32), torch.randn(4, 32)

    def grads(fn):
        t = TunableLinear(lin, QuantParams(4, 16, "sym"), True, torch.float32)
        with torch.no_grad():
            t.v.copy_(torch.rand(t.v.shape, generator=torch.Generator().manual_seed(5)) * 0.8 - 0.4)
        fn(t)
        return t.v.grad.clone(), t.alpha.grad.clone()

    def separately(t):
        t(x1).pow(2).sum().backward()
        t(x2).pow(2).sum().backward()  # a second micro-batch, no step in between

    def together(t):
        (t(x1).pow(2).sum() + t(x2).pow(2).sum()).backward()  # the same layer twice in one forward

    for a, b in zip(grads(separately), grads(together)):  # equal up to summation order
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))
