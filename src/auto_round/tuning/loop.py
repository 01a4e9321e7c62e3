"""The block loop: capture a block list's inputs, then tune its units one after another.

For each block list in the plan (in order, so a vision tower tuned first feeds its quantized
output into the language model's capture): capture inputs with one forward per calibration
batch, then for each unit of ``nblocks`` blocks compute FP targets, tune, and feed the quantized
output forward. Layers planned outside any block are quantized round-to-nearest. Cached
activations live on the device, on CPU (``low_gpu_mem_usage``) or in files (``offload_dir``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from auto_round.calib.cache import CapturedBatch, capture_block_inputs, to_device
from auto_round.calib.store import TensorStore
from auto_round.config import Settings
from auto_round.quant.types import QuantizedWeight
from auto_round.quant.opt_rtn import K_SCHEMES, SEARCHABLE, search_clip
from auto_round.tuning.block import (BlockResult, UnitInputs, squared_error, amp_dtype, cast_input, run_unit_amp,
                                     tune_unit, tuner_of)
from auto_round.tuning.importance import ImportanceCollector, watch_inputs
from auto_round.tuning.parallel import SINGLE, DataParallel
from auto_round.tuning.plan import QuantPlan, unit_ranges
from auto_round.tuning.resume import ResumeStore, data_fingerprint, run_fingerprint
from auto_round.tuning.wrapper import load_record, quantized_record, rtn_quantize

logger = logging.getLogger(__name__)

BatchFactory = Callable[[], Iterable[Mapping[str, Any]]]


class UnitHooks:
    """What the block loop does around each unit (and each layer quantized outside the blocks).

    This base class is the in-memory model's: the capture runs the whole model, units are already
    loaded, and their records are kept as they are. A streamed model overrides all three."""

    def capture(self, model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Mapping[str, Any]],
                cache_device: torch.device, put: Optional[Callable[[Any], Any]] = None) -> List[CapturedBatch]:
        """The inputs of every block of ``blocks`` for every batch (:func:`capture_block_inputs`; ``put`` stores
        each batch's hidden state as it is captured)."""
        return capture_block_inputs(model, blocks, batches, cache_device, put=put)

    def load(self, model: nn.Module, names: Sequence[str]) -> None:
        """Make the modules ``names`` (the blocks of a unit, or one layer) hold their weights."""

    def release(self, model: nn.Module, names: Sequence[str],
                records: Dict[str, QuantizedWeight]) -> Dict[str, QuantizedWeight]:
        """Done with the modules ``names``, whose quantized layers are ``records``; returns the records
        the run keeps (here: all of them)."""
        return records

    def fingerprint(self, model: nn.Module) -> str:
        """The model part of the resume fingerprint (:func:`auto_round.tuning.resume.model_fingerprint`)."""
        from auto_round.tuning.resume import model_fingerprint

        return model_fingerprint(model)


@dataclass
class _Run:
    """Everything one quantization run shares across block lists."""

    model: nn.Module
    plan: QuantPlan
    settings: Settings
    batches: BatchFactory
    device: torch.device
    progress: bool
    gen: torch.Generator
    layers: Dict[str, QuantizedWeight] = field(default_factory=dict)
    results: List[BlockResult] = field(default_factory=list)
    resume_dir: Optional[str] = None
    store: Optional[ResumeStore] = None
    unit_index: int = 0
    hooks: UnitHooks = field(default_factory=UnitHooks)
    parallel: DataParallel = SINGLE


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def _forward_all(blocks, inputs: Sequence[Any], extras: Sequence[UnitInputs], device, store: TensorStore,
                 autocast: Optional[torch.dtype], name: str, collector: Optional[ImportanceCollector] = None
                 ) -> Tuple[List[Any], Optional[torch.dtype], float]:
    """Outputs of ``blocks`` for every batch (stored), under ``autocast`` like the tuning forward, the autocast
    dtype to keep using, and the largest output magnitude. ``collector``: told each batch's loss mask (its
    hooks, when installed, record the layers' inputs)."""
    outs = []
    peak = 0.0
    for x, ex in zip(inputs, extras):
        if collector is not None:
            collector.mask = ex.mask
        out, autocast = run_unit_amp(blocks, cast_input(x, device, torch.float32), ex, device, autocast, name)
        peak = max(peak, float(out.detach().abs().max())) if out.numel() else peak
        outs.append(store.put(out.float()))
    return outs, autocast, peak


def _unit_extras(captured: List[CapturedBatch], start: int, end: int, device) -> List[UnitInputs]:
    return [UnitInputs(to_device(c.block_args[start:end], device), to_device(c.block_kwargs[start:end], device),
                       c.loss_mask) for c in captured]


def _tune_list(run: _Run, path: str, block_names: Sequence[str]) -> None:
    s = run.settings
    cache_device = torch.device("cpu") if s.low_gpu_mem_usage or s.offload_dir else run.device
    store = TensorStore(cache_device, s.offload_dir)
    try:
        blocks = [run.model.get_submodule(b) for b in block_names]
        captured = run.hooks.capture(run.model, blocks, run.parallel.own(run.batches()), cache_device, put=store.put)
        if run.resume_dir is not None and run.store is None:  # opened once the calibration data exists
            fingerprint = {**run_fingerprint(s, run.plan, run.model, run.hooks.fingerprint(run.model)),
                           "data": data_fingerprint(run.batches())}
            run.store = ResumeStore(Path(run.resume_dir), fingerprint)
        q_in = [c.hidden for c in captured]  # stored by capture
        for c in captured:
            c.hidden = None  # held by q_in from here on: each batch is freed (its file deleted) once consumed
        fp_in = q_in
        bar = _progress(len(blocks), f"tuning {path}", run.progress)
        for start, end in unit_ranges(len(blocks), s.nblocks):
            names = block_names[start:end]
            run.hooks.load(run.model, names)
            fp_in, q_in, records, result = _tune_unit(run, blocks[start:end], names,
                                                      _unit_extras(captured, start, end, run.device), fp_in, q_in,
                                                      store)
            _keep(run, names, records, result)
            bar.update(end - start)
        bar.close()
    finally:
        store.close()


def check_finite_scales(records: Mapping[str, QuantizedWeight]) -> None:
    """Refuse records with NaN/Inf scales (weights or activations that overflow), naming the layers."""
    bad = [n for n, q in records.items() if not bool(torch.isfinite(q.scale).all())]
    if bad:
        raise RuntimeError(f"non-finite scales in {len(bad)} layer(s): {bad[:5]}; the weights or activations "
                           "overflow (load the model in float32, or keep these layers FP with fp_layers)")


def _keep(run: _Run, names: Sequence[str], records: Dict[str, QuantizedWeight],
          result: Optional[BlockResult]) -> None:
    """A unit is done: its records checked, handed to the hooks (written and freed when streamed), kept."""
    check_finite_scales(records)
    kept = run.hooks.release(run.model, names, records)
    run.layers.update(kept)
    if result is not None:
        if result.layers:
            result.layers = {k: kept[k] for k in result.layers}
        run.results.append(result)


UnitOutcome = Tuple[List[Any], List[Any], Dict[str, QuantizedWeight], Optional[BlockResult]]


def _tune_unit(run: _Run, unit: Sequence[nn.Module], names: Sequence[str], extras: List[UnitInputs],
               fp_in: List[Any], q_in: List[Any], store: TensorStore) -> UnitOutcome:
    """Tune one unit in float32 on the run's device; returns the next unit's (FP, quantized) inputs, the
    unit's records and its result (None when it has no layer to tune)."""
    first = next(unit[0].parameters())
    home, orig_dtype = first.device, first.dtype
    for b in unit:
        b.to(device=run.device, dtype=torch.float32)
    name = ",".join(names)
    # With amp, the FP targets and the next unit's inputs come from the same autocast forward as the
    # tuned one (as the reference's bf16 model does): bf16 rounding of the matmul inputs then hits
    # both sides of the loss alike, and these forwards cost half as much on bf16 hardware.
    ac = amp_dtype(run.device, run.settings, orig_dtype)
    layers = [lp for n in names for lp in run.plan.in_block(n)]
    if run.settings.iters == 0:  # optimized RTN: no targets, no loss; the importance of what the layers will see
        return _opt_rtn_unit(run, unit, name, layers, extras, q_in, store, ac, home, orig_dtype)
    res: Optional[BlockResult] = None
    q_out: Optional[List[Any]] = None
    collector = ImportanceCollector()
    # The tuner's clip factors start from the search with the extended tuner, and on a GGUF K grid whenever
    # they are tuned at all (min-max tuning): min-max sub-block ranges, double-quantized, put a massive
    # channel's weight anywhere within a level. Without clip factors a K layer starts from its full range.
    tuner = tuner_of(run.settings, layers)
    clip_init = tuner.clip_init
    k_init = run.settings.enable_minmax_tuning
    watched = [lp.name for lp in layers
               if lp.params.scheme in SEARCHABLE and (clip_init or (k_init and lp.params.scheme in K_SCHEMES))]
    with watch_inputs(run.model, watched, collector):
        targets, ac, peak = _forward_all(unit, fp_in, extras, run.device, store, ac, name, collector)
    share_importance(collector, run.model, watched, run.parallel)
    if fp_in is not q_in:  # the FP chain's inputs have served: one cached copy fewer while the unit tunes
        fp_in.clear()
    if layers:
        index, run.unit_index = run.unit_index, run.unit_index + 1
        saved = run.store.load_unit(index, name) if run.store is not None else None
        if saved is not None:  # tuned before an interruption: its recorded weights, as finalize wrote them
            qlayers, result, gen_state = saved
            with torch.no_grad():
                for n, qw in qlayers.items():
                    w = run.model.get_submodule(n).weight
                    w.copy_(qw.dequantize(w.dtype).to(w.device))
            run.gen.set_state(gen_state)
            res = BlockResult(**result, layers=qlayers)
            logger.info("%s: resumed from %s", name, run.resume_dir)
        else:
            init = {n: collector.importance(n) for n in watched}
            res = tune_unit(run.model, name, unit, layers, q_in, targets, extras, run.settings, run.device,
                            run.gen, torch.float32, ac, clip_init=init, parallel=run.parallel, tuner=tuner)
            q_out = _keep_better(run, unit, name, res, q_in, targets, extras, store, ac, tuner.token_norm)
            if run.store is not None:
                result = {k: getattr(res, k) for k in ("name", "first_loss", "last_loss", "best_loss", "best_iter",
                                                        "seconds", "output_error", "start_output_error",
                                                        "kept_start")}
                run.store.save_unit(index, name, res.layers, result, run.gen.get_state())
        res.peak_activation = peak
        logger.info("%s: loss first %.6g  last %.6g  best %.6g @%d  (%.1fs)", res.name, res.first_loss,
                    res.last_loss, res.best_loss, res.best_iter, res.seconds)
    if not run.settings.enable_quanted_input:
        q_out = targets
    elif q_out is None:
        q_out = _forward_all(unit, q_in, extras, run.device, store, ac, name)[0]
    for b in unit:
        b.to(device=home, dtype=orig_dtype)
    return targets, q_out, dict(res.layers) if res is not None else {}, res


@torch.no_grad()
def _unit_error(blocks, inputs: Sequence[Any], targets: Sequence[Any], extras: Sequence[UnitInputs], device,
                autocast: Optional[torch.dtype], name: str, parallel: DataParallel, token_norm: bool = False) -> float:
    """:func:`_output_error` of ``blocks``' outputs, each computed when it is compared and not kept (``autocast``
    as :func:`_forward_all` returned it for this unit)."""
    outs = (run_unit_amp(blocks, cast_input(x, device, torch.float32), ex, device, autocast, name)[0].float()
            for x, ex in zip(inputs, extras))
    return _output_error(outs, targets, extras, device, parallel, token_norm)


def _keep_better(run: _Run, unit: Sequence[nn.Module], name: str, res: BlockResult, q_in: List[Any],
                 targets: List[Any], extras: List[UnitInputs], store: TensorStore,
                 ac: Optional[torch.dtype], token_norm: bool) -> Optional[List[Any]]:
    """Never worse than where tuning started (compared by the loss the tuner minimised: ``token_norm``, its
    tuner's): the unit's output error over every calibration batch with the
    tuned records against its starting point's (round-to-nearest, or the clip search it started from); the
    starting point is kept when its error is lower (logged, ``res.kept_start``). Tuning picks its best
    iteration by the loss of one batch at a time, which can favour a state that does worse on the rest.

    Costs one forward of the unit over the calibration batches (the starting point's error, not stored) on
    top of the one that computes the next unit's inputs, which returns here (with ``enable_quanted_input``);
    a second one only when the start is kept. Returns the quantized outputs when computed, else None."""
    start, res.start_layers = res.start_layers, {}
    if not start:
        return None
    lins = {n: run.model.get_submodule(n) for n in res.layers}
    for n, qw in start.items():
        load_record(lins[n], qw)
    res.start_output_error = _unit_error(unit, q_in, targets, extras, run.device, ac, name, run.parallel, token_norm)
    for n, qw in res.layers.items():
        load_record(lins[n], qw)
    outs: Optional[List[Any]] = None
    if run.settings.enable_quanted_input:
        outs = _forward_all(unit, q_in, extras, run.device, store, ac, name)[0]
        res.output_error = _output_error(outs, targets, extras, run.device, run.parallel, token_norm)
    else:
        res.output_error = _unit_error(unit, q_in, targets, extras, run.device, ac, name, run.parallel, token_norm)
    if res.start_output_error < res.output_error:
        logger.info("%s: the starting point is kept (output error %.6g vs %.6g tuned)", name,
                    res.start_output_error, res.output_error)
        res.layers, res.kept_start = start, True
        for n, qw in start.items():
            load_record(lins[n], qw)
        outs = None  # the tuned outputs are not the next unit's inputs
    return outs


def _output_error(outs: Sequence[Any], targets: Sequence[Any], extras: Sequence[UnitInputs], device,
                  parallel: DataParallel = SINGLE, token_norm: bool = False) -> float:
    """Mean squared error of a unit's outputs against its targets over the loss-mask tokens (as the tuner's;
    ``token_norm``: relative to each target token's mean square), over the batches of every process."""
    total, count = 0.0, 0
    for o, t, ex in zip(outs, targets, extras):
        sq, n = squared_error(o.to(device), t.to(device), None if ex.mask is None else ex.mask.to(device),
                              token_norm=token_norm)
        total, count = total + float(sq), count + n
    total, count = parallel.sum_floats(total, count)
    return total / max(count, 1)


def share_importance(collector: ImportanceCollector, root: nn.Module, names: Sequence[str],
                     parallel: DataParallel) -> None:
    """Sum the activation statistics of the layers ``names`` over the processes (each saw its own batches), so
    every process searches the same clip factors; a layer no token of this process reached takes part with
    zeros."""
    if not parallel.distributed or not names:
        return
    for n in names:
        if n not in collector.sums:
            lin = root.get_submodule(n)
            collector.sums[n] = torch.zeros(lin.in_features, device=lin.weight.device, dtype=torch.float64)
    parallel.sum_([collector.sums[n] for n in names])
    counts = parallel.sum_floats(*(collector.counts.get(n, 0) for n in names))  # one exchange for all the layers
    collector.counts.update({n: int(c) for n, c in zip(names, counts)})


def _opt_rtn_unit(run: _Run, unit: Sequence[nn.Module], name: str, layers: Sequence[Any], extras: List[UnitInputs],
                  q_in: List[Any], store: TensorStore, ac: Optional[torch.dtype], home: torch.device,
                  orig_dtype: torch.dtype) -> UnitOutcome:
    """Optimized RTN of one unit.

    The activation importance of its layers comes from a forward of the quantized chain's input (the
    FP chain's without ``enable_quanted_input``, the same thing at iters=0 since nothing upstream
    changes then); each layer gets its clip search; then the unit's output error over the calibration
    tokens is compared with plain RTN's and the better of the two is kept (one more forward): the
    search minimises a per-layer proxy, this makes the unit never worse than plain RTN on the data."""
    t0 = time.perf_counter()
    collector = ImportanceCollector()
    with watch_inputs(run.model, [lp.name for lp in layers], collector):
        fp_out, ac, peak = _forward_all(unit, q_in, extras, run.device, store, ac, name, collector)
    share_importance(collector, run.model, [lp.name for lp in layers], run.parallel)
    lins = {lp.name: run.model.get_submodule(lp.name) for lp in layers}
    weights = {n: lin.weight.detach().float().clone() for n, lin in lins.items()}  # the candidates overwrite them

    def record(lp, search: bool):
        alpha, beta = search_clip(weights[lp.name], lp.params, collector.importance(lp.name)) if search \
            else (None, None)
        return quantized_record(weights[lp.name], lp.params, None, alpha, beta, lins[lp.name].bias)

    searched = any(lp.params.scheme in SEARCHABLE for lp in layers)
    candidates = [{lp.name: record(lp, lp.params.scheme in SEARCHABLE) for lp in layers}]
    if searched:
        candidates.append({lp.name: record(lp, False) for lp in layers})  # plain RTN
    outputs, errors = [], []
    for records in candidates:
        for n, qw in records.items():
            load_record(lins[n], qw)
        outputs.append(_forward_all(unit, q_in, extras, run.device, store, ac, name)[0] if layers else fp_out)
        errors.append(_output_error(outputs[-1], fp_out, extras, run.device, run.parallel) if searched else 0.0)
    best = min(range(len(candidates)), key=lambda i: errors[i])  # ties keep the search (first)
    if best != len(candidates) - 1:
        for n, qw in candidates[best].items():
            load_record(lins[n], qw)
    result = None
    if searched:
        if best == 1:
            logger.info("%s: plain round-to-nearest kept (output error %.6g vs %.6g for the clip search)", name,
                        errors[1], errors[0])
        result = BlockResult(name, errors[1], errors[0], min(errors), 1 - best, time.perf_counter() - t0, {}, peak)
    q_out = outputs[best] if run.settings.enable_quanted_input else fp_out
    for b in unit:
        b.to(device=home, dtype=orig_dtype)
    return q_out, q_out, candidates[best], result


def opt_rtn_active(settings: Settings) -> bool:
    """True when ``iters=0`` runs optimized RTN (calibration data needed) rather than plain RTN."""
    return settings.iters == 0 and not settings.disable_opt_rtn


def quantize_model(
    model: nn.Module,
    plan: QuantPlan,
    settings: Settings,
    batches: BatchFactory,
    device: torch.device,
    progress: bool = True,
    resume_dir: Optional[str] = None,
    hooks: Optional[UnitHooks] = None,
    parallel: DataParallel = SINGLE,
) -> Tuple[Dict[str, QuantizedWeight], List[BlockResult]]:
    """Quantize ``model`` in place following ``plan``; returns integer records and block losses.

    ``batches()`` yields model-input dicts on the model's device (called once per block list).
    With ``settings.iters == 0`` the layers of the blocks get optimized RTN (:func:`_opt_rtn_unit`), or plain
    round-to-nearest without any data with ``disable_opt_rtn``.
    ``resume_dir``: checkpoint each tuned unit there and reuse the units found (:mod:`auto_round.tuning.resume`).
    ``hooks``: where the weights come from and where the records go (:class:`UnitHooks`; default: the model
    holds its weights and the records are returned).
    ``parallel``: this process's share of the batches and how it sums with the others
    (:mod:`auto_round.tuning.parallel`); every process returns the same records.
    """
    torch.manual_seed(settings.seed)
    run = _Run(model, plan, settings, batches, device, progress, torch.Generator().manual_seed(settings.seed),
               resume_dir=resume_dir, hooks=hooks or UnitHooks(), parallel=parallel)
    if settings.iters > 0 or opt_rtn_active(settings):
        for path, names in plan.block_lists:
            _tune_list(run, path, names)
    for lp in plan.quantized:
        if lp.name not in run.layers:  # iters == 0, or a layer outside every tuned block
            run.hooks.load(model, [lp.name])
            _keep(run, [lp.name], {lp.name: rtn_quantize(model.get_submodule(lp.name), lp.params)}, None)
    missing = [lp.name for lp in plan.quantized if lp.name not in run.layers]
    if missing:
        raise RuntimeError(f"quantization silently skipped layers: {missing[:5]}")
    return run.layers, run.results
