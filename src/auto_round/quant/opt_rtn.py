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

GGUF K-quant grids (``asym_dq``/``sym_dq``, :mod:`auto_round.quant.kquant`) are searched per sub-block
the way llama.cpp's quantizer does with an importance matrix: candidate grids step the number of
levels across the range by tenths, each gives codes, and the weighted least-squares scale (and min,
for ``asym_dq``) of those codes is scored; then the super-block scales quantize the sub-block ones,
and per super-block the result is checked exactly against the full range, keeping the better.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from auto_round.quant.kquant import FP16_TINY, SUPER_BLOCK, k_scales, qdq_groups_k, spec_of
from auto_round.quant.qdq import QuantParams, group_range, group_view, scale_zero_from_range

K_SCHEMES = ("asym_dq", "sym_dq")  # GGUF K-quant grids: searched per sub-block (:func:`_search_k`)
SEARCHABLE = ("sym", "asym", "sym_gptq") + K_SCHEMES  # the schemes whose scale is a function of the clipped range

# Level-count offsets tried on a K grid: the range spans ``maxq + step`` levels (asym_dq), or the larger
# extreme sits ``2^(bits-1) + step`` levels from zero (sym_dq); llama.cpp's make_qkx2_quants / make_qx_quants
# step the same way.
K_STEPS: Tuple[float, ...] = tuple(round(-1.0 + 0.1 * i, 2) for i in range(21))

# Range ratios tried per group; ratio 1 (plain RTN) first, so ties keep the full range. Ratios above 1 (a
# grid a little wider than the group, its extreme landing between levels) lower the weighted error of a
# few percent of the groups, as llama.cpp's make_qx_quants finds by stepping its inverse scale both ways.
DEFAULT_GRID: Tuple[float, ...] = (tuple(round(1.0 - 0.02 * i, 3) for i in range(31))  # 1.0 ... 0.4
                                   + tuple(round(1.0 + 0.02 * i, 3) for i in range(1, 8)))  # 1.02 ... 1.14


def group_importance(importance: Optional[torch.Tensor], in_features: int, group_size: int) -> torch.Tensor:
    """Per-input-channel weights ``[in_]`` -> ``[1, G, group_size]``, zero on the padding.

    ``importance`` None means every channel weighs 1 (the plain weight-space error)."""
    imp = torch.ones(in_features) if importance is None else importance.detach().float().reshape(-1)
    if imp.numel() != in_features:
        raise ValueError(f"importance has {imp.numel()} channels, the weight has {in_features} inputs")
    return group_view(imp.reshape(1, -1), group_size)


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int,
           out: Optional[torch.Tensor] = None, zero: Optional[int] = None) -> torch.Tensor:
    """Integer levels ``q - z`` of ``wg`` for scale/zero ``[out, G, 1]`` (computed in ``out`` when given).

    ``zero``: the zero point when every group has the same one (sym grids): ``clamp(round(w / s) + z, 0, maxq) - z``
    is then ``clamp(round(w / s), -z, maxq - z)`` with scalar bounds, the same floats in three passes over the
    weight instead of five (tensor bounds measured slower than the five passes)."""
    k = torch.div(wg, s, out=out) if out is not None else wg / s
    if zero is not None:
        return k.round_().clamp_(-zero, maxq - zero)
    return k.round_().add_(z).clamp_(0, maxq).sub_(z)


def _common_zero(params: QuantParams) -> Optional[int]:
    """The zero point every group of ``params``' grid shares (sym and sym_gptq: ``2^(bits-1)``), else None."""
    return 2 ** (params.bits - 1) if params.scheme in ("sym", "sym_gptq") else None


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
    """The weighted error per group of what :func:`quantize_weight` makes of ``(alpha, beta)`` (on a K grid:
    after its super-block scales quantize the sub-block ones, as the record stores it)."""
    if params.scheme in K_SCHEMES:
        return ((wg - qdq_groups_k(wg, lo, hi, params, None, alpha, beta)).pow_(2) * imp).sum(-1)
    s, z = scale_zero_from_range(lo, hi, params, alpha, beta)
    return _weighted_error(wg, s, _codes(wg, s, z, params.maxq, zero=_common_zero(params)), imp)


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
        raise ValueError(f"the clip search covers the schemes {SEARCHABLE}, not {params.scheme!r}")
    out, in_ = weight.shape
    imp = group_importance(importance, in_, params.group_size).to(weight.device)
    if params.scheme in K_SCHEMES:
        return _search_k(weight, params, imp, rows_per_chunk)
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
            _codes(wg, s, z, params.maxq, out=k, zero=_common_zero(params))
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


def _ls_asym(wg: torch.Tensor, k: torch.Tensor, imp: torch.Tensor, lo: torch.Tensor, sums: Tuple[torch.Tensor, ...]
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares ``W ~ a + s k`` over each group for codes ``k``: ``(a, s, err - C)`` ``[R, G]``.

    The min ``a`` is kept ``<= 0`` (a K grid stores ``-a`` unsigned) and 0 where the group has no
    negative weight (``lo == 0``: its clip factor cannot move it); ``err`` leaves out ``C = sum imp W^2``.
    """
    s0, sw = sums
    s1 = (imp * k).sum(-1)
    s2 = (imp * k * k).sum(-1)
    swl = (imp * wg * k).sum(-1)
    det = s0 * s2 - s1 * s1
    ok = det > 1e-30 * s0 * s2
    safe = torch.where(ok, det, torch.ones_like(det))
    a = torch.where(ok, (s2 * sw - s1 * swl) / safe, torch.zeros_like(det))
    s = torch.where(ok, (s0 * swl - s1 * sw) / safe, torch.zeros_like(det))
    pinned = (a > 0) | (lo >= 0) | ~ok  # the min sits at 0: only the scale is fitted
    s = torch.where(pinned, swl / s2.clamp(min=1e-30), s)
    a = torch.where(pinned, torch.zeros_like(a), a)
    err = a * a * s0 + 2 * a * s * s1 + s * s * s2 - 2 * a * sw - 2 * s * swl
    return a, s, torch.where(s > 0, err, torch.full_like(err, float("inf")))


def _search_k_groups(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, params: QuantParams, imp: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block clip factors ``(alpha, beta)`` of the best least-squares grid, before double quantization."""
    maxq, half = params.maxq, 2 ** (params.bits - 1)
    best_err = torch.full(lo.shape, float("inf"), device=wg.device)
    alpha, beta = torch.ones_like(lo), torch.ones_like(lo)
    if params.scheme == "asym_dq":
        sums = (imp.expand_as(wg).sum(-1), (imp * wg).sum(-1))
        width = hi - lo
        for step in K_STEPS:
            s_c = (width / (maxq + step)).clamp(min=1e-30).unsqueeze(-1)
            k = ((wg - lo.unsqueeze(-1)) / s_c).round_().clamp_(0, maxq)
            a, s, err = _ls_asym(wg, k, imp, lo, sums)
            # as clip factors: the grid's bottom a = lo * alpha, its top a + s maxq = hi * beta
            cand_alpha = torch.where(lo < 0, a / torch.where(lo < 0, lo, -torch.ones_like(lo)), torch.ones_like(lo))
            cand_beta = (a + s * maxq) / torch.where(hi > 0, hi, torch.ones_like(hi))
            better = (err < best_err) & (hi > 0) & (cand_beta > 0)
            best_err = torch.where(better, err, best_err)
            alpha, beta = torch.where(better, cand_alpha, alpha), torch.where(better, cand_beta, beta)
        return alpha, beta
    # sym_dq: W' = s (q - half); the extreme of larger magnitude keeps level -half (s signed)
    a_, b_ = -lo, hi
    top = torch.maximum(a_, b_)
    s_full = torch.where(a_ > b_, top, -top) / half
    for step in K_STEPS:
        s_c = (s_full * half / (half + step)).unsqueeze(-1)
        s_c = torch.where(s_c == 0, torch.ones_like(s_c), s_c)
        k = (wg / s_c).round_().clamp_(-half, half - 1)
        swl, s2 = (imp * wg * k).sum(-1), (imp * k * k).sum(-1)
        s = swl / s2.clamp(min=1e-30)
        err = -swl * swl / s2.clamp(min=1e-30)
        ratio = s / torch.where(s_full == 0, torch.ones_like(s_full), s_full)
        better = (err < best_err) & (ratio > 0) & (s_full != 0)
        best_err = torch.where(better, err, best_err)
        alpha = torch.where(better, ratio, alpha)
    return alpha, alpha.clone()


class _KGrid(NamedTuple):
    """An asym_dq grid per super-block: fp16-valued ``d``/``dmin`` ``[R, S]`` and integers ``sc``/``m`` ``[R, S, n]``."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor


def _k_grid_error(w: torch.Tensor, imp: torch.Tensor, grid: _KGrid, maxq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted error per sub-block ``[R, S, n]`` of ``w [R, S, n, sub]`` on ``grid`` (codes re-rounded), and the codes."""
    s = (grid.d.unsqueeze(-1) * grid.sc).unsqueeze(-1)
    mn = (grid.dmin.unsqueeze(-1) * grid.m).unsqueeze(-1)
    q = ((w + mn) / s).round_().clamp_(0, maxq)
    return ((w - (s * q - mn)).pow_(2) * imp).sum(-1), q


def _k_integers(w: torch.Tensor, imp: torch.Tensor, grid: _KGrid, centre: _KGrid, fixed: Tuple[torch.Tensor, ...],
                maxq: int, sc_max: int) -> Tuple[_KGrid, torch.Tensor]:
    """Each sub-block's ``sc``/``m`` among ``centre``'s neighbours (-1, 0, +1) with ``grid``'s ``d``/``dmin``, by
    exact weighted error; the ``fixed`` sub-blocks (``sc``, ``m`` masks) keep ``centre``'s integers."""
    fixed_sc, fixed_m = fixed
    best_err = torch.full(centre.sc.shape, float("inf"), device=w.device)
    best_sc, best_m = centre.sc, centre.m
    for dsc in (0, -1, 1):
        sc = torch.where(fixed_sc, centre.sc, (centre.sc + dsc).clamp(1, sc_max))
        for dm in (0, -1, 1):
            m = torch.where(fixed_m, centre.m, (centre.m + dm).clamp(0, sc_max))
            err, _ = _k_grid_error(w, imp, _KGrid(grid.d, grid.dmin, sc, m), maxq)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_sc, best_m = torch.where(better, sc, best_sc), torch.where(better, m, best_m)
    return _KGrid(grid.d, grid.dmin, best_sc, best_m), best_err.sum(-1)


def _k_super_scales(w: torch.Tensor, imp: torch.Tensor, grid: _KGrid, maxq: int) -> _KGrid:
    """Weighted least squares of ``d``/``dmin`` for the grid's integers and codes (``W ~ d sc q - dmin m`` over
    each super-block), rounded to fp16; ``dmin`` 0 where the fit wants it negative."""
    _, q = _k_grid_error(w, imp, grid, maxq)
    a = grid.sc.unsqueeze(-1) * q
    b = grid.m.unsqueeze(-1).expand_as(a)
    saa, sab, sbb = (imp * a * a).sum((-1, -2)), (imp * a * b).sum((-1, -2)), (imp * b * b).sum((-1, -2))
    swa, swb = (imp * w * a).sum((-1, -2)), (imp * w * b).sum((-1, -2))
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * saa * sbb
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (swa * sbb - sab * swb) / safe, swa / saa.clamp(min=1e-30))
    dmin = torch.where(ok, (sab * swa - saa * swb) / safe, torch.zeros_like(d))
    no_min = dmin <= 0
    d = torch.where(no_min, swa / saa.clamp(min=1e-30), d)
    dmin = torch.where(no_min, torch.zeros_like(dmin), dmin)
    fp16 = lambda x: x.clamp(min=FP16_TINY).to(torch.float16).to(x.dtype)  # noqa: E731
    return _KGrid(torch.where(d > 0, fp16(d), grid.d), torch.where(dmin > 0, fp16(dmin), torch.zeros_like(dmin)),
                  grid.sc, grid.m)


def _refine_k_asym(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, params: QuantParams, imp: torch.Tensor,
                   alpha: torch.Tensor, beta: torch.Tensor, rounds: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """asym_dq, after the per-sub-block search: the double quantization, fitted to the weighted error.

    Starting from the grid the clip factors give, alternately (a) each sub-block's integer scale and min
    take the best of their neighbours and (b) the super-block's ``d``/``dmin`` are refitted by least squares
    to the integers and codes, keeping per super-block whatever lowers its exact weighted error. The
    sub-blocks holding a super-block's top scale (``sc_max``) and top min keep them, since those set
    ``d``/``dmin`` when the grid is rebuilt from clip factors; a sub-block with no negative weight keeps
    the min 0. Returned as clip factors that :func:`auto_round.quant.kquant.k_scales` turns back into
    exactly this grid (a sub-block with no positive weight keeps its factors).
    """
    spec = spec_of(params.bits, params.group_size, params.scheme)
    n = spec.per_super
    k = k_scales(lo, hi, params, alpha, beta)
    rows, groups, sub = wg.shape
    shape = (rows, groups // n, n)
    w, iw = wg.reshape(*shape, sub), imp.reshape(1, groups // n, n, sub)
    s_raw, mn_raw = ((hi * beta - lo * alpha) / params.maxq).reshape(shape), (-lo * alpha).reshape(shape)
    top = lambda x: x == x.amax(-1, keepdim=True)  # noqa: E731
    no_neg = (lo >= 0).reshape(shape)
    grid = _KGrid(k.d, k.dmin, k.sc.reshape(shape), torch.where(no_neg, 0, k.m.reshape(shape)))
    fixed = (top(s_raw), top(mn_raw) | no_neg | (k.dmin <= 0).unsqueeze(-1))
    best, best_err = grid, _k_grid_error(w, iw, grid, params.maxq)[0].sum(-1)

    def keep(cand: _KGrid, err: torch.Tensor) -> None:
        nonlocal best, best_err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = _KGrid(*(torch.where(better.reshape(*better.shape, *([1] * (b.dim() - 2))), c, b)
                        for c, b in zip(cand, best)))

    keep(*_k_integers(w, iw, best, best, fixed, params.maxq, spec.sc_max))
    for _ in range(rounds):
        refit = _k_super_scales(w, iw, best, params.maxq)
        # the integers, re-centred on what the old scales meant under the new ones
        centre = _KGrid(refit.d, refit.dmin,
                        torch.where(fixed[0], best.sc, (best.d.unsqueeze(-1) * best.sc / refit.d.unsqueeze(-1)).round()
                                    .clamp(1, spec.sc_max)),
                        torch.where(fixed[1], best.m, (best.dmin.unsqueeze(-1) * best.m
                                                       / refit.dmin.clamp(min=FP16_TINY).unsqueeze(-1)).round()
                                    .clamp(0, spec.sc_max)))
        keep(*_k_integers(w, iw, refit, centre, fixed, params.maxq, spec.sc_max))
    s_new = (best.d.unsqueeze(-1) * best.sc).reshape(rows, groups)
    mn_new = (best.dmin.unsqueeze(-1) * best.m).reshape(rows, groups)
    pos = hi > 0
    new_alpha = torch.where(lo < 0, mn_new / torch.where(lo < 0, -lo, torch.ones_like(lo)), alpha)
    new_beta = (s_new * params.maxq - mn_new) / torch.where(pos, hi, torch.ones_like(hi))
    ok = pos & (new_beta > 0)
    return torch.where(ok, new_alpha, alpha), torch.where(ok, new_beta, beta)


def _search_k(weight: torch.Tensor, params: QuantParams, imp: torch.Tensor, rows_per_chunk: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_clip` for the K grids: per sub-block least squares, then, per super-block, the exact
    weighted error after the super-block scales quantize the sub-block ones, against the full range."""
    per_super = SUPER_BLOCK // params.group_size
    alphas, betas = [], []
    for r0 in range(0, weight.shape[0], rows_per_chunk):
        wg = group_view(weight[r0:r0 + rows_per_chunk].float(), params.group_size)
        lo, hi = group_range(wg)
        alpha, beta = _search_k_groups(wg, lo, hi, params, imp)
        if params.scheme == "asym_dq":
            alpha, beta = _refine_k_asym(wg, lo, hi, params, imp, alpha, beta)
        ones = torch.ones_like(lo)

        def exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [R, S]: per super-block
            err = _exact_error(wg, lo, hi, params, a, b, imp)
            return err.reshape(err.shape[0], -1, per_super).sum(-1)

        keep_full = (exact(ones, ones) <= exact(alpha, beta)).repeat_interleave(per_super, dim=1)
        alphas.append(torch.where(keep_full, ones, alpha))
        betas.append(torch.where(keep_full, ones, beta))
    return torch.cat(alphas), torch.cat(betas)


def weighted_error(weight: torch.Tensor, params: QuantParams, importance: Optional[torch.Tensor] = None,
                   alpha: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None) -> float:
    """Total importance-weighted squared error of quantizing ``weight`` with clip factors (None = full range)."""
    wg = group_view(weight.float(), params.group_size)
    imp = group_importance(importance, weight.shape[1], params.group_size).to(weight.device)
    return float(_exact_error(wg, *group_range(wg), params, alpha, beta, imp).sum())
