"""Command line: a thin parser over the API. Options come from :data:`auto_round.config.Settings`.

Entry points: ``auto-round`` (LLMs), ``auto-round-best``, ``auto-round-light`` (recipes) and
``auto-round-mllm`` (vision-language models).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
LOADER_OPTIONS = ("model_dtype", "trust_remote_code")
# Reference options this implementation does not offer: refused with the reason, never ignored.
UNSUPPORTED = {
    "--adam": "only signed gradient descent (SignRound) is implemented",
    "--enable_norm_bias_tuning": "norm/bias tuning is not implemented",
    "--enable_torch_compile": "torch.compile of the tuning step is not implemented",
    "--eval": "evaluation is not built in; evaluate the saved folder with lm-eval / lmms-eval",
    "--eval_bs": "evaluation is not built in",
    "--device_map": "multi-device tuning is not implemented; use --device",
}


def _parse_layer_config(text: str) -> Dict[str, Any]:
    src = Path(text).read_text() if os.path.isfile(text) else text
    try:
        value = json.loads(src)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--layer_config must be JSON or a JSON file path ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--layer_config must be a JSON object {name: {bits: ...}}")
    return value


def _add_setting(p: argparse.ArgumentParser, f, default: Any) -> None:
    help_ = f.metadata.get("help", "")
    if f.name in NEGATED_FLAGS:
        p.add_argument(NEGATED_FLAGS[f.name], dest=f.name, action="store_false", default=default,
                       help=NEGATED_HELP[f.name])
        return
    flags = [f"--{f.name}", *f.metadata.get("cli", ())]
    if isinstance(default, bool) or str(f.type) == "Optional[bool]":
        p.add_argument(*flags, dest=f.name, action="store_const", const=True, default=default, help=help_)
    elif f.name == "layer_config":
        p.add_argument(*flags, dest=f.name, type=_parse_layer_config, default=None, help=help_ + " (JSON or file)")
    else:
        kind = {"bits": int, "group_size": int, "iters": int, "nsamples": int, "seqlen": int, "batch_size": int,
                "gradient_accumulate_steps": int, "nblocks": int, "seed": int, "lr": float,
                "minmax_lr": float}.get(f.name, str)
        p.add_argument(*flags, dest=f.name, type=kind, default=default, help=f"{help_} (default: {default})")


def build_parser(prog: str, recipe: str = "default", extra_settings: Sequence[Any] = ()) -> argparse.ArgumentParser:
    """The parser of one entry point; ``recipe`` changes the defaults it shows and uses."""
    p = argparse.ArgumentParser(prog=prog, description="Quantize a model with AutoRound (SignRound).")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", required=True,
                   help="local model folder or hub id")
    p.add_argument("--format", default="auto_round", help="export format(s), comma separated (default: auto_round)")
    p.add_argument("--output_dir", default="./tmp_autoround", help="parent folder of the exported model")
    p.add_argument("--model_dtype", default=None, help="dtype to load the model in: fp32, bf16, fp16, auto")
    p.add_argument("--trust_remote_code", action="store_true", help="allow modeling code shipped with the model")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read a model folder whose weights are pickled only (.bin), with weights_only=True")
    p.add_argument("--disable_trust_remote_code", action="store_true",
                   help="accepted for compatibility; remote code is already off unless --trust_remote_code")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder auto_round did not write (your other files are kept)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    for flag, why in UNSUPPORTED.items():
        takes_value = flag in ("--eval_bs", "--device_map")
        p.add_argument(flag, dest=f"unsupported_{flag[2:]}", default=None, help=argparse.SUPPRESS,
                       **({"nargs": "?", "const": True} if takes_value else {"action": "store_const", "const": True}))
    overrides = dict(RECIPES[recipe])
    if extra_settings:  # the MLLM entry point picks dataset and seqlen from the model's template
        overrides.update(dataset=None, seqlen=None)
    for f in [*fields(Settings), *extra_settings]:
        default = overrides.get(f.name, f.default if f.default is not MISSING else None)
        _add_setting(p, f, default)
    return p


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
    if isinstance(e, (ValueError, TypeError, OSError, RuntimeError)):
        return text
    return f"{name}: {text} (run with --debug for the traceback)"


def _settings_kwargs(ns: argparse.Namespace, names: Sequence[str]) -> Dict[str, Any]:
    return {n: getattr(ns, n) for n in names}


def run(argv: Optional[List[str]], prog: str, recipe: str, mllm: bool) -> int:
    """Parse ``argv``, quantize, export; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if mllm:
        from auto_round.mllm.autoround_mllm import MLLM_SETTINGS, AutoRoundMLLM as cls
        extra = MLLM_SETTINGS
    else:
        from auto_round.autoround import AutoRound as cls
        extra = ()
    parser = build_parser(prog, recipe, extra)
    ns = parser.parse_args(argv)
    for flag, why in UNSUPPORTED.items():
        if getattr(ns, f"unsupported_{flag[2:]}") is not None:
            parser.error(f"{flag} is not supported: {why}")
    names = [f.name for f in [*fields(Settings), *extra]]
    try:
        ar = cls(ns.model, model_dtype=ns.model_dtype, trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle,
                 **_settings_kwargs(ns, names))
        folder = output_folder(ns.output_dir, ns.model, ns.bits, ns.group_size)
        written = ar.quantize_and_save(folder, format=ns.format, overwrite=True if ns.overwrite else None)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; nothing was written to the output folder\n")
        return 130
    except Exception as e:  # a user error or an environment fault: one line, the traceback only with --debug
        if ns.debug:
            raise
        sys.stderr.write(f"{prog}: error: {describe_error(e)}\n")
        return 2
    for w in written:
        sys.stdout.write(f"saved {w}\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``auto-round``: quantize a text LLM."""
    return run(argv, "auto-round", "default", mllm=False)


def main_best(argv: Optional[List[str]] = None) -> int:
    """``auto-round-best``: iters 1000, nsamples 512, low_gpu_mem_usage."""
    return run(argv, "auto-round-best", "best", mllm=False)


def main_light(argv: Optional[List[str]] = None) -> int:
    """``auto-round-light``: iters 50, lr 5e-3."""
    return run(argv, "auto-round-light", "light", mllm=False)


def main_mllm(argv: Optional[List[str]] = None) -> int:
    """``auto-round-mllm``: quantize a vision-language model."""
    return run(argv, "auto-round-mllm", "default", mllm=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
