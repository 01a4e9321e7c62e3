"""Tuning one unit (``nblocks`` consecutive blocks) with signed gradient descent.

Objective: mean squared error between the unit's output with qdq weights (fed the quantized
chain's input) and its full-precision output (fed the FP chain's input), over the tokens of the
loss mask. Update: ``theta -= lr_t * sign(grad)`` with ``lr_t`` decaying linearly from ``lr`` to 0.
``V`` is kept in [-0.5, 0.5] (one rounding level either way, as in the SignRound paper) and the
clip factors in [0, 1]. The parameters of the iteration with the lowest loss are restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from auto_round.config import Settings
from auto_round.quant.opt_rtn import K_SCHEMES, search_clip
from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.parallel import SINGLE, DataParallel
from auto_round.tuning.plan import LayerPlan
from auto_round.tuning.wrapper import TunableLinear, quantized_record, set_module

logger = logging.getLogger(__name__)

LOSS_SCALE = 1000.0  # guards small losses against underflow in half precision


@dataclass
class UnitInputs:
    """What a unit needs per calibration batch: extra args/kwargs per block, and the loss mask."""

    args: List[Tuple[Any, ...]]
    kwargs: List[Dict[str, Any]]
    mask: Optional[torch.Tensor]


@dataclass
class BlockResult:
    """Losses of one tuned unit: at the first (= round-to-nearest), last and best iteration."""

    name: str
    first_loss: float
    last_loss: float
    best_loss: float
    best_iter: int
    seconds: float
    layers: Dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)
    peak_activation: float = 0.0  # largest |output| of the unit's FP forward (fp16 overflows beyond 65504)
    losses: List[float] = field(default_factory=list, repr=False)  # the loss of every iteration, in order
    # The unit's starting point (round-to-nearest, or the optimized-RTN clip search it started from) as
    # records, for the loop's final check (:func:`auto_round.tuning.loop._keep_better`); emptied there.
    start_layers: Dict[str, QuantizedWeight] = field(default_factory=dict, repr=False)
    # Output errors over every calibration batch (the loss's mean squared error) of the tuned result and of
    # the starting point, and whether the starting point was kept because it was lower (None: not compared).
    output_error: Optional[float] = None
    start_output_error: Optional[float] = None
    kept_start: bool = False


def cast_input(x, device, dtype):
    """Move a unit input to ``device``/``dtype``; lists/tuples of tensors (a projector taking one tensor
    per image) are mapped element-wise."""
    if isinstance(x, (list, tuple)):
        return type(x)(cast_input(v, device, dtype) for v in x)
    return x.to(device, dtype)


def run_unit(blocks: Sequence[nn.Module], hidden: torch.Tensor, extra: UnitInputs) -> torch.Tensor:
    """Feed ``hidden`` through ``blocks`` with each block's captured arguments."""
    h = hidden
    for block, args, kwargs in zip(blocks, extra.args, extra.kwargs):
        out = block(h, *args, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 / AMX), via oneDNN."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def amp_dtype(device: torch.device, settings: Settings, model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """Autocast dtype of the tuning forward, or None for plain float32.

    With ``amp``: on CUDA the model's half dtype (bf16 for fp32 models); on CPU bf16 where the CPU
    has native bf16 (measured 1.6x faster per step on a SmolLM2 block here), else none. The FP
    targets and the next unit's inputs are computed under the same autocast; the weights, their
    qdq and the loss stay float32.
    """
    if not settings.amp:
        return None
    if device.type == "cuda":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


_COMPILED: Dict[str, Any] = {}


def compiled_run_unit() -> Any:
    """:func:`run_unit` through ``torch.compile`` (built once per process). Blocks of one class and shape share
    the compiled graph (dynamo lifts their parameters to inputs: measured on SmolLM2, block 0 compiles in about
    6-25 s, blocks 1.. start in 0.2 s); a new input shape compiles once more."""
    if "run_unit" not in _COMPILED:
        _COMPILED["run_unit"] = torch.compile(run_unit)
    return _COMPILED["run_unit"]


def run_unit_amp(blocks: Sequence[nn.Module], hidden: Any, extra: UnitInputs, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], name: str,
                 runner: Any = None) -> Tuple[torch.Tensor, Optional[torch.dtype]]:
    """:func:`run_unit` (or ``runner``, e.g. :func:`compiled_run_unit`) under autocast; returns the output and
    the autocast dtype to keep using.

    Some modeling code writes into preallocated float32 tensors (CogVLM2's experts), which
    autocast's bf16 outputs cannot fill: such a unit runs in float32 from then on, announced, and
    the returned dtype is None.
    """
    runner = runner or run_unit
    try:
        with _autocast(device, autocast_dtype):
            return runner(blocks, hidden, extra), autocast_dtype
    except RuntimeError as e:
        if autocast_dtype is None or "dtype" not in str(e):
            raise
        logger.warning("%s: %s autocast failed (%s); running this block in float32 "
                       "(pass amp=False to skip the attempt)", name, autocast_dtype, str(e).splitlines()[0])
        return runner(blocks, hidden, extra), None


@dataclass(frozen=True)
class ExtendedTuner:
    """What ``enable_alg_ext`` changes in the tuning of a unit (each piece measured in bench_frontier.py).

    - ``clip_init``: the clip factors start from the optimized-RTN search (:mod:`auto_round.quant.opt_rtn`)
      weighted by the unit's input-channel importance, instead of the full range;
    - ``clip_max``: upper bound of the clip factors (1 = never beyond the group's range);
    - ``outlier_fraction`` / ``outlier_bits``: below ``outlier_bits`` bits, the largest ``outlier_fraction``
      of the squared errors of a batch are left out of the loss (a few outliers otherwise dominate the
      sign of every gradient);
    - ``token_norm``: each token's squared error divided by the mean square of its FP target (a relative
      error per token), so that the few tokens with massive hidden states (attention sinks) do not outweigh
      all others; the never-worse check compares by the same loss.
    """

    clip_init: bool = True
    clip_max: float = 1.0
    outlier_fraction: float = 0.0
    outlier_bits: int = 4
    token_norm: bool = False


PLAIN_TUNER = ExtendedTuner(clip_init=False)
# Measured on SmolLM2 W2G64, 50 iterations (README): the clip search start alone raised perplexity (97.0 -> 110.2),
# with the outlier-suppressed loss it lowered it (89.6), and the per-token relative loss on top lowered it again (87.3).
EXTENDED_TUNER = ExtendedTuner(outlier_fraction=0.001, token_norm=True)


def tuner_of(settings: Settings, layers: Sequence[LayerPlan]) -> ExtendedTuner:
    """The tuner of a unit of these planned ``layers`` (:meth:`Settings.extended_tuner_for` their schemes)."""
    return EXTENDED_TUNER if settings.extended_tuner_for(lp.params.scheme for lp in layers) else PLAIN_TUNER


def _drop_outliers(err: torch.Tensor, fraction: float) -> torch.Tensor:
    """``err`` with its largest ``fraction`` of elements set to 0 (at least one when fraction > 0)."""
    k = max(1, int(err.numel() * fraction))
    top = torch.topk(err.detach().reshape(-1), k).indices
    keep = torch.ones(err.numel(), device=err.device, dtype=err.dtype)
    keep[top] = 0.0
    return err * keep.view_as(err)


def squared_error(out: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                  outlier_fraction: float = 0.0, token_norm: bool = False) -> Tuple[torch.Tensor, int]:
    """Summed squared error over the mask's tokens and the element count it covers; with
    ``outlier_fraction`` the largest errors are left out first (:func:`_drop_outliers`); with ``token_norm``
    each token's errors are divided by its target's mean square (see :class:`ExtendedTuner`)."""
    err = (out.float() - target.float()).pow(2)
    if token_norm:
        err = err / target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    if outlier_fraction > 0:
        err = _drop_outliers(err, outlier_fraction)
    if mask is None:
        return err.sum(), err.numel()
    m = mask.to(err.device, err.dtype).reshape(*mask.shape, *([1] * (err.dim() - mask.dim())))
    return (err * m).sum(), int(mask.sum().item()) * int(err[0, 0].numel())


class _BatchOrder:
    """Seeded cycling over shuffled batch indices (each epoch sees every batch once)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.g, self.queue = n, generator, []

    def take(self, k: int) -> List[int]:
        out = []
        while len(out) < k:
            if not self.queue:
                self.queue = torch.randperm(self.n, generator=self.g).tolist()
            out.append(self.queue.pop())
        return out


def _gradients(wrappers: Sequence[TunableLinear]) -> List[torch.Tensor]:
    """The gradient of every tuned parameter, in a fixed order; zeros (allocated) where the backward left none
    (an expert no token of this process reached): every process must sum the same tensors."""
    out = []
    for w in wrappers:
        for p in (w.v, w.alpha, w.beta):
            if p is not None and p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                out.append(p.grad)
    return out


@torch.no_grad()
def _sign_step(wrappers: Sequence[TunableLinear], lr: float, minmax_lr: float) -> None:
    """``p -= lr * sign(grad)``, clamped (clip factors to each wrapper's ``[0, clip_max]``); gradients are zeroed
    in place, not dropped: the next backward accumulates into the same storage instead of allocating
    weight-sized tensors."""
    for w in wrappers:
        for p, step, lo, hi in ((w.v, lr, -0.5, 0.5), (w.alpha, minmax_lr, 0.0, w.clip_max),
                                (w.beta, minmax_lr, 0.0, w.clip_max)):
            if p is None or p.grad is None:
                continue
            g = p.grad.sign_()
            p.add_(g, alpha=-step).clamp_(lo, hi)
            g.zero_()


def tune_unit(
    root: nn.Module,
    name: str,
    blocks: Sequence[nn.Module],
    layers: Sequence[LayerPlan],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    extras: Sequence[UnitInputs],
    settings: Settings,
    device: torch.device,
    generator: torch.Generator,
    compute_dtype: torch.dtype,
    autocast_dtype: Optional[torch.dtype] = None,
    clip_init: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
    parallel: DataParallel = SINGLE,
    tuner: Optional[ExtendedTuner] = None,
) -> BlockResult:
    """Tune every planned layer of ``blocks`` (already on ``device``); leaves qdq weights in place.

    ``clip_init``: layer name -> input-channel importance (None: unweighted); those layers' clip factors
    start from the optimized-RTN search (:func:`auto_round.quant.opt_rtn.search_clip`) instead of 1.
    ``parallel``: ``inputs``/``targets``/``extras`` are this process's batches (:meth:`DataParallel.own`); each
    step draws local batch indices, runs the batches of every shard held here, and sums the gradients and
    losses over the processes (:mod:`auto_round.tuning.parallel`). ``tuner``: the unit's tuner as the caller
    resolved it (:func:`tuner_of`, resolved here when None)."""
    t0 = time.perf_counter()
    tuner = tuner if tuner is not None else tuner_of(settings, layers)
    outliers = tuner.outlier_fraction if layers and max(lp.params.bits for lp in layers) < tuner.outlier_bits else 0.0
    wrappers: Dict[str, TunableLinear] = {}
    for lp in layers:
        lin = root.get_submodule(lp.name)
        wrappers[lp.name] = TunableLinear(lin, lp.params, settings.enable_minmax_tuning, torch.float32)
        wrappers[lp.name].clip_max = tuner.clip_max
        if clip_init is not None and lp.name in clip_init:
            alpha, beta = search_clip(lin.weight, lp.params, clip_init[lp.name])
            if lp.params.scheme in K_SCHEMES:
                # a K grid's searched factors reproduce its refitted integer scales and mins: the box takes
                # them whole (they may exceed 1) instead of clamping them into another grid
                wrappers[lp.name].clip_max = max(tuner.clip_max, float(alpha.max()), float(beta.max()))
            wrappers[lp.name].init_clip(alpha, beta)
        set_module(root, lp.name, wrappers[lp.name])
    start = {k: quantized_record(w.weight, w.params, None, w.alpha, w.beta, w.linear.bias)
             for k, w in wrappers.items()}
    # A unit that is itself a Linear (Llama-3.2-Vision's projector) must run through its wrapper.
    blocks = [wrappers.get(n, b) for n, b in zip(name.split(","), blocks)]
    runner = None
    if settings.enable_torch_compile:
        runner = compiled_run_unit()
        for w in wrappers.values():
            w.use_compiled()
    order = _BatchOrder(len(inputs) // len(parallel.shards), generator)
    iters, lr0, mlr0 = settings.iters, settings.resolved_lr, settings.resolved_minmax_lr
    best, best_iter, first, last = float("inf"), 0, float("nan"), float("nan")
    snap = None
    history: List[float] = []
    try:
        for it in range(iters):
            chosen = [i for j in order.take(settings.gradient_accumulate_steps) for i in parallel.step_positions(j)]
            parts = []
            for i in chosen:
                ex = extras[i]
                x = cast_input(inputs[i], device, compute_dtype)
                out, autocast_dtype = run_unit_amp(blocks, x, ex, device, autocast_dtype, name, runner)
                sq, n = squared_error(out, targets[i].to(device), None if ex.mask is None else ex.mask.to(device),
                                      outliers, tuner.token_norm)
                # One backward per micro-batch keeps a single graph alive. Summed squared errors make
                # every token weigh equally; dividing by the token count would not change any sign.
                sq.mul(LOSS_SCALE).backward()
                parts.append((sq.item(), n))
            total, count = sum(s for s, _ in parts), sum(n for _, n in parts)
            if parallel.distributed:
                parallel.sum_(_gradients(wrappers.values()))
                total, count = parallel.sum_floats(total, count)
            loss = total / max(count, 1)
            if not math.isfinite(loss):
                if best == float("inf") or settings.not_use_best_mse:
                    raise RuntimeError(f"{name}: the tuning loss is {loss} at iteration {it} and no earlier finite "
                                       "state is kept: the block's inputs or weights overflow (check the model for "
                                       "NaN/Inf, load it in float32, or lower lr/minmax_lr)")
                logger.warning("%s: the tuning loss became %s at iteration %d; stopping this block with its best "
                               "finite iteration (%d, loss %.6g)", name, loss, it, best_iter, best)
                break
            if it == 0:
                first = loss
            last = loss
            history.append(loss)
            if loss < best:
                best, best_iter = loss, it
                if not settings.not_use_best_mse:
                    snap = {k: w.snapshot() for k, w in wrappers.items()}
            decay = 1.0 - it / iters
            _sign_step(list(wrappers.values()), lr0 * decay, mlr0 * decay)
        if snap is not None:
            for k, w in wrappers.items():
                w.restore(snap[k])
        qlayers = {k: w.finalize() for k, w in wrappers.items()}
    finally:
        for k, w in wrappers.items():
            set_module(root, k, w.linear)
    return BlockResult(name, first, last, best, best_iter, time.perf_counter() - t0, qlayers, losses=history,
                       start_layers=start)
