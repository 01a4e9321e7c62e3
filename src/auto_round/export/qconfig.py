"""The ``quantization_config`` dict saved with every checkpoint (REFERENCE.md section 4)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from auto_round.config import Settings
from auto_round.tuning.plan import QuantPlan
from auto_round.version import __version__


def build_quantization_config(settings: Settings, plan: QuantPlan, dataset: str) -> Dict[str, Any]:
    """Global scheme, the tuned block lists, per-layer exceptions and the tuning hyperparameters.

    ``extra_config`` holds every layer that differs from the global scheme: layers inside the block
    lists kept in full precision (``bits: 16``), and quantized layers with other bits/group/sym
    (including ``lm_head`` or others outside the block lists).
    """
    gs = settings.group_size
    extended, plain = _tuners_run(settings, plan)
    extra: Dict[str, Dict[str, Any]] = {}
    for lp in plan.layers:
        if lp.params is None:
            if lp.block is not None:
                extra[lp.name] = {"bits": 16, "data_type": "float"}
            continue
        p_gs = -1 if (gs == -1 and lp.params.group_size == lp.in_features) else lp.params.group_size
        same = (lp.params.bits, p_gs, lp.params.sym) == (settings.bits, gs, settings.sym)
        if not same or lp.block is None:
            extra[lp.name] = {"bits": lp.params.bits, "group_size": p_gs, "sym": lp.params.sym, "data_type": "int"}
    config = {
        "quant_method": "auto-round",
        "bits": settings.bits,
        "group_size": gs,
        "sym": settings.sym,
        "data_type": settings.data_type,
        "block_name_to_quantize": ",".join(p for p, _ in plan.block_lists),
        "extra_config": extra,
        "iters": settings.iters,
        "lr": settings.resolved_lr,
        "minmax_lr": settings.resolved_minmax_lr,
        "nsamples": settings.nsamples,
        "seqlen": settings.seqlen,
        "batch_size": settings.batch_size,
        "gradient_accumulate_steps": settings.gradient_accumulate_steps,
        "enable_minmax_tuning": settings.enable_minmax_tuning,
        "enable_quanted_input": settings.enable_quanted_input,
        # the tuner that ran (enable_alg_ext resolved per unit: GGUF K-quant units keep the plain tuner by default)
        "enable_alg_ext": bool(extended),
        "scale_dtype": settings.scale_dtype,
        "sym_style": settings.sym_style,
        "seed": settings.seed,
        "dataset": dataset,
        "autoround_version": __version__,
    }
    if extended and plain:  # a plan mixing K-quant and integer units ran both tuners
        config["plain_tuner_blocks"] = plain
    if settings.e2e_epochs:  # the scales were trained end to end after the block-wise tuning
        widths = sorted({lp.params.bits for lp in plan.quantized})
        config.update(e2e_epochs=settings.e2e_epochs, e2e_lr=settings.resolved_e2e_lr(settings.bits))
        if widths != [settings.bits]:  # mixed widths, or one width other than the global scheme's
            config["e2e_lr_by_bits"] = {str(b): settings.resolved_e2e_lr(b) for b in widths}
    return config


def _tuners_run(settings: Settings, plan: QuantPlan) -> Tuple[List[str], List[str]]:
    """The tuned blocks whose unit (:meth:`QuantPlan.units`, as the tuning loop cuts them) ran the extended tuner,
    and those that ran the plain one (:meth:`Settings.extended_tuner_for` of the unit's schemes; none with ``iters=0``)."""
    extended: List[str] = []
    plain: List[str] = []
    if settings.iters == 0:
        return extended, plain
    for unit in plan.units(settings.nblocks):
        schemes = [lp.params.scheme for b in unit for lp in plan.in_block(b)]
        if schemes:
            (extended if settings.extended_tuner_for(schemes) else plain).extend(unit)
    return extended, plain
