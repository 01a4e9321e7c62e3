"""Automatic mixed bits: a scheme per layer under an average-bits budget (``avg_bits`` + ``options``).

Three steps, before the plan is resolved and before any tuning:

1. **Sensitivity** (:func:`delta_loss_scores`): for every candidate scheme, all quantized layers are
   replaced by their round-to-nearest weights ``Q(W)`` and the model's next-token loss on a few
   calibration batches is back-propagated; a layer's score is ``sum |g * (W - Q(W))|`` with ``g`` the
   loss gradient at the quantized weight (the "DeltaLoss" of SignRoundV2, arXiv 2512.04746: the
   first-order loss change, taken in absolute value element by element so errors do not cancel).
2. **Groups** (:func:`layer_groups`): layers an engine fuses into one matrix must share a scheme:
   ``q/k/v_proj`` of one attention, ``gate/up_proj`` of one MLP, and the experts of one MoE layer
   (the same projection of every expert); a group's score and cost are its layers' sums.
3. **Budget** (:func:`solve_budget`): minimise the summed score subject to the stored bits (codes plus
   scales and zero points, :func:`scheme_bits`) not exceeding ``avg_bits`` times the quantized
   weights, a 0/1 knapsack over groups solved exactly by dynamic programming over cost (in units of
   the costs' common divisor).

The result is a ``layer_config`` (exact layer names), merged under the user's own entries, so the
plan, the format checks and the export treat it like any per-layer override.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from auto_round.quant.qdq import QuantParams
from auto_round.tuning.wrapper import quantized_record

logger = logging.getLogger(__name__)

# The reference's preset names (W<bits>A16: group 128, symmetric) and ours (W<bits>G<group>[asym]).
_SCHEME_RE = re.compile(r"^W(\d+)(?:A16|G(-?\d+))?(ASYM|SYM)?$", re.IGNORECASE)


@dataclass(frozen=True)
class SchemeOption:
    """One candidate scheme: ``bits``, ``group_size`` (-1 = per row) and ``sym``."""

    name: str
    bits: int
    group_size: int
    sym: bool


def parse_options(text: str) -> List[SchemeOption]:
    """``"W2G64,W4G128"`` (or the reference's ``"W2A16,W4A16"``; ``asym`` suffix allowed) -> options.

    >>> [o.bits for o in parse_options("W2G64,W4A16")]
    [2, 4]
    """
    out = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        m = _SCHEME_RE.match(item)
        if not m:
            raise ValueError(f"options entry {item!r} is not a scheme name; write W<bits>G<group_size> (e.g. W2G64, "
                             "W4G128, W4G128asym) or W<bits>A16 (group 128, symmetric)")
        bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else 128
        if bits not in (2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError(f"options entry {item!r}: bits={bits} is not supported; use 2-8 (or 16 to keep FP)")
        out.append(SchemeOption(item, bits, group, (m.group(3) or "sym").lower() == "sym"))
    if len(out) < 2:
        raise ValueError(f"options={text!r} names {len(out)} scheme(s); mixed bits needs at least two, e.g. "
                         "options='W2G64,W4G128'")
    return out


def scheme_bits(option: SchemeOption, out_features: int, in_features: int, scale_bits: int = 16) -> float:
    """Stored bits of one layer in ``option``: codes, one scale per group, and a zero point per group
    when asymmetric (packed at ``bits``). bits 16 = kept in full precision (16 bits a weight)."""
    n = out_features * in_features
    if option.bits >= 16:
        return 16.0 * n
    gs = in_features if option.group_size == -1 else option.group_size
    groups = out_features * math.ceil(in_features / gs)
    return float(n * option.bits + groups * (scale_bits + (0 if option.sym else option.bits)))


_FUSED = ((re.compile(r"\.(q_proj|k_proj|v_proj)$"), ".qkv_proj"),
          (re.compile(r"\.(gate_proj|up_proj)$"), ".gate_up_proj"),
          (re.compile(r"\.(w1|w3)$"), ".w13"),
          (re.compile(r"\.experts\.\d+\."), ".experts.*."))


def group_key(name: str) -> str:
    """The fused unit a layer belongs to (engines fuse q/k/v, gate/up, and stack MoE experts)."""
    key = name
    for pattern, repl in _FUSED:
        key = pattern.sub(repl, key)
    return key


def layer_groups(names: Iterable[str]) -> Dict[str, List[str]]:
    """Group key -> layer names, in first-seen order."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        groups.setdefault(group_key(n), []).append(n)
    return groups


def solve_budget(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
                 max_states: int = 1 << 22) -> List[int]:
    """Pick one option per item minimising the summed score with the summed cost <= ``budget``.

    ``scores[i][o]`` and ``costs[i][o]``: item i in option o; costs are bit counts (integers). The
    0/1 knapsack is solved exactly by dynamic programming over cost in units of the costs' greatest
    common divisor (a transformer's layers share a few shapes, so that unit is large). Where the
    budget spans more than ``max_states`` such units, costs are rounded up to ``budget / max_states``
    instead: the choice still never exceeds the budget and is optimal up to that rounding (logged).
    Raises ValueError when even the cheapest choice of every item is over budget.
    """
    import numpy as np

    n = len(scores)
    if n == 0:
        return []
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget * (1 + 1e-12):
        raise ValueError(f"the budget is below the cheapest choice of every layer ({cheapest / budget:.3f}x of "
                         "it); raise avg_bits or add a smaller scheme to options")
    ints = [[int(round(c)) for c in row] for row in costs]
    unit = 0
    for row in ints:
        for c in row:
            unit = math.gcd(unit, c)
    unit = max(unit, 1)
    if budget / unit > max_states:
        unit_f = budget / max_states
        logger.info("mixed bits: the budget spans %.3g cost units; costs rounded up to %.4g bits", budget / unit,
                    unit_f)
        icost = [[int(math.ceil(c / unit_f - 1e-9)) for c in row] for row in costs]
        size = max_states
    else:
        icost = [[c // unit for c in row] for row in ints]
        size = int(budget // unit)
    best = np.full(size + 1, np.inf)
    best[0] = 0.0
    picks_at: List[np.ndarray] = []
    for i in range(n):
        new = np.full(size + 1, np.inf)
        pick = np.full(size + 1, -1, dtype=np.int32)
        for o, (sc, ic) in enumerate(zip(scores[i], icost[i])):
            if ic > size:
                continue
            cand = np.full(size + 1, np.inf)
            cand[ic:] = best[: size + 1 - ic] + sc
            better = cand < new
            new[better] = cand[better]
            pick[better] = o
        best = new
        picks_at.append(pick)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise ValueError("no choice of schemes fits the budget after rounding the costs; raise avg_bits slightly")
    picks = [0] * n
    c = end
    for i in range(n - 1, -1, -1):
        o = int(picks_at[i][c])
        picks[i] = o
        c -= icost[i][o]
    return picks


def _next_token_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[0]
    ids = batch["input_ids"]
    if logits.shape[:2] != ids.shape[:2]:
        raise ValueError(f"the model's logits {tuple(logits.shape[:2])} do not line up with input_ids "
                         f"{tuple(ids.shape[:2])}; avg_bits cannot score this model (pass layer_config instead)")
    labels = ids[:, 1:].clone()
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        labels[mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


def delta_loss_scores(model: nn.Module, layers: Mapping[str, Tuple[int, int]], options: Sequence[SchemeOption],
                      batches: Sequence[Mapping[str, Any]], fit: Callable[[str, SchemeOption], Optional[QuantParams]],
                      max_batches: int = 4) -> Dict[str, List[float]]:
    """``layer -> [score per option]`` (see the module docstring); the model is left as it was.

    ``fit(name, option)``: the :class:`QuantParams` the plan would give the layer in that option (the
    group size fitted to its shape), or None when the layer would stay FP in it (score 0).
    """
    used = list(batches)[:max_batches]
    if not used:
        raise ValueError("avg_bits needs calibration data to score the layers")
    params = {n: model.get_submodule(n).weight for n in layers}
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    scores: Dict[str, List[float]] = {n: [] for n in layers}
    originals = {n: w.detach().clone() for n, w in params.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for option in options:
            diffs: Dict[str, Optional[torch.Tensor]] = {}
            with torch.no_grad():
                for n, w in params.items():
                    qp = fit(n, option) if option.bits < 16 else None
                    if qp is None:  # full precision in this option
                        diffs[n] = None
                        w.copy_(originals[n])
                        continue
                    q = quantized_record(originals[n], qp).dequantize(w.dtype).to(w.device)
                    diffs[n] = (originals[n].float() - q.float())
                    w.copy_(q)
            for n, w in params.items():
                if diffs[n] is not None:
                    w.requires_grad_(True)
                    w.grad = None
            for batch in used:
                _next_token_loss(model, batch).backward()
            for n, w in params.items():
                d = diffs[n]
                scores[n].append(0.0 if d is None or w.grad is None else float((w.grad.float() * d).abs().sum()))
                w.grad = None
                w.requires_grad_(False)
    finally:  # every weight back as it was (the next option quantizes from ``originals``, not from ``w``)
        with torch.no_grad():
            for n, w in params.items():
                w.copy_(originals[n])
                w.grad = None
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
    return scores


def choose_schemes(model: nn.Module, layers: Mapping[str, Tuple[int, int]], options: Sequence[SchemeOption],
                   avg_bits: float, batches: Sequence[Mapping[str, Any]],
                   fit: Callable[[str, SchemeOption], Optional[QuantParams]],
                   scale_bits: int = 16) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """The ``layer_config`` meeting ``avg_bits`` with the least summed sensitivity, and a report.

    ``layers``: name -> (out_features, in_features) of every layer the plan quantizes.
    """
    scores = delta_loss_scores(model, layers, options, batches, fit)
    groups = layer_groups(layers)
    keys = list(groups)

    def cost(n: str, o: SchemeOption) -> float:
        out, in_ = layers[n]
        qp = fit(n, o) if o.bits < 16 else None
        if qp is None:  # kept in full precision in this option
            return 16.0 * out * in_
        return scheme_bits(SchemeOption(o.name, qp.bits, qp.group_size, qp.sym), out, in_, scale_bits)

    g_scores = [[sum(scores[n][i] for n in groups[k]) for i in range(len(options))] for k in keys]
    g_costs = [[sum(cost(n, o) for n in groups[k]) for o in options] for k in keys]
    weights = sum(layers[n][0] * layers[n][1] for n in layers)
    picks = solve_budget(g_scores, g_costs, avg_bits * weights)
    config: Dict[str, Dict[str, Any]] = {}
    counts: Dict[str, int] = {o.name: 0 for o in options}
    total = 0.0
    for i, (k, o_idx) in enumerate(zip(keys, picks)):
        o = options[o_idx]
        counts[o.name] += len(groups[k])
        total += g_costs[i][o_idx]
        for n in groups[k]:
            config[n] = {"bits": o.bits} if o.bits >= 16 else {"bits": o.bits, "group_size": o.group_size, "sym": o.sym}
    report = {"avg_bits_target": avg_bits, "avg_bits": total / weights, "layers_per_option": counts,
              "groups": len(keys), "scores": {n: dict(zip((o.name for o in options), s)) for n, s in scores.items()}}
    logger.info("mixed bits: %.3f average bits (target %.3f) over %d layers in %d groups: %s", report["avg_bits"],
                avg_bits, len(layers), len(keys), ", ".join(f"{k} x{v}" for k, v in counts.items()))
    return config, report
