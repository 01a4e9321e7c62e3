"""Every public knob of a quantization run, declared once as data.

The API (:class:`auto_round.AutoRound`) and the CLI (:mod:`auto_round.cli`) both build their
options from :data:`OPTIONS`, so their names and defaults cannot drift. :func:`build_settings`
validates keywords once and returns a frozen :class:`Settings`; everything downstream receives
that resolved object.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from auto_round.quant.opt_rtn import K_SCHEMES
from auto_round.quant.qdq import SUPPORTED_BITS

np_bool = np.bool_

E2E_LR_2BIT = 1.5e-3  # default e2e_lr of a 2-bit layer (Settings.resolved_e2e_lr scales it by width)

SCALE_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
SYM_STYLES = ("full_range", "gptq")
DEFAULT_DATASET = "NeelNanda/pile-10k"

logger = logging.getLogger(__name__)


def _opt(default: Any, help: str, cli: Tuple[str, ...] = (), api: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli, "api": api})


@dataclass(frozen=True)
class Settings:
    """Resolved settings of one run. Defaults are the reference implementation's, except the tuner: the extended
    one wherever the clip factors are tuned on an integer grid (``enable_alg_ext=None``), measured better at
    equal time."""

    bits: int = _opt(4, "weight bits (2-8)")
    group_size: int = _opt(128, "group length along the input dimension; -1 = one group per row")
    sym: bool = _opt(True, "symmetric quantization (CLI: --asym turns it off)")
    sym_style: str = _opt("full_range", "sym grid: 'full_range' (all 2^b levels, reference default) or 'gptq'")
    data_type: str = _opt("int", "weight data type; only 'int' is implemented")
    scale_dtype: str = _opt("fp16", "dtype the scales are tuned and stored in: fp16 (what every engine reads), or bf16/fp32 "
                                       "(format auto_round only; our loader reads them back)")
    iters: int = _opt(200, "tuning iterations per block; 0 = no tuning: optimized round-to-nearest (a clip search "
                           "weighted by the calibration activations), or plain round-to-nearest with disable_opt_rtn",
                      ("--iter",))
    enable_alg_ext: Optional[bool] = _opt(
        None, "extended tuner: the clip factors start from the importance-weighted optimized-RTN search, each "
              "token's error counts relative to its FP target's mean square, and below 4 bits the largest 0.1% of "
              "squared errors are left out of the loss. None (default): on wherever the clip factors are tuned "
              "(enable_minmax_tuning) on an integer grid (GGUF K-quants keep the plain tuner), as it gives a "
              "lower perplexity than the plain tuner in the same time at W2, W3 and W4 (README); False: the "
              "plain SignRound tuner, the reference's default (CLI: --disable_alg_ext)")
    enable_torch_compile: bool = _opt(False, "compile each tuned unit's forward with torch.compile (inductor; compiled "
                                             "once for blocks of one shape): a faster tuning step, results equal to "
                                             "eager up to float rounding (fused kernels sum in another order)")
    e2e_epochs: int = _opt(0, "after the block-wise tuning, train every group scale end to end for this many epochs over "
                              "the calibration data (KL to the full-precision model's top-128 next-token "
                              "probabilities; integer codes unchanged; kept only when it lowers that KL): 0 = off. "
                              "Needs the whole model on the tuning device, float scales (not GGUF K-quants), one "
                              "process")
    e2e_lr: Optional[float] = _opt(None, "Adam learning rate of the end-to-end scale tuning, as a relative change of each scale "
                                         "per step, cosine decay (default per layer 1.5e-3 x 2^((2 - bits) / 2): 1.5e-3 "
                                         "at 2 bits, 1.06e-3 at 3, 7.5e-4 at 4)")
    disable_opt_rtn: bool = _opt(False, "with iters=0, plain round-to-nearest without calibration data instead of the "
                                        "importance-weighted clip search")
    lr: Optional[float] = _opt(None, "learning rate of the rounding offsets (default 1/iters)")
    minmax_lr: Optional[float] = _opt(None, "learning rate of the clip factors (default lr)")
    nsamples: int = _opt(128, "number of calibration samples")
    seqlen: int = _opt(2048, "tokens per calibration sample", ("--seq_len",))
    batch_size: int = _opt(8, "calibration samples per tuning step", ("--train_bs", "--bs"))
    gradient_accumulate_steps: int = _opt(1, "micro-batches accumulated per step (tokens weigh equally)")
    enable_minmax_tuning: bool = _opt(True, "tune per-group clip factors (CLI: --disable_minmax_tuning)")
    enable_quanted_input: bool = _opt(True, "feed each block the quantized blocks' output (CLI: --disable_quanted_input)")
    nblocks: int = _opt(1, "consecutive blocks tuned together")
    amp: bool = _opt(True, "autocast the tuning forward to bf16 (CPUs with native bf16; CUDA: the model's half "
                           "dtype), for the tuned forward and the FP targets alike; weights and their qdq stay float32 "
                           "(CLI: --disable_amp)")
    low_gpu_mem_usage: bool = _opt(False, "keep cached block inputs on CPU")
    low_cpu_mem_usage: bool = _opt(False, "stream the model from its safetensors shards: built without weights, each "
                                          "block loaded, tuned, packed, written and freed in turn (peak memory about "
                                          "one block plus the calibration cache, whatever the depth); needs a model "
                                          "folder or hub id with safetensors, quantize_and_save and one packed-integer "
                                          "format (auto_round, auto_gptq, auto_awq)")
    offload_dir: Optional[str] = _opt(None, "keep cached block inputs/outputs in files under this folder")
    not_use_best_mse: bool = _opt(False, "keep the last iteration's parameters instead of the best")
    seed: int = _opt(42, "random seed: same seed, data and settings give identical output")
    threads: Optional[int] = _opt(None, "CPU threads (default: the cores this process may use, from its affinity "
                                        "and cgroup quota; 1 is fastest beside other busy processes)")
    device: Optional[str] = _opt(None, "tuning device: cpu, cuda, cuda:N or N (default: cuda if present)", ("--devices",))
    dataset: str = _opt(DEFAULT_DATASET, "calibration data: hub name, local file/dir, or comma list")
    layer_config: Optional[Mapping[str, Mapping[str, Any]]] = _opt(
        None, "per-layer overrides {name or regex: {bits, group_size, sym}}; bits >= 16 keeps FP", api=True)
    fp_layers: str = _opt("", "comma list of layer-name fragments kept in full precision")
    quant_lm_head: bool = _opt(False, "also quantize lm_head (refused with tied embeddings)")
    avg_bits: Optional[float] = _opt(None, "mixed bits: the average stored bits per quantized weight (scales and "
                                           "zeros included); each layer gets one of scheme_options, chosen by "
                                           "sensitivity (needs calibration data)")
    scheme_options: Optional[str] = _opt(None, "mixed bits: the candidate schemes, comma separated, e.g. "
                                               "'W2G64,W4G128' (or the reference's W2A16,W4A16)", ("--options",))
    resume_dir: Optional[str] = _opt(None, "checkpoint each tuned block here; rerun with the same value (and the "
                                           "same model, data, settings) to continue an interrupted run. "
                                           "quantize_and_save uses a hidden folder beside the output by default")
    to_quant_block_names: Optional[Union[str, Tuple[str, ...]]] = _opt(
        None, "comma list of block-list paths to tune (default: found automatically)")

    # ------------------------------------------------------------------ derived values
    def extended_tuner_for(self, schemes: Iterable[str]) -> bool:
        """Whether the extended tuner tunes a unit whose layers have these ``schemes``: ``enable_alg_ext``, or when
        None, whenever the clip factors are tuned and no layer is a GGUF K-quant (there it measured worse: SmolLM2
        q2_k_s 48.59 against the plain tuner's 47.12 in llama.cpp; the plain tuner starts K grids from the same
        search anyway)."""
        if self.enable_alg_ext is not None:
            return self.enable_alg_ext
        return self.enable_minmax_tuning and not any(s in K_SCHEMES for s in schemes)

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1.0 / self.iters if self.iters > 0 else 5e-3

    @property
    def resolved_minmax_lr(self) -> float:
        return float(self.minmax_lr) if self.minmax_lr is not None else self.resolved_lr

    def resolved_e2e_lr(self, bits: int) -> float:
        """``e2e_lr`` of a ``bits``-bit layer: the one given, else ``E2E_LR_2BIT * 2**((2 - bits) / 2)``.

        A relative change ``d`` of a scale moves a weight on level ``q`` by ``d * |q|`` quantization steps,
        and ``|q|`` reaches ``2**(bits - 1)``, so wider layers need smaller rates; measured, the best rate halves
        every two bits rather than every bit (SmolLM2, ``enable_alg_ext`` iters 50, 2 epochs, float32 tuning,
        held-out perplexity; ``bench/bench_e2e_lr.py``): W4G128 1.5e-3 raised the calibration KL in its second
        epoch (block-wise scales kept), 7.5e-4 read 33.42 against 33.50 at 3.75e-4; W3G128 1.06e-3 read 40.77
        against 41.05 at 7.5e-4. 1.5e-3 at 2 bits (W2G64 79.00)."""
        return float(self.e2e_lr) if self.e2e_lr is not None else E2E_LR_2BIT * 2.0 ** ((2 - bits) / 2)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def scheme(self) -> str:
        if not self.sym:
            return "asym"
        return "sym" if self.sym_style == "full_range" else "sym_gptq"


OPTION_NAMES = tuple(f.name for f in fields(Settings))

# Recipes (reference: auto-round-best / auto-round-light; CLI --recipe NAME, API build_settings(recipe=...)):
# setting overrides on top of the defaults; explicit options still win.
RECIPES: Dict[str, Dict[str, Any]] = {
    "default": {},
    "best": {"iters": 1000, "nsamples": 512, "low_gpu_mem_usage": True},
    "light": {"iters": 50, "lr": 5e-3},
    "rtn": {"iters": 0, "disable_opt_rtn": True},
    "opt-rtn": {"iters": 0},
}
RECIPE_NOTES: Dict[str, str] = {
    "default": "SignRound, 200 iterations per block on 128 samples (the reference defaults)",
    "best": "best accuracy, about 5x the default's time: 1000 iterations on 512 samples, block inputs kept on CPU",
    "light": "about 4x faster than the default: 50 iterations at lr 5e-3",
    "rtn": "plain round-to-nearest: no calibration data, no tuning (seconds)",
    "opt-rtn": "optimized round-to-nearest: no tuning, a clip search weighted by the calibration activations",
}


def _check(cond: bool, name: str, value: Any, fix: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: {fix}")


def _type_problem(name: str, kind: str, value: Any) -> Optional[str]:
    """Why ``value`` is not of the declared ``kind`` of field ``name`` (as a message), or None."""
    if kind == "int" and not (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool))):
        return f"{name}={value!r} ({type(value).__name__}) must be an int, e.g. {name}={Settings.__dataclass_fields__[name].default}"
    if kind == "Optional[int]" and value is not None and not (isinstance(value, numbers.Integral)
                                                              and not isinstance(value, (bool, np_bool))):
        return f"{name}={value!r} ({type(value).__name__}) must be an int or None"
    if kind == "bool" and not isinstance(value, (bool, np_bool)):
        return f"{name}={value!r} ({type(value).__name__}) must be True or False (a string such as 'False' is not a bool)"
    if kind == "Optional[bool]" and value is not None and not isinstance(value, (bool, np_bool)):
        return f"{name}={value!r} ({type(value).__name__}) must be True, False or None (the default)"
    if kind == "Optional[float]" and value is not None:
        if isinstance(value, (bool, np_bool)) or not isinstance(value, numbers.Real):
            return f"{name}={value!r} ({type(value).__name__}) must be a number or None"
        if not math.isfinite(float(value)):
            return f"{name}={value!r} must be finite (and positive), or None for the default"
    if kind in ("str", "Optional[str]") and not isinstance(value, str) and not (kind == "Optional[str]" and value is None):
        if not (name == "device" and isinstance(value, (int, torch.device)) and not isinstance(value, bool)):
            fix = (": a data set name, a local file or folder, or a comma list of them (texts in a list: write them "
                   "to a .txt or .jsonl file and pass its path)") if name == "dataset" else ""
            return f"{name}={value!r} ({type(value).__name__}) must be a string{fix}"
    return None


def check_option_type(name: str, value: Any) -> None:
    """The Settings type check of one option (TypeError naming it, the value and the fix), for code that reads
    the option before the Settings are built."""
    why = _type_problem(name, str(Settings.__dataclass_fields__[name].type), value)
    if why:
        raise TypeError(why)


def _normalise_types(s: Settings) -> Settings:
    """Type-check every field once (TypeError naming the field, the value and the fix) and turn numpy
    scalars into Python ones, so that the saved config records plain ints, bools and floats."""
    changes: Dict[str, Any] = {}
    for f in fields(s):
        value = getattr(s, f.name)
        why = _type_problem(f.name, str(f.type), value)
        if why:
            raise TypeError(why)
        if str(f.type) in ("int", "Optional[int]") and value is not None and type(value) is not int:
            changes[f.name] = int(value)
        elif str(f.type) in ("bool", "Optional[bool]") and value is not None and type(value) is not bool:
            changes[f.name] = bool(value)
        elif str(f.type) == "Optional[float]" and value is not None and type(value) is not float:
            changes[f.name] = float(value)
    return replace(s, **changes) if changes else s


def validate(s: Settings) -> Settings:
    """Raise ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range, naming
    the field, its value and the valid options; returns the settings with plain Python scalars."""
    s = _normalise_types(s)
    _check(s.bits in SUPPORTED_BITS or s.bits >= 16, "bits", s.bits, f"use one of {SUPPORTED_BITS}")
    _check(s.group_size == -1 or s.group_size > 0, "group_size", s.group_size, "use -1 or a positive integer")
    _check(s.sym_style in SYM_STYLES, "sym_style", s.sym_style, f"use one of {SYM_STYLES}")
    _check(s.data_type == "int", "data_type", s.data_type, "only 'int' is implemented")
    _check(s.scale_dtype in SCALE_DTYPES, "scale_dtype", s.scale_dtype, f"use one of {sorted(SCALE_DTYPES)}")
    _check(s.iters >= 0, "iters", s.iters, "use 0 (round-to-nearest) or a positive count")
    _check(not (s.enable_alg_ext and not s.enable_minmax_tuning), "enable_alg_ext", s.enable_alg_ext,
           "the extended tuner starts the clip factors from a search, which needs enable_minmax_tuning=True "
           "(or leave enable_alg_ext at None: extended wherever the clip factors are tuned)")
    for name in ("nsamples", "seqlen", "batch_size", "gradient_accumulate_steps", "nblocks"):
        _check(getattr(s, name) >= 1, name, getattr(s, name), "must be at least 1")
    _check(s.threads is None or s.threads >= 1, "threads", s.threads, "use a positive count, or None for the "
           "cores available")
    _check(s.e2e_epochs >= 0, "e2e_epochs", s.e2e_epochs, "use 0 (off) or a positive number of epochs")
    _check(not (s.e2e_epochs and s.low_cpu_mem_usage), "e2e_epochs", s.e2e_epochs,
           "end-to-end scale tuning runs the whole model, which low_cpu_mem_usage=True never holds: drop one of them")
    for name in ("lr", "minmax_lr", "e2e_lr"):
        v = getattr(s, name)
        _check(v is None or v > 0, name, v, "must be positive (or None for its default)")
    if s.avg_bits is not None or s.scheme_options is not None:
        from auto_round.tuning.autoscheme import parse_options

        _check(s.avg_bits is not None and s.scheme_options is not None, "avg_bits", s.avg_bits,
               "mixed bits needs both avg_bits and scheme_options (e.g. avg_bits=2.5, scheme_options='W2G64,W4G128')")
        _check(s.avg_bits > 0, "avg_bits", s.avg_bits, "must be a positive number of bits")
        parse_options(s.scheme_options)  # raises naming the bad entry
    return s


def build_settings(recipe: str = "default", **kwargs: Any) -> Settings:
    """Validate public keywords into :class:`Settings`.

    A misspelt keyword raises ``TypeError`` with the closest valid name.
    """
    unknown = [k for k in kwargs if k not in OPTION_NAMES]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, OPTION_NAMES, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"unknown keyword argument(s): {', '.join(hints)}; valid: {', '.join(OPTION_NAMES)}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; use one of {sorted(RECIPES)}")
    merged = {**RECIPES[recipe], **kwargs}
    bs, ns = merged.get("batch_size", 8), merged.get("nsamples", 128)
    if isinstance(bs, int) and isinstance(ns, int) and 0 < ns < bs:
        logger.warning("batch_size=%d exceeds nsamples=%d: using batch_size=%d", bs, ns, ns)
        merged["batch_size"] = ns
    if isinstance(merged.get("scale_dtype"), torch.dtype):
        inv = {v: k for k, v in SCALE_DTYPES.items() if k in ("fp16", "bf16", "fp32")}
        merged["scale_dtype"] = inv[merged["scale_dtype"]]
    return validate(Settings(**merged))


def with_updates(s: Settings, **kwargs: Any) -> Settings:
    """A validated copy of ``s`` with some fields changed."""
    return validate(replace(s, **kwargs))
