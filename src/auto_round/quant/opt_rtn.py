"""Optimized round-to-nearest: per-group clip factors chosen by an importance-weighted error search.

Plain RTN takes each group's full range. With calibration data, a group's error on the outputs is
about ``sum_i imp_i (w_i - w'_i)^2`` where ``imp_i`` is the mean square of input channel ``i``'s
activations (a diagonal approximation of the layer's Hessian ``X^T X``). For each group this
module tries shrinking the range by the ratios of a grid, and for each candidate also the
weighted least-squares scale of the codes that candidate gives (the optimal scale for those
codes, tried once more after re-rounding with it). The winner is returned as the clip factors
``alpha``/``beta`` of :mod:`auto_round.quant.qdq` (``lo * alpha``, ``hi * beta``), so the result is
quantized, stored and exported by the same code as plain RTN and SignRound, and it is a valid
starting point for tuning. The full range (ratio 1) is always a candidate: the weighted error is
never above plain RTN's.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from auto_round.quant.qdq import QuantParams, group_range, group_view, scale_zero_from_range

SEARCHABLE = ("sym", "asym", "sym_gptq")  # the schemes whose scale is a function of the clipped range

# Range ratios tried per group; ratio 1 (plain RTN) first, so ties keep the full range.
DEFAULT_GRID: Tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 3) for i in range(31))  # 1.0 ... 0.4


def group_importance(importance: Optional[torch.Tensor], in_features: int, group_size: int) -> torch.Tensor:
    """Per-input-channel weights ``[in_]`` -> ``[1, G, group_size]``, zero on the padding.

    ``importance`` None means every channel weighs 1 (the plain weight-space error)."""
    imp = torch.ones(in_features) if importance is None else importance.detach().float().reshape(-1)
    if imp.numel() != in_features:
        raise ValueError(f"importance has {imp.numel()} channels, the weight has {in_features} inputs")
    return group_view(imp.reshape(1, -1), group_size)


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer levels ``q - z`` of ``wg`` for scale/zero ``[out, G, 1]`` (computed in ``out`` when given)."""
    k = torch.div(wg, s, out=out) if out is not None else wg / s
    return k.round_().add_(z).clamp_(0, maxq).sub_(z)


def _weighted_error(wg: torch.Tensor, s: torch.Tensor, k: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    return ((wg - s * k).pow_(2) * imp).sum(-1)


def _clip_of_scale(s: torch.Tensor, z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, params: QuantParams
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clip factors ``alpha``/``beta`` ``[out, G]`` whose range gives scale ``s`` (and zero ``z``) back.

    sym: the scale is ``max(-lo a, hi b) / 2^(b-1)``, so ``a = b = s / s_full``; asym: code 0 sits
    at ``-z s`` and code ``maxq`` at ``(maxq - z) s``. Factors may exceed 1 (a scale above the full
    range's can lower the error of a code grid that does not reach the group's maximum).
    """
    s, z = s.squeeze(-1), z.squeeze(-1)
    if params.sym:
        full, _ = scale_zero_from_range(lo, hi, params)
        r = (s / full.squeeze(-1)).clamp(min=0.0)
        return r, r.clone()
    new_lo, new_hi = -z * s, (params.maxq - z) * s
    safe_lo = torch.where(lo < 0, lo, -torch.ones_like(lo))
    safe_hi = torch.where(hi > 0, hi, torch.ones_like(hi))
    alpha = torch.where(lo < 0, new_lo / safe_lo, torch.ones_like(lo)).clamp(min=0.0)
    beta = torch.where(hi > 0, new_hi / safe_hi, torch.ones_like(hi)).clamp(min=0.0)
    return alpha, beta


def _exact_error(wg, lo, hi, params, alpha, beta, imp) -> torch.Tensor:
    """The weighted error per group of what :func:`quantize_weight` makes of ``(alpha, beta)``."""
    s, z = scale_zero_from_range(lo, hi, params, alpha, beta)
    return _weighted_error(wg, s, _codes(wg, s, z, params.maxq), imp)


@torch.no_grad()
def search_clip(weight: torch.Tensor, params: QuantParams, importance: Optional[torch.Tensor] = None,
                grid: Sequence[float] = DEFAULT_GRID, rows_per_chunk: int = 512
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group clip factors ``(alpha, beta)`` ``[out, G]`` minimising the importance-weighted error.

    Args:
        weight: ``[out, in_]`` (any float dtype; computed in float32).
        params: the layer's scheme.
        importance: ``[in_]`` mean square of each input channel's activations, or None (uniform).
        grid: range ratios to try.
        rows_per_chunk: output rows processed at once (bounds the temporary memory).

    Each candidate ratio gives codes ``k``; with ``A = sum imp w k`` and ``B = sum imp k^2`` the
    error of scale ``s`` is ``C - 2 s A + s^2 B`` and the least-squares scale ``A / B`` lowers it to
    ``C - A^2 / B``, both scored from one pass. Re-rounding with the chosen scale can only lower the
    error further, and the result is checked exactly against the full range at the end, so the
    returned factors, passed to :func:`auto_round.quant.qdq.quantize_weight`, never give a larger
    weighted error than plain RTN.
    """
    if not grid:
        raise ValueError("grid names no ratio; pass e.g. DEFAULT_GRID")
    if params.scheme not in SEARCHABLE:
        raise ValueError(f"the clip search covers the schemes {SEARCHABLE}, not {params.scheme!r} (a GGUF K-quant "
                         "grid quantizes its sub-block scales itself)")
    out, in_ = weight.shape
    imp = group_importance(importance, in_, params.group_size).to(weight.device)
    alphas, betas = [], []
    for r0 in range(0, out, rows_per_chunk):
        wg = group_view(weight[r0:r0 + rows_per_chunk].float(), params.group_size)
        lo, hi = group_range(wg)
        iw = imp * wg  # imp * w, reused by every candidate
        best_err = torch.full(lo.shape, float("inf"), device=wg.device)
        best_s = torch.ones_like(lo)
        best_z = torch.zeros_like(lo)
        k, t = torch.empty_like(wg), torch.empty_like(wg)  # buffers reused by every candidate
        for ratio in grid:
            a = torch.full_like(lo, float(ratio))
            s, z = scale_zero_from_range(lo, hi, params, a, a)
            _codes(wg, s, z, params.maxq, out=k)
            num = torch.mul(iw, k, out=t).sum(-1)
            den = k.mul_(k).mul_(imp).sum(-1)
            s1 = s.squeeze(-1)
            err = den * s1 * s1 - 2 * s1 * num  # C left out: the same for every candidate of a group
            ls = torch.where(den > 0, num / den.clamp(min=1e-30), s1)
            ls = torch.where(ls.abs() > 1e-12, ls, s1)
            err_ls = torch.where(den > 0, -num * num / den.clamp(min=1e-30), err)
            for cand_s, cand_err in ((s1, err), (ls, err_ls)):
                better = cand_err < best_err
                best_err = torch.where(better, cand_err, best_err)
                best_s = torch.where(better, cand_s, best_s)
                best_z = torch.where(better, z.squeeze(-1), best_z)
        alpha, beta = _clip_of_scale(best_s.unsqueeze(-1), best_z.unsqueeze(-1), lo, hi, params)
        # Exact check after re-rounding and the scale's dtype cast: keep the full range where it is better.
        ones = torch.ones_like(lo)
        keep_full = _exact_error(wg, lo, hi, params, ones, ones, imp) <= _exact_error(wg, lo, hi, params, alpha,
                                                                                      beta, imp)
        alphas.append(torch.where(keep_full, ones, alpha))
        betas.append(torch.where(keep_full, ones, beta))
    return torch.cat(alphas), torch.cat(betas)


def weighted_error(weight: torch.Tensor, params: QuantParams, importance: Optional[torch.Tensor] = None,
                   alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None) -> float:
    """Total importance-weighted squared error of quantizing ``weight`` with clip factors (None = full range)."""
    wg = group_view(weight.float(), params.group_size)
    imp = group_importance(importance, weight.shape[1], params.group_size).to(weight.device)
    return float(_exact_error(wg, *group_range(wg), params, alpha, beta, imp).sum())
