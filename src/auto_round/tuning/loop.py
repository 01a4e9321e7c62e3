"""The block loop: capture a block list's inputs, then tune its units one after another.

For each block list in the plan (in order, so a vision tower tuned first feeds its quantized
output into the language model's capture): capture inputs with one forward per calibration
batch, then for each unit of ``nblocks`` blocks compute FP targets, tune, and feed the quantized
output forward. Layers planned outside any block are quantized round-to-nearest.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

import torch
import torch.nn as nn

from auto_round.calib.cache import CapturedBatch, capture_block_inputs, to_device
from auto_round.config import Settings
from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.block import BlockResult, UnitInputs, run_unit, tune_unit
from auto_round.tuning.plan import QuantPlan
from auto_round.tuning.wrapper import rtn_quantize

logger = logging.getLogger(__name__)

BatchFactory = Callable[[], Iterable[Mapping[str, Any]]]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


@torch.no_grad()
def _forward_all(blocks, inputs: List[torch.Tensor], extras: List[UnitInputs], device, dtype, cache_device):
    return [run_unit(blocks, x.to(device, dtype), ex).to(cache_device)
            for x, ex in zip(inputs, extras)]


def _unit_extras(captured: List[CapturedBatch], start: int, end: int, device) -> List[UnitInputs]:
    return [UnitInputs(to_device(c.block_args[start:end], device), to_device(c.block_kwargs[start:end], device),
                       c.loss_mask) for c in captured]


def _tune_list(model: nn.Module, plan: QuantPlan, path: str, block_names, settings: Settings,
               batches: BatchFactory, device: torch.device, gen: torch.Generator, progress: bool,
               layers_out: Dict[str, QuantizedWeight], results: List[BlockResult]) -> None:
    cache_device = torch.device("cpu") if settings.low_gpu_mem_usage else device
    blocks = [model.get_submodule(b) for b in block_names]
    captured = capture_block_inputs(model, blocks, batches(), cache_device)
    q_in = [c.hidden for c in captured]
    fp_in = q_in
    bar = _progress(len(blocks), f"tuning {path}", progress)
    for start in range(0, len(blocks), settings.nblocks):
        end = min(start + settings.nblocks, len(blocks))
        unit, names = blocks[start:end], block_names[start:end]
        home = next(unit[0].parameters()).device
        orig_dtype = next(unit[0].parameters()).dtype
        for b in unit:
            b.to(device=device, dtype=torch.float32)
        extras = _unit_extras(captured, start, end, device)
        targets = _forward_all(unit, fp_in, extras, device, torch.float32, cache_device)
        layers = [lp for n in names for lp in plan.in_block(n)]
        if layers:
            res = tune_unit(model, ",".join(names), unit, layers, q_in, targets, extras, settings, device, gen,
                            torch.float32)
            layers_out.update(res.layers)
            results.append(res)
            logger.info("%s: loss first %.6g  last %.6g  best %.6g @%d  (%.1fs)", res.name, res.first_loss,
                        res.last_loss, res.best_loss, res.best_iter, res.seconds)
        q_out = _forward_all(unit, q_in, extras, device, torch.float32, cache_device) \
            if settings.enable_quanted_input else targets
        for b in unit:
            b.to(device=home, dtype=orig_dtype)
        fp_in, q_in = targets, q_out
        bar.update(end - start)
    bar.close()


def quantize_model(
    model: nn.Module,
    plan: QuantPlan,
    settings: Settings,
    batches: BatchFactory,
    device: torch.device,
    progress: bool = True,
) -> Tuple[Dict[str, QuantizedWeight], List[BlockResult]]:
    """Quantize ``model`` in place following ``plan``; returns integer records and block losses.

    ``batches()`` yields model-input dicts on the model's device (called once per block list).
    With ``settings.iters == 0`` no data is used: every planned layer is rounded to nearest.
    """
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    layers: Dict[str, QuantizedWeight] = {}
    results: List[BlockResult] = []
    if settings.iters > 0:
        for path, names in plan.block_lists:
            _tune_list(model, plan, path, names, settings, batches, device, gen, progress, layers, results)
    for lp in plan.quantized:
        if lp.name not in layers:  # iters == 0, or a layer outside every tuned block
            layers[lp.name] = rtn_quantize(model.get_submodule(lp.name), lp.params)
    missing = [lp.name for lp in plan.quantized if lp.name not in layers]
    if missing:
        raise RuntimeError(f"quantization silently skipped layers: {missing[:5]}")
    return layers, results
