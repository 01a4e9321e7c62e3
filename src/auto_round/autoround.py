"""The public facade for text LLMs.

Lifecycle of a run (each phase lives in the module named after it):

1. **resolve plan** (:mod:`auto_round.tuning.plan`): block lists, each linear layer's scheme, what
   stays in full precision and why; export-format capability checked here, before any tuning.
2. **build calibration data** (:mod:`auto_round.calib.text`): token windows from the data set.
3. **capture block inputs** (:mod:`auto_round.calib.cache`).
4. **tune blocks** (:mod:`auto_round.tuning.loop` / :mod:`auto_round.tuning.block`).
5. **pack and export** (:mod:`auto_round.export`): written to a temporary folder, then moved into
   place, so a failed save never destroys an existing folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from auto_round.config import Settings, build_settings
from auto_round.device import peak_gpu_mb, peak_rss_mb, resolve_device
from auto_round.export.folder import check_output_dir, output_targets, parse_formats, write_atomically
from auto_round.models.blocks import resolve_block_names
from auto_round.models.loading import load_causal_lm
from auto_round.quant.qdq import QuantParams
from auto_round.quant.types import QuantizedWeight
from auto_round.report import build_report, count_tokens, write_report
from auto_round.threads import apply_threads
from auto_round.tuning.block import BlockResult
from auto_round.tuning.loop import opt_rtn_active, quantize_model
from auto_round.tuning.parallel import from_environment, local_device
from auto_round.tuning.plan import QuantPlan, resolve_plan
from auto_round.tuning.resume import clear_resume_dir, default_resume_dir

logger = logging.getLogger(__name__)


def _capability_checker(formats: Sequence[str]):
    from auto_round.export import get_format

    exporters = [get_format(f) for f in formats]

    def check(name: str, out: int, in_: int, params) -> Optional[str]:
        for fmt, ex in zip(formats, exporters):
            why = ex.check_params(name, out, in_, params)
            if why:
                return f"{fmt}: {why}"
        return None

    return check


def _format_params(formats: Sequence[str], model: nn.Module):
    """The plan's ``format_params``: the scheme per layer of the one format that decides it (a GGUF
    K-quant mix); None when the settings decide. Two formats deciding differently are refused."""
    from auto_round.export import get_format

    def choose(layers):
        picks = [(f, c) for f in formats if (c := get_format(f).layer_params(model, layers)) is not None]
        first = {n: p for n, (p, _) in picks[0][1].items()} if picks else {}
        for f, c in picks[1:]:
            if {n: p for n, (p, _) in c.items()} != first:
                raise ValueError(f"formats {picks[0][0]!r} and {f!r} choose different schemes for the same layers; "
                                 "one tuning run has one scheme per layer: export them from separate runs")
        return picks[0][1] if picks else None

    return choose


def _check_whole_plan(plan: QuantPlan, formats: Sequence[str], scale_dtype: torch.dtype) -> None:
    from auto_round.export import get_format

    schemes = {lp.name: (lp.params.bits, lp.params.group_size, lp.params.sym) for lp in plan.quantized}
    for fmt in formats:
        why = get_format(fmt).check_scale_dtype(scale_dtype) or get_format(fmt).check_plan(schemes)
        if why:
            raise ValueError(f"cannot export this plan as {fmt!r}: {why}")


def _check_models(formats: Sequence[str], model: nn.Module, tokenizer: Any) -> None:
    """Each format's :meth:`Exporter.check_model` (architecture, config, tokenizer), before tuning."""
    from auto_round.export import get_format

    for fmt in formats:
        why = get_format(fmt).check_model(model, tokenizer)
        if why:
            raise ValueError(f"cannot export this model as {fmt!r}: {why}")


def _check_finite_weights(model: nn.Module, plan: QuantPlan) -> None:
    """NaN/Inf in a weight to quantize would give NaN scales: refuse before tuning, naming the layers."""
    bad = [lp.name for lp in plan.quantized if not bool(torch.isfinite(model.get_submodule(lp.name).weight).all())]
    if bad:
        shown = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        raise ValueError(f"the weights of {len(bad)} layer(s) hold NaN or Inf: {shown}; the model is damaged "
                         "(check the checkpoint, or the dtype it was loaded in), or keep them FP with fp_layers")


def _check_parallel(settings: Settings, world: int) -> None:
    """Refuse, before any loading, what a data-parallel run (``torchrun``, ``world`` processes) cannot do."""
    if world == 1:
        return
    if settings.low_cpu_mem_usage:
        raise ValueError(f"low_cpu_mem_usage=True with {world} data-parallel processes: each would stream and write "
                         "the same shards; run the streamed mode in one process, or drop low_cpu_mem_usage")
    if settings.e2e_epochs:
        raise ValueError(f"e2e_epochs={settings.e2e_epochs} with {world} data-parallel processes: the end-to-end scale "
                         "tuning runs in one process; drop e2e_epochs (or run in one process)")
    if settings.resume_dir is not None:
        raise ValueError(f"resume_dir={settings.resume_dir!r} with {world} data-parallel processes: resuming is not "
                         "supported across processes; drop resume_dir (or run in one process)")
    if not (opt_rtn_active(settings) or settings.iters > 0):
        return  # plain RTN: no calibration data
    if settings.batch_size % world:
        raise ValueError(f"batch_size={settings.batch_size} does not split over {world} data-parallel processes (each "
                         f"runs batch_size / {world} samples of every step): use a batch_size that is a multiple of "
                         f"{world}, e.g. {max(1, settings.batch_size // world) * world}")
    if settings.nsamples % settings.batch_size:
        raise ValueError(f"nsamples={settings.nsamples} is not a multiple of batch_size={settings.batch_size}: with "
                         f"{world} data-parallel processes every step must split alike; use nsamples="
                         f"{max(1, settings.nsamples // settings.batch_size) * settings.batch_size}")


def _check_seqlen(model: nn.Module, settings: Settings) -> None:
    """Calibration windows longer than the model's positions: refused before tuning (some families index
    past their position table, others extrapolate silently)."""
    if settings.iters == 0 and settings.disable_opt_rtn:
        return
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and settings.seqlen > limit:
        raise ValueError(f"seqlen={settings.seqlen} exceeds the model's max_position_embeddings={limit}; "
                         f"use seqlen <= {limit}")


FP16_MAX = 65504.0


def _warn_fp16_overflow(results: Sequence[BlockResult]) -> None:
    """Blocks whose activations exceed fp16's range give inf/garbage in fp16 kernels: said at export."""
    over = sorted((r for r in results if r.peak_activation > FP16_MAX), key=lambda r: -r.peak_activation)
    if over:
        logger.warning("activations of %d block(s) exceed the fp16 range (max |x| %.3g in %s, fp16 ends at 65504): "
                       "run the quantized model in bf16 or fp32, not fp16 (e.g. vLLM --dtype bfloat16)",
                       len(over), over[0].peak_activation, over[0].name)


class AutoRound:
    """Quantize a causal LM's decoder blocks with SignRound and export it.

    Args:
        model: a loaded ``PreTrainedModel``, a local folder, or a hub id.
        tokenizer: the model's tokenizer (loaded from ``model`` when it is a name and this is None).
        model_dtype: dtype to load a model given by name ("fp32", "bf16", "fp16", "auto").
        trust_remote_code: allow modeling code shipped with a checkpoint (off by default).
        allow_pickle: read a folder whose weights are pickled only (``.bin``), with ``weights_only=True``;
            refused by default (pickles can run code).
        **options: every field of :class:`auto_round.config.Settings` (bits, group_size, sym,
            iters, lr, nsamples, seqlen, batch_size, dataset, layer_config, ...). A misspelt
            keyword raises ``TypeError``.

    After :meth:`quantize`, ``quantized_layers`` maps layer names to integer records,
    ``block_results`` holds per-block losses and ``summary`` the run's figures.
    """

    def __init__(self, model: Union[str, Path, nn.Module], tokenizer: Any = None, *,
                 model_dtype: Optional[str] = None, trust_remote_code: bool = False, allow_pickle: bool = False,
                 **options: Any) -> None:
        self.settings: Settings = build_settings(**options)
        self.device = resolve_device(local_device(self.settings.device))
        self.parallel = from_environment(self.device)  # torchrun: this process's share of the calibration data
        _check_parallel(self.settings, self.parallel.world)
        # batch_size stays what one step sees: each process runs batch_size / world samples of it
        self.settings = replace(self.settings, batch_size=self.settings.batch_size // self.parallel.world)
        self.threads = apply_threads(self.settings.threads) if self.device.type == "cpu" else None
        self.streamed_weights = None  # low_cpu_mem_usage: the shards the weightless model reads (models.streamed)
        if self.settings.low_cpu_mem_usage:
            from auto_round.models.streamed import build_streamed_model, local_folder

            folder = local_folder(model, trust_remote_code)
            self.model, self.tokenizer, self.streamed_weights = build_streamed_model(folder, model_dtype,
                                                                                     trust_remote_code, tokenizer)
            self.source: Optional[str] = str(folder)
        else:
            self.model, self.tokenizer, self.source = load_causal_lm(
                model, tokenizer, model_dtype=model_dtype, trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle)
        self.model.eval()
        self.plan: Optional[QuantPlan] = None
        self.quantized_layers: Dict[str, QuantizedWeight] = {}
        self.block_results: List[BlockResult] = []
        self.summary: Dict[str, Any] = {}
        self.dataset_used: str = "none (round-to-nearest)"
        self.samples_used: Optional[int] = None  # calibration samples really used (recorded in the config)
        self.e2e: Optional[Dict[str, Any]] = None  # what the end-to-end scale tuning did (e2e_epochs)
        self.mixed_bits: Optional[Dict[str, Any]] = None  # the avg_bits choice and its report, when asked
        self.tokens_used: Optional[int] = None  # their tokens (padding excluded), for the run report
        self.phase_seconds: Dict[str, float] = {}  # plan, calibration_data, tuning, export:<format>
        self._packed = False

    # ------------------------------------------------------------------ hooks for subclasses
    def block_list_names(self) -> List[str]:
        """Block lists to tune, in order."""
        return resolve_block_names(self.model, self.settings.to_quant_block_names)

    def forced_fp_layers(self) -> Dict[str, str]:
        """Layers that must stay in full precision, with the reason (none for plain LLMs)."""
        return {}

    def outside_reasons(self) -> Dict[str, str]:
        """Module prefixes -> why their layers stay FP (shown in the plan; none for plain LLMs)."""
        return {}

    def calibration_batches(self) -> List[Dict[str, torch.Tensor]]:
        """Model-input dicts for calibration (text windows for LLMs)."""
        from auto_round.calib.text import get_text_calibration

        if self.tokenizer is None:
            raise ValueError("calibration needs a tokenizer: pass tokenizer=..., or use iters=0 for "
                             "round-to-nearest without data")
        s = self.settings
        calib = get_text_calibration(self.tokenizer, s.dataset, nsamples=s.nsamples, seqlen=s.seqlen, seed=s.seed)
        self.dataset_used = calib.description
        # a streamed model's weights are on the meta device until loaded, on CPU
        dev = next((p.device for p in self.model.parameters() if not p.is_meta), torch.device("cpu"))
        ids, mask = calib.input_ids, calib.attention_mask
        self.samples_used = int(ids.shape[0])
        return [{"input_ids": ids[i:i + s.batch_size].to(dev), "attention_mask": mask[i:i + s.batch_size].to(dev)}
                for i in range(0, ids.shape[0], s.batch_size)]

    # ------------------------------------------------------------------ lifecycle
    def resolve_plan(self, formats: Sequence[str] = (), read_weights: bool = True) -> QuantPlan:
        """Phase 1: the plan, checked against ``formats`` when given.

        ``read_weights=False`` skips the checks that read weight values (NaN/Inf), for a model whose
        weights are not loaded (model-free RTN plans on a meta-device skeleton)."""
        _check_models(formats, self.model, self.export_tokenizer())
        check = _capability_checker(formats) if formats else None
        self.plan = resolve_plan(self.model, self.settings, self.block_list_names(), check,
                                 self.forced_fp_layers(), self.outside_reasons(),
                                 _format_params(formats, self.model) if formats else None)
        _check_whole_plan(self.plan, formats, self.settings.torch_scale_dtype)
        if read_weights:
            _check_finite_weights(self.model, self.plan)
        _check_seqlen(self.model, self.settings)
        for line in self.plan.summary_lines():
            logger.info("plan: %s", line)
        return self.plan

    def choose_mixed_bits(self, batches: Callable[[], Iterable[Mapping[str, Any]]]) -> Dict[str, Any]:
        """With ``avg_bits``: one of ``scheme_options`` per layer under the budget, by sensitivity
        (:mod:`auto_round.tuning.autoscheme`), merged into ``layer_config`` under your own entries (which
        win, outside the budget). Returns the report (also ``self.mixed_bits``)."""
        from auto_round.tuning.autoscheme import choose_schemes, parse_options
        from auto_round.tuning.plan import fit_group_size, layer_params

        s = self.settings
        options = parse_options(s.scheme_options)
        base = resolve_plan(self.model, s, self.block_list_names(), None, self.forced_fp_layers(),
                            self.outside_reasons())
        layers = {lp.name: (lp.out_features, lp.in_features) for lp in base.quantized}

        def fit(name: str, o) -> Optional[QuantParams]:
            in_ = layers[name][1]
            gs = fit_group_size(in_, o.group_size)
            return None if gs is None else layer_params(o.bits, gs, in_, o.sym, s)

        scale_bits = 32 if s.torch_scale_dtype == torch.float32 else 16
        config, self.mixed_bits = choose_schemes(self.model, layers, options, float(s.avg_bits), list(batches()),
                                                 fit, scale_bits)
        self.settings = replace(s, layer_config={**config, **dict(s.layer_config or {})})
        return self.mixed_bits

    def quantize(self, format: Union[None, str, Sequence[str]] = None, resume_dir: Optional[str] = None) -> "AutoRound":
        """Run the whole tuning; ``format`` (optional) is checked against every layer first.

        Tuned blocks are checkpointed in ``resume_dir`` (default: the ``resume_dir`` setting; none when
        both are None) and reused by a rerun with the same model, data and settings."""
        if self.settings.low_cpu_mem_usage:
            raise RuntimeError("low_cpu_mem_usage=True writes each block to the output as soon as it is tuned (the "
                               "model never holds all its weights): call quantize_and_save(output_dir, format=...) "
                               "instead of quantize()")
        return self.run_quantize(parse_formats(format) if format else [], resume_dir or self.settings.resume_dir)

    def run_quantize(self, formats: Sequence[str], resume_dir: Optional[str], hooks: Any = None) -> "AutoRound":
        """:meth:`quantize`'s body, for checked ``formats``; ``hooks``: the block loop's
        :class:`~auto_round.tuning.loop.UnitHooks` (a streamed run's loads and writes each unit)."""
        if self.quantized_layers:
            raise RuntimeError("this AutoRound has already quantized its model; create a new one to re-run")
        if self.streamed_weights is not None and hooks is None:
            raise RuntimeError("low_cpu_mem_usage=True: the model holds no weights until its run loads them; call "
                               "quantize_and_save(output_dir, format=...)")
        t0 = time.perf_counter()
        if opt_rtn_active(self.settings) and self.tokenizer is None:
            logger.info("iters=0 without a tokenizer: plain round-to-nearest (optimized RTN needs calibration data)")
            self.settings = replace(self.settings, disable_opt_rtn=True)
        batches: Optional[List[Dict[str, torch.Tensor]]] = None

        def factory() -> Iterable[Mapping[str, Any]]:
            nonlocal batches
            if batches is None:
                t_data = time.perf_counter()
                batches = self.calibration_batches()
                self.tokens_used = count_tokens(batches)
                self.phase_seconds["calibration_data"] = time.perf_counter() - t_data
            return batches

        if self.settings.avg_bits is not None:
            from auto_round.export import get_format

            _check_models(formats, self.model, self.export_tokenizer())  # refusals before the scoring pass, not after it
            deciding = [f for f in formats if get_format(f).layer_params(self.model, {}) is not None]
            if deciding:
                raise ValueError(f"avg_bits={self.settings.avg_bits} chooses each layer's scheme, and so does format "
                                 f"{deciding[0]!r} (llama.cpp's per-tensor type mix): drop avg_bits/scheme_options, "
                                 "or export a format whose schemes the settings decide (e.g. gguf:q4_0, auto_round)")
            t_mixed = time.perf_counter()
            self.choose_mixed_bits(factory)
            self.phase_seconds["mixed_bits"] = time.perf_counter() - t_mixed
        plan = self.resolve_plan(formats, read_weights=self.streamed_weights is None)
        self.phase_seconds["plan"] = time.perf_counter() - t0 - sum(self.phase_seconds.values())

        teacher = self._e2e_teacher(plan, factory) if self.settings.e2e_epochs else None

        self.quantized_layers, self.block_results = quantize_model(
            self.model, plan, self.settings, factory, self.device, resume_dir=resume_dir, hooks=hooks,
            parallel=self.parallel)
        self.phase_seconds["tuning"] = time.perf_counter() - t0 - sum(self.phase_seconds.values())
        if teacher is not None:
            self._e2e_tune(teacher, factory())
        self.summary = self._summarize(time.perf_counter() - t0)
        logger.info("quantized %d layers in %.1fs; peak RSS %.0f MiB", len(self.quantized_layers),
                    self.summary["seconds"], self.summary["peak_rss_mb"])
        return self

    def _e2e_teacher(self, plan: QuantPlan, batches: Callable[[], List[Dict[str, torch.Tensor]]]) -> Any:
        """Before tuning, for ``e2e_epochs``: refuse what the stage cannot train, then the FP model's top-k."""
        from auto_round.tuning.e2e import TOP_K, model_on_device, refuse_kquant, teacher_targets

        refuse_kquant([lp.name for lp in plan.quantized if lp.params.scheme.endswith("_dq")], self.settings.e2e_epochs)
        if self.tokenizer is None:
            raise ValueError("e2e_epochs needs calibration data: pass a tokenizer, or set e2e_epochs=0")
        t = time.perf_counter()
        with model_on_device(self.model, self.device):
            teacher = teacher_targets(self.model, batches(), TOP_K, self.device)
        self.phase_seconds["e2e_teacher"] = time.perf_counter() - t
        return teacher

    def _e2e_tune(self, teacher: Any, batches: List[Dict[str, torch.Tensor]]) -> None:
        """After the block-wise tuning: the end-to-end scale tuning of :mod:`auto_round.tuning.e2e`."""
        from auto_round.tuning.e2e import model_on_device, tune_scales

        t = time.perf_counter()
        s = self.settings
        with model_on_device(self.model, self.device):
            self.e2e = tune_scales(self.model, self.quantized_layers, batches, teacher, s.e2e_epochs,
                                   s.resolved_e2e_lr, s.seed, self.device)
        self.phase_seconds["e2e"] = time.perf_counter() - t
        logger.info("e2e scale tuning: calibration KL %.5f -> %.5f in %.1fs (%s)", self.e2e["kl_before"],
                    self.e2e["kl_after"], self.phase_seconds["e2e"],
                    "kept" if self.e2e["kept"] else "not lower: block-wise scales kept")

    def _summarize(self, seconds: float) -> Dict[str, Any]:
        assert self.plan is not None
        return {
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(peak_gpu_mb(), 1),
            "dataset": self.dataset_used,
            "plan": self.plan.summary_lines(),
            "quantized_layers": len(self.quantized_layers),
            "kept_fp": {lp.name: lp.reason for lp in self.plan.kept_fp},
            "e2e": self.e2e,
            "mixed_bits": None if self.mixed_bits is None else {k: v for k, v in self.mixed_bits.items()
                                                                if k != "scores"},
            "blocks": [{"name": r.name, "first": r.first_loss, "last": r.last_loss, "best": r.best_loss,
                        "best_iter": r.best_iter, "seconds": round(r.seconds, 3), "losses": list(r.losses),
                        "peak_activation": r.peak_activation, "output_error": r.output_error,
                        "start_output_error": r.start_output_error, "kept_start": r.kept_start}
                       for r in self.block_results],
        }

    def run_report(self, fmt: str) -> Dict[str, Any]:
        """The run report of the checkpoint in format ``fmt`` (:mod:`auto_round.report`), as JSON data."""
        if self.plan is None:
            raise RuntimeError("call quantize() first")
        cfg = getattr(self.model, "config", None)
        family = getattr(self, "family", None)  # AutoRoundMLLM's family record
        model = {"source": self.source, "class": type(self.model).__name__,
                 "model_type": getattr(cfg, "model_type", None), "family": getattr(family, "name", None)}
        data = {"dataset": self.dataset_used, "samples": self.samples_used, "tokens": self.tokens_used}
        return build_report(settings=self.settings, plan=self.plan, summary=self.summary, phases=self.phase_seconds,
                            data=data, model=model, fmt=fmt, peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb())

    def quantization_config(self) -> Dict[str, Any]:
        from auto_round.export.qconfig import build_quantization_config

        if self.plan is None:
            raise RuntimeError("call quantize() first")
        config = build_quantization_config(self.settings, self.plan, self.dataset_used)
        if self.samples_used is not None:
            config["nsamples"] = self.samples_used  # what was really used, not what was asked
        config["batch_size"] = self.settings.batch_size * self.parallel.world  # per step, all processes together
        return config

    # ------------------------------------------------------------------ export
    def mark_saved(self) -> None:
        """The model's layers are packed (or, streamed, written and freed): no further export from it."""
        self._packed = True

    def estimated_checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk, per the plan's decision for each layer
        (:func:`auto_round.estimate.checkpoint_bytes`: quantized layers at their bits, with scales and zeros;
        layers kept in full precision, such as ``lm_head`` by default, and everything else at its dtype's size).
        Before :meth:`resolve_plan` the plan of the settings is resolved for it (no format's checks)."""
        from auto_round.estimate import checkpoint_bytes

        plan = self.plan if self.plan is not None else resolve_plan(
            self.model, self.settings, self.block_list_names(), None, self.forced_fp_layers(), self.outside_reasons())
        return checkpoint_bytes(self.model, plan)

    def export_tokenizer(self) -> Any:
        """What formats that embed the tokenizer get (:meth:`Exporter.check_model` / ``export``): the
        tokenizer (AutoRoundMLLM: its processor, whose image settings a GGUF mmproj file needs)."""
        return self.tokenizer

    def save_extra_files(self, folder: Path) -> None:
        """Save the tokenizer beside the weights (subclasses add processors)."""
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(folder))

    def save_quantized(self, output_dir: Union[str, Path] = "tmp_autoround", format: Union[str, Sequence[str]] = "auto_round",
                       inplace: bool = True, overwrite: Optional[bool] = None) -> List[Path]:
        """Export to ``output_dir`` (one sub-folder per format when several are given).

        ``inplace=True`` packs the in-memory model (it then holds quantized modules and cannot be
        exported again); with several formats only the last one packs in place. The checkpoint is
        written to a hidden sibling and swapped in when complete; in a folder that already holds
        files only what an earlier run of ours wrote (its manifest) is replaced, your own files are
        kept, and a non-empty folder we did not write needs ``overwrite=True``; the source model's
        folder (or one inside or around it) is never written (:mod:`auto_round.export.folder`).
        """
        from auto_round.export import get_format

        if self.settings.low_cpu_mem_usage:
            raise RuntimeError("low_cpu_mem_usage=True saves while it tunes: call quantize_and_save(output_dir, "
                               "format=...) (its output is complete; export other formats from an in-memory run)")
        if not self.quantized_layers:
            raise RuntimeError("nothing to save: call quantize() first")
        if not self.parallel.is_writer:  # every process holds the same records: rank 0 writes them
            logger.info("data-parallel rank %d: rank 0 writes the checkpoint", self.parallel.rank)
            return output_targets(output_dir, parse_formats(format))
        if self._packed:
            raise RuntimeError("the model was packed in place by an earlier save_quantized(inplace=True); "
                               "pass inplace=False to every save but the last")
        formats = parse_formats(format)
        _check_models(formats, self.model, self.export_tokenizer())
        check = _capability_checker(formats)
        bad = [f"{n}: {why}" for n, q in self.quantized_layers.items()
               if (why := check(n, q.out_features, q.in_features, q))]
        if bad:
            raise ValueError("cannot export these layers:\n  " + "\n  ".join(bad[:10]))
        targets = output_targets(output_dir, formats)
        qconfig = self.quantization_config()
        _warn_fp16_overflow(self.block_results)
        written = []
        for i, (fmt, target) in enumerate(zip(formats, targets)):
            pack_inplace = inplace and i == len(formats) - 1

            def write(tmp: Path) -> None:
                t0 = time.perf_counter()
                get_format(fmt).export(self.model, self.quantized_layers, tmp, dict(qconfig), pack_inplace,
                                       tokenizer=self.export_tokenizer())
                self.save_extra_files(tmp)
                self.phase_seconds[f"export:{fmt}"] = time.perf_counter() - t0
                write_report(tmp, self.run_report(fmt))

            write_atomically(target, self.source, overwrite, write)
            self._packed = self._packed or pack_inplace
            logger.info("saved %s checkpoint to %s", fmt, target)
            written.append(target)
        return written

    def quantize_and_save(self, output_dir: Union[str, Path] = "tmp_autoround",
                          format: Union[str, Sequence[str]] = "auto_round", inplace: bool = True,
                          overwrite: Optional[bool] = None) -> List[Path]:
        """:meth:`quantize` then :meth:`save_quantized`; the formats and every output folder are checked
        before tuning (source folder, files of yours in the way, permissions, free space).

        With ``low_cpu_mem_usage`` the model is streamed from its shards, each block written as soon as it is
        tuned (:mod:`auto_round.model_free.streaming`); ``inplace`` does not apply."""
        if self.settings.low_cpu_mem_usage:
            from auto_round.model_free.streaming import quantize_and_save_streamed

            return quantize_and_save_streamed(self, output_dir, format, overwrite)
        formats = parse_formats(format)
        estimate = self.estimated_checkpoint_bytes()
        for target in output_targets(output_dir, formats):
            check_output_dir(target, self.source, overwrite, estimated_bytes=estimate)
        # one process per run may checkpoint its units; data-parallel processes do not (_check_parallel)
        resume = (self.settings.resume_dir or str(default_resume_dir(output_dir))) if self.parallel.world == 1 \
            else None
        self.quantize(format=format, resume_dir=resume)
        written = self.save_quantized(output_dir, format=format, inplace=inplace, overwrite=overwrite)
        if resume is not None:
            clear_resume_dir(resume)  # the checkpoint is complete: its tuned units are no longer needed
        return written
