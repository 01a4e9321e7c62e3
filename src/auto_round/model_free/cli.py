"""``auto-round --model_free``: the command-line branch of :func:`~auto_round.model_free.quantize_model_free`,
kept here so that :mod:`auto_round.cli` only adds the flag and calls :func:`run_model_free`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any, Dict

from auto_round.config import Settings

HELP = ("round-to-nearest (iters 0, no calibration data) straight from the safetensors shards, shard by shard, "
        "without loading the model: any size in about one layer's memory; same bytes as --iters 0 "
        "--disable_opt_rtn")
# Options of the in-memory path that have no meaning here: refused rather than ignored.
_NOT_WITH = {"dry_run": ("--dry-run", ""), "model_dtype": ("--model_dtype", " (tensors keep the checkpoint's dtype)"),
             "tasks": ("--tasks", " (evaluate the saved folder afterwards with --eval --tasks)"),
             "eval": ("--eval", " (evaluate the saved folder afterwards with --eval --tasks)")}


def run_model_free(ns: argparse.Namespace, parser: argparse.ArgumentParser, mllm: bool) -> int:
    """Quantize ``ns.model`` model-free into ``<output_dir>/<model>-w<bits>g<group>``; returns the exit code."""
    from auto_round.cli import output_folder
    from auto_round.model_free import quantize_model_free

    for dest, (flag, why) in _NOT_WITH.items():
        if getattr(ns, dest, None) not in (None, False):
            parser.error(f"{flag} does not combine with --model_free{why}")
    if ns.iters not in (0, parser.get_default("iters")):
        parser.error(f"--model_free is round-to-nearest without data: --iters {ns.iters} cannot apply (leave it out "
                     "or pass --iters 0)")
    names = [f.name for f in fields(Settings) if f.name not in ("iters", "disable_opt_rtn")]
    settings: Dict[str, Any] = {n: getattr(ns, n) for n in names}
    if mllm:
        from auto_round.mllm.autoround_mllm import MLLM_SETTINGS

        settings.update({f.name: getattr(ns, f.name) for f in MLLM_SETTINGS})
        if settings.get("seqlen") is None:
            settings.pop("seqlen")
    folder = output_folder(ns.output_dir, ns.model, ns.bits, ns.group_size)
    written = quantize_model_free(ns.model, folder, format=ns.format, overwrite=True if ns.overwrite else None,
                                  trust_remote_code=ns.trust_remote_code, mllm=True if mllm else None, **settings)
    sys.stdout.write(f"saved {written}\n")
    return 0
