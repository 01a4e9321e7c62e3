"""Command line: a thin parser over the API. Options come from :data:`auto_round.config.Settings`.

Entry points: ``auto-round`` (LLMs), ``auto-round-best``, ``auto-round-light`` (recipes) and
``auto-round-mllm`` (vision-language models). Every one takes:

- ``--recipe default|best|light|rtn|opt-rtn`` (:data:`auto_round.config.RECIPES`; explicit options win);
- ``--dry-run``: load the model, resolve and print the plan, check the formats and the output folder,
  estimate memory and time, and stop: no calibration data is read, nothing is tuned or written;
- ``--tasks T1,T2`` (evaluate the saved checkpoint after quantizing; ``--eval_fp`` adds the
  full-precision model, side by side) and ``--eval --model DIR --tasks ...`` (evaluate ``DIR`` only);
  ``ppl:FILE`` is the built-in perplexity task (:mod:`auto_round.evaluation`);
- ``auto-round list formats|families|datasets|recipes|backends`` (:mod:`auto_round.catalog`).

Every run writes ``quantization_report.json`` into the checkpoint (:mod:`auto_round.report`) and
ends with a compact summary table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

from auto_round.config import RECIPES, Settings

# Boolean settings whose CLI flag turns them off (reference spelling), with what the flag does.
NEGATED_FLAGS = {"sym": "--asym", "enable_minmax_tuning": "--disable_minmax_tuning",
                 "enable_quanted_input": "--disable_quanted_input", "amp": "--disable_amp"}
NEGATED_HELP = {
    "sym": "asymmetric quantization: a zero point per group (default: symmetric)",
    "enable_minmax_tuning": "do not tune the per-group clip factors (default: tuned)",
    "enable_quanted_input": "feed each block the full-precision chain's output instead of the quantized "
                            "blocks' (default: quantized)",
    "amp": "tune in float32 instead of under bf16 autocast (default: autocast where the hardware has bf16)",
}
# Tri-state settings (None = the library decides): besides the flag that turns them on, one that turns them off.
OFF_FLAGS = {"enable_alg_ext": ("--disable_alg_ext", "the plain SignRound tuner (the reference's default) instead of "
                                                     "the extended one")}
# More reference spellings of settings (beyond the aliases declared in Settings).
EXTRA_ALIASES = {"nsamples": ("--nsample",), "data_type": ("--dtype",)}
LOADER_OPTIONS = ("model_dtype", "trust_remote_code")
# Reference options this implementation does not offer: refused with the reason, never ignored.
UNSUPPORTED = {
    "--adam": "only signed gradient descent (SignRound) is implemented",
    "--enable_norm_bias_tuning": "norm/bias tuning is not implemented",
    "--device_map": "multi-device tuning is not implemented; use --device",
}
TAKES_VALUE = ("--device_map",)

# Help sections, in the order -h shows them, and the section of every setting.
GROUPS = {
    "model": "model: what is loaded",
    "scheme": "scheme: how weights are quantized, and which layers",
    "tuning": "tuning: SignRound and its recipes",
    "data": "data: calibration samples",
    "multimodal": "multimodal: vision-language models (auto-round-mllm)",
    "export": "export: formats and output folder",
    "device": "device and memory",
    "evaluation": "evaluation: after quantizing, or of an existing folder with --eval",
    "run": "run: dry run and errors",
}
SETTING_GROUP = {
    "bits": "scheme", "group_size": "scheme", "sym": "scheme", "sym_style": "scheme", "data_type": "scheme",
    "scale_dtype": "scheme", "layer_config": "scheme", "fp_layers": "scheme", "quant_lm_head": "scheme",
    "to_quant_block_names": "scheme", "avg_bits": "scheme", "scheme_options": "scheme",
    "iters": "tuning", "disable_opt_rtn": "tuning", "lr": "tuning", "minmax_lr": "tuning",
    "enable_minmax_tuning": "tuning", "enable_quanted_input": "tuning", "nblocks": "tuning",
    "not_use_best_mse": "tuning", "seed": "tuning", "amp": "tuning", "gradient_accumulate_steps": "tuning",
    "resume_dir": "tuning", "enable_alg_ext": "tuning", "enable_torch_compile": "tuning",
    "e2e_epochs": "tuning", "e2e_lr": "tuning",
    "nsamples": "data", "seqlen": "data", "batch_size": "data", "dataset": "data",
    "device": "device", "threads": "device", "low_gpu_mem_usage": "device", "offload_dir": "device",
    "low_cpu_mem_usage": "device",
    "quant_nontext_module": "multimodal", "extra_data_dir": "multimodal", "template": "multimodal",
    "truncation": "multimodal",
}
INT_SETTINGS = ("bits", "group_size", "iters", "nsamples", "seqlen", "batch_size", "gradient_accumulate_steps",
                "nblocks", "seed", "threads", "e2e_epochs")
FLOAT_SETTINGS = ("lr", "minmax_lr", "avg_bits", "e2e_lr")


def _parse_layer_config(text: str) -> Dict[str, Any]:
    src = Path(text).read_text() if os.path.isfile(text) else text
    try:
        value = json.loads(src)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--layer_config must be JSON or a JSON file path ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--layer_config must be a JSON object {name: {bits: ...}}")
    return value


def _add_setting(p: argparse._ActionsContainer, f, default: Any) -> None:
    help_ = f.metadata.get("help", "")
    if f.name in NEGATED_FLAGS:
        p.add_argument(NEGATED_FLAGS[f.name], dest=f.name, action="store_false", default=default,
                       help=NEGATED_HELP[f.name])
        return
    flags = [f"--{f.name}", *f.metadata.get("cli", ()), *EXTRA_ALIASES.get(f.name, ())]
    if isinstance(default, bool) or str(f.type) in ("bool", "Optional[bool]"):
        on = " (default: on, from the recipe)" if default is True else ""
        p.add_argument(*flags, dest=f.name, action="store_const", const=True, default=default, help=help_ + on)
        if f.name in OFF_FLAGS:
            flag, off_help = OFF_FLAGS[f.name]
            p.add_argument(flag, dest=f.name, action="store_const", const=False, default=default, help=off_help)
    elif f.name == "layer_config":
        p.add_argument(*flags, dest=f.name, type=_parse_layer_config, default=None, help=help_ + " (JSON or file)")
    else:
        kind = int if f.name in INT_SETTINGS else float if f.name in FLOAT_SETTINGS else str
        p.add_argument(*flags, dest=f.name, type=kind, default=default, help=help_ + _default_note(f.name, help_, default, f.default))


# The MLLM entry point leaves these to the model's template and data (None in its parser).
TEMPLATE_DEFAULTS = {"dataset": " (default: the template's, normally NeelNanda/pile-10k; image-text data for families "
                                "that cannot calibrate on text)",
                     "seqlen": " (default: 2048 for text data, 512 for image-text)"}


def _default_note(name: str, help_: str, default: Any, field_default: Any = None) -> str:
    """`` (default: X)`` unless the help already says it; nothing for an empty or None default. A default set
    by the recipe (not the field's own) is always shown."""
    if default is not None and default != field_default and field_default is not MISSING:
        return f" (default: {default}, from the recipe)"
    if default is None:
        return TEMPLATE_DEFAULTS.get(name, "")
    if "default" in help_ or default == "":
        return ""
    return f" (default: {default})"


def _add_fixed_options(p: argparse.ArgumentParser, g: Dict[str, Any], recipe: str) -> None:
    """The options that are not settings of the run: model loading, export, evaluation, run control."""
    g["model"].add_argument("--model", "--model_name", "--model_name_or_path", dest="model", required=True,
                            help="local model folder or hub id (with --eval: the folder to evaluate)")
    g["model"].add_argument("--model_dtype", default=None, help="dtype to load the model in: fp32, bf16, fp16, auto "
                                                                "(default: the checkpoint's)")
    g["model"].add_argument("--trust_remote_code", action="store_true", help="allow modeling code shipped with the model")
    g["model"].add_argument("--disable_trust_remote_code", action="store_true",
                            help="accepted for compatibility; remote code is already off unless --trust_remote_code")
    g["model"].add_argument("--allow_pickle", action="store_true",
                            help="read a model folder whose weights are pickled only (.bin), with weights_only=True")
    g["tuning"].add_argument("--recipe", choices=list(RECIPES), default=recipe,
                             help=f"preset settings (auto-round list recipes); explicit options win (default: {recipe})")
    g["export"].add_argument("--format", "--formats", dest="format", default="auto_round",
                             help="export format(s), comma separated; one sub-folder per format when several "
                                  "(auto-round list formats) (default: auto_round)")
    g["export"].add_argument("--output_dir", default="./tmp_autoround",
                             help="parent folder of the exported model <output_dir>/<model>-w<bits>g<group> "
                                  "(default: ./tmp_autoround)")
    g["export"].add_argument("--overwrite", action="store_true",
                             help="write into a non-empty folder auto_round did not write (your other files are kept)")
    e = g["evaluation"]
    e.add_argument("--tasks", "--task", dest="tasks", default=None,
                   help="comma list of evaluation tasks run on the saved checkpoint: ppl:FILE (built-in perplexity "
                        "on a local text file), lm_eval:TASK (text, pip install 'auto-round[eval]'), lmms:TASK "
                        "(vision-language, pip install 'auto-round[vlm-eval]'); a task name or task YAML without a "
                        "prefix goes to lmms-eval under auto-round-mllm, else to lm-eval")
    e.add_argument("--eval", action="store_true",
                   help="evaluate --model as it is (a quantized folder, or a full-precision model for a baseline) "
                        "on --tasks, without quantizing")
    e.add_argument("--eval_fp", action="store_true",
                   help="with --tasks after quantizing: also evaluate the full-precision model first, side by side")
    e.add_argument("--eval_bs", type=int, default=1, help="evaluation batch size (default: 1)")
    e.add_argument("--eval_seqlen", type=int, default=2048,
                   help="tokens per perplexity window, capped at the model's max_position_embeddings (default: 2048)")
    e.add_argument("--eval_limit", type=int, default=None,
                   help="evaluate only the first N documents of each harness task (a quick check; default: all)")
    e.add_argument("--eval_backend", default="auto",
                   help="inference backend of the quantized layers during evaluation (auto-round list backends) "
                        "(default: auto)")
    g["run"].add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                          help="print the plan, format checks and a memory/time estimate, then stop: no calibration "
                               "data is read, nothing is tuned or written")
    g["run"].add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def build_parser(prog: str, recipe: str = "default", extra_settings: Sequence[Any] = ()) -> argparse.ArgumentParser:
    """The parser of one entry point, its options in help sections; ``recipe`` sets the defaults it shows
    and uses. ``<prog> list ...`` is handled before this parser (:func:`run`)."""
    p = argparse.ArgumentParser(
        prog=prog, description="Quantize a model with AutoRound (SignRound), export it, and optionally evaluate it.",
        epilog=f"See also: {prog} list formats|families|datasets|recipes|backends")
    g = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    _add_fixed_options(p, g, recipe)
    from auto_round.model_free.cli import HELP as MODEL_FREE_HELP

    g["run"].add_argument("--model_free", action="store_true", help=MODEL_FREE_HELP)
    for flag in UNSUPPORTED:
        p.add_argument(flag, dest=f"unsupported_{flag[2:]}", default=None, help=argparse.SUPPRESS,
                       **({"nargs": "?", "const": True} if flag in TAKES_VALUE else {"action": "store_const", "const": True}))
    overrides = dict(RECIPES[recipe])
    if extra_settings:  # the MLLM entry point picks dataset and seqlen from the model's template
        overrides.update(dataset=None, seqlen=None)
    for f in [*fields(Settings), *extra_settings]:
        default = overrides.get(f.name, f.default if f.default is not MISSING else None)
        _add_setting(g.get(SETTING_GROUP.get(f.name, "tuning"), p), f, default)
    return p


def requested_recipe(argv: Sequence[str], default: str) -> str:
    """The ``--recipe`` value in ``argv`` (checked against :data:`RECIPES`), else ``default``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=default)
    value = pre.parse_known_args(list(argv))[0].recipe
    if value not in RECIPES:
        raise SystemExit(f"error: --recipe {value!r} is unknown; use one of {', '.join(RECIPES)}")
    return value


def output_folder(output_dir: str, model: str, bits: int, group_size: int) -> Path:
    """``<output_dir>/<model basename>-w<bits>g<group_size>`` (reference naming)."""
    base = Path(model.rstrip("/")).name or "model"
    return Path(output_dir) / f"{base}-w{bits}g{group_size}"


def describe_error(e: BaseException) -> str:
    """One line for an error, with the fix for the environment faults users meet (memory, disk, files)."""
    text = str(e).strip() or type(e).__name__
    name = type(e).__name__
    if isinstance(e, MemoryError) or "OutOfMemory" in name or "out of memory" in text.lower():
        return (f"out of memory ({text.splitlines()[0]}); retry with low_gpu_mem_usage (--low_gpu_mem_usage), a "
                "smaller --batch_size or --seqlen, or fewer --nsamples")
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return f"no space left on the device ({text}); free some space or choose another --output_dir"
    if "SafetensorError" in name or "safetensors" in type(e).__module__:
        return (f"a .safetensors file could not be read ({text}); it is truncated or corrupt: download or "
                "re-export it")
    if isinstance(e, (ValueError, TypeError, OSError, RuntimeError, ImportError)):
        return text
    return f"{name}: {text} (run with --debug for the traceback)"


def _write(lines: Sequence[str], out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout  # looked up at call time (tests capture it)
    for line in lines:
        out.write(line + "\n")


# ---------------------------------------------------------------------------------------- list
def run_list(argv: Sequence[str], prog: str) -> int:
    """``<prog> list WHAT``: print one of :data:`auto_round.catalog.CATALOGS` as a table."""
    from auto_round.catalog import CATALOGS, render_table

    p = argparse.ArgumentParser(prog=f"{prog} list", description="Print what this installation supports.")
    p.add_argument("what", choices=list(CATALOGS), help="the registry to print")
    ns = p.parse_args(list(argv))
    _write(render_table(*CATALOGS[ns.what]()))
    return 0


# ---------------------------------------------------------------------------------------- dry run
def dry_run_lines(ar: Any, formats: Sequence[str], target: Path, recipe: str, overwrite: Optional[bool],
                  flops_per_second: Optional[float], tasks: Optional[str] = None, eval_fp: bool = False,
                  vlm: bool = False) -> List[str]:
    """What ``--dry-run`` prints: model and family, settings, data, plan, per-layer schemes, one check per
    format and of the output folder, and the estimate. Reads no data, tunes and writes nothing. The
    plan shown is the one checked against every format when they all pass."""
    from auto_round.estimate import estimate_run
    from auto_round.export.folder import check_output_dir
    from auto_round.report import layer_rows

    s = ar.settings
    cfg = getattr(ar.model, "config", None)
    family = getattr(ar, "family", None)  # AutoRoundMLLM's record; None for text LLMs and unknown VLMs
    fam = family.name if family is not None else ("text LLM" if not hasattr(ar, "family") else "no record: "
                                                  "block lists found structurally")
    uses_data = s.iters > 0 or not s.disable_opt_rtn
    lines = [f"model     {ar.source or type(ar.model).__name__} ({type(ar.model).__name__}, model_type "
             f"{getattr(cfg, 'model_type', None)}, family {fam})",
             f"recipe    {recipe}: " + (", ".join(f"{k}={v}" for k, v in RECIPES[recipe].items()) or "defaults"),
             f"settings  W{s.bits} g{s.group_size} {s.scheme}, iters {s.iters}, lr {s.resolved_lr:g}, scale_dtype "
             f"{s.scale_dtype}, device {ar.device}",
             "data      " + (f"{s.dataset}: {s.nsamples} samples x {s.seqlen} tokens, batch {s.batch_size} (not read: "
                             "dry run)" if uses_data else "none (plain round-to-nearest)")]
    checks = []
    for fmt in formats:
        try:
            ar.resolve_plan([fmt])
            checks.append(f"{fmt}: ok")
        except ValueError as e:
            checks.append(f"{fmt}: FAILS: {e}")
    failed = any(": FAILS: " in c for c in checks)
    plan = ar.resolve_plan([] if failed else formats)
    lines += [f"plan      {line}" for line in plan.summary_lines()]
    rows = layer_rows(plan)
    width = max(len(r[0]) for r in rows)
    lines += ["layers"] + [f"  {name:<{width}}  {shape:>11}  {scheme}" for name, shape, scheme in rows]
    lines += [f"format    {c}" for c in checks]
    try:
        check_output_dir(target, ar.source, overwrite, estimated_bytes=ar.estimated_checkpoint_bytes())
        lines.append(f"output    {target}: ok")
    except (OSError, ValueError) as e:
        lines.append(f"output    {target}: FAILS: {e}")
    est = estimate_run(ar.model, plan, s, ar.estimated_checkpoint_bytes(), flops_per_second, ar.device)
    lines += est.lines()
    if tasks:
        from auto_round.evaluation import check_tasks, parse_tasks

        try:
            check_tasks(parse_tasks(tasks, vlm=vlm))
            ok = "ok"
        except (ImportError, ValueError) as e:
            ok = f"FAILS: {e}"
        lines.append(f"eval      {tasks} on the saved checkpoint" + (" and on the FP model first" if eval_fp else "")
                     + f": {ok}")
    lines.append("dry run: no data was read, nothing was tuned or written")
    return lines


# ---------------------------------------------------------------------------------------- evaluation
def _tasks(ns: argparse.Namespace) -> List[Any]:
    """``--tasks`` parsed; unprefixed tasks go to lmms-eval under ``auto-round-mllm``, else to lm-eval."""
    from auto_round.evaluation import parse_tasks

    return parse_tasks(ns.tasks, vlm=ns.vlm)


def _evaluate(path: Path, ns: argparse.Namespace, label: str, model: Any = None, tokenizer: Any = None,
              processor: Any = None) -> Dict[str, Any]:
    from auto_round.device import resolve_device
    from auto_round.evaluation import evaluate, load_for_eval, load_processor, needs_processor

    tasks = _tasks(ns)
    device = resolve_device(ns.device)
    if model is None:
        model, tokenizer = load_for_eval(str(path), device=device, backend=ns.eval_backend,
                                         trust_remote_code=ns.trust_remote_code)
    if processor is None and needs_processor(tasks):
        processor = load_processor(str(path), trust_remote_code=ns.trust_remote_code)
    logging.getLogger(__name__).info("evaluating %s (%s) on %s", path, label, ns.tasks)
    return evaluate(model, tokenizer, tasks, batch_size=ns.eval_bs, seqlen=ns.eval_seqlen, device=device,
                    processor=processor, limit=ns.eval_limit)


def _save_eval(runs: Dict[str, Dict[str, Any]], model_dir: Path, ns: argparse.Namespace) -> Path:
    from auto_round.evaluation import save_results

    return save_results(runs, model_dir, fallback_dir=Path(ns.output_dir), tasks=ns.tasks)


def _eval_only(ns: argparse.Namespace) -> int:
    from auto_round.evaluation import is_quantized_folder, results_table

    path = Path(ns.model)
    label = "quantized" if is_quantized_folder(path) else "fp"
    runs = {label: _evaluate(path, ns, label)}
    saved = _save_eval(runs, path, ns)
    _write(results_table(runs))
    sys.stdout.write(f"saved {saved}\n")
    return 0


# ---------------------------------------------------------------------------------------- quantize
def _api(mllm: bool):
    if mllm:
        from auto_round.mllm.autoround_mllm import MLLM_SETTINGS, AutoRoundMLLM

        return AutoRoundMLLM, MLLM_SETTINGS
    from auto_round.autoround import AutoRound

    return AutoRound, ()


def _quantize(ns: argparse.Namespace, cls: Any, extra: Sequence[Any]) -> int:
    from auto_round.export.folder import parse_formats

    if ns.tasks and not ns.dry_run:  # a task that cannot run fails now, not after the tuning
        from auto_round.evaluation import check_tasks

        check_tasks(_tasks(ns))
    names = [f.name for f in [*fields(Settings), *extra]]
    ar = cls(ns.model, model_dtype=ns.model_dtype, trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle,
             **{n: getattr(ns, n) for n in names})
    folder = output_folder(ns.output_dir, ns.model, ns.bits, ns.group_size)
    overwrite = True if ns.overwrite else None
    if ns.dry_run:
        from auto_round.estimate import measure_flops_per_second, tuning_dtype

        flops = measure_flops_per_second(ar.device, dtype=tuning_dtype(ar.device, ar.settings, ar.model))
        lines = dry_run_lines(ar, parse_formats(ns.format), folder, ns.recipe, overwrite, flops, ns.tasks, ns.eval_fp,
                              ns.vlm)
        _write(lines)
        return 2 if any(" FAILS: " in line for line in lines) else 0
    runs: Dict[str, Dict[str, Any]] = {}
    writer = ar.parallel.is_writer  # under torchrun, rank 0 writes, reports and evaluates
    if ns.tasks and ns.eval_fp and writer:
        runs["fp"] = _evaluate(Path(ns.model), ns, "fp", ar.model, ar.tokenizer, getattr(ar, "processor", None))
    written = ar.quantize_and_save(folder, format=ns.format, overwrite=overwrite)
    if not writer:
        return 0
    for w in written:
        sys.stdout.write(f"saved {w}\n")
    from auto_round.report import summary_lines

    _write(summary_lines(ar.run_report(parse_formats(ns.format)[-1])))
    if ns.tasks:
        from auto_round.evaluation import results_table

        runs["quantized"] = _evaluate(written[0], ns, "quantized")
        saved = _save_eval(runs, written[0], ns)
        _write(results_table(runs))
        sys.stdout.write(f"saved {saved}\n")
    return 0


def run(argv: Optional[List[str]], prog: str, recipe: str, mllm: bool) -> int:
    """Parse ``argv``, then list, dry-run, evaluate, or quantize and export; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:
        return run_list(argv[1:], prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cls, extra = _api(mllm)
    parser = build_parser(prog, requested_recipe(argv, recipe), extra)
    ns = parser.parse_args(argv)
    ns.vlm = mllm
    for flag, why in UNSUPPORTED.items():
        if getattr(ns, f"unsupported_{flag[2:]}") is not None:
            parser.error(f"{flag} is not supported: {why}")
    if ns.eval and not ns.tasks:
        parser.error("--eval needs --tasks, e.g. --tasks ppl:path/to/file.txt (or lm-eval task names)")
    if ns.eval and ns.dry_run:
        parser.error("--dry-run plans a quantization; it does not combine with --eval")
    try:
        if ns.model_free:
            from auto_round.model_free.cli import run_model_free

            return run_model_free(ns, parser, mllm)
        return _eval_only(ns) if ns.eval else _quantize(ns, cls, extra)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; nothing was written to the output folder\n")
        return 130
    except Exception as e:  # a user error or an environment fault: one line, the traceback only with --debug
        if ns.debug:
            raise
        sys.stderr.write(f"{prog}: error: {describe_error(e)}\n")
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    """``auto-round``: quantize a text LLM."""
    return run(argv, "auto-round", "default", mllm=False)


def main_best(argv: Optional[List[str]] = None) -> int:
    """``auto-round-best``: ``--recipe best`` (iters 1000, nsamples 512, low_gpu_mem_usage)."""
    return run(argv, "auto-round-best", "best", mllm=False)


def main_light(argv: Optional[List[str]] = None) -> int:
    """``auto-round-light``: ``--recipe light`` (iters 50, lr 5e-3)."""
    return run(argv, "auto-round-light", "light", mllm=False)


def main_mllm(argv: Optional[List[str]] = None) -> int:
    """``auto-round-mllm``: quantize a vision-language model."""
    return run(argv, "auto-round-mllm", "default", mllm=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
