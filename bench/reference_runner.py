#!/usr/bin/env python3
"""Quantize an HF model folder with the *reference* auto-round (PyPI 0.16.1) and record the run.

Run it with the reference venv's python (``make ref-venv`` creates ``.venv-ref``), never with
ours: both packages are called ``auto_round``.

    .venv-ref/bin/python bench/reference_runner.py \\
        --model .cache/assets/SmolLM2-135M-Instruct --dataset calib.txt \\
        --bits 4 --group-size 128 --sym --iters 200 --nsamples 128 --seqlen 512 \\
        --batch-size 8 --seed 42 --output-dir out/ref-w4g128 --json out/ref-w4g128.json

Calibration data (``--dataset``, a local file; nothing is downloaded):

- ``--calib-mode windows`` (default): the whole file is tokenized (no special tokens) and cut
  into non-overlapping ``seqlen``-token windows; the first ``nsamples`` windows are handed to
  the reference as a list of ``[1, seqlen]`` tensors. Same data for both sides, no filtering.
- ``--calib-mode reference``: the reference's own local-file loader decides (it tokenizes each
  sample truncated to ``seqlen``, drops shorter ones, shuffles with the seed). ``.json`` and
  ``.jsonl`` files are passed as they are; a ``.txt`` file gives one sample per non-empty line.

The JSON written to ``--json`` holds the settings, versions, wall times (load, quantize+save),
peak RSS (``resource.getrusage``), per-block losses parsed from the reference's log lines
("quantized 7/7 layers in the block, loss iter 0: A -> iter N: B"), the saved files and the
saved ``quantization_config``. On failure it still writes the JSON, with an ``error`` field.
The model is saved in ``--format`` directly in ``--output-dir`` (the reference's own
``<model>-w4g128/`` subfolder is flattened away). The default, ``fake``, stores dequantized
weights and no ``quantization_config``: plain transformers loads it, so our side can compute
perplexity; ``auto_round`` stores packed weights.

For scale: ``--iters 2 --nsamples 4 --seqlen 128 --batch-size 4`` on SmolLM2-135M (loaded in
bf16, ``--device cpu``) took about 123 s to quantize and save on an idle 2-core CPU (330 s when
the machine was shared), about 1.5 GB peak RSS; the reference's per-block cost dominates.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

BLOCK_LOSS_RE = re.compile(
    r"quantized (\d+)/(\d+) layers in the block, loss iter 0: ([0-9.eE+-]+) -> iter (\d+): ([0-9.eE+-]+)"
)


class _LossCapture(logging.Handler):
    """Collect the reference's per-block summary lines (logger "autoround", propagate=False)."""

    def __init__(self) -> None:
        super().__init__(level=1)
        self.blocks: list[dict] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        match = BLOCK_LOSS_RE.search(msg)
        if match:
            q, total, init, best_iter, best = match.groups()
            self.blocks.append({
                "block": len(self.blocks), "quantized_layers": int(q), "layers": int(total),
                "loss_iter0": float(init), "best_iter": int(best_iter), "best_loss": float(best),
            })
        elif record.levelno >= logging.WARNING:
            self.warnings.append(msg[:500])


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _calib_windows(tokenizer, path: Path, seqlen: int, nsamples: int):
    import torch

    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if n < nsamples:
        raise SystemExit(f"error: {path} gives {len(ids)} tokens = {n} windows of {seqlen}, "
                         f"fewer than --nsamples {nsamples}; give more text or lower nsamples")
    return [torch.tensor(ids[i * seqlen:(i + 1) * seqlen]).unsqueeze(0) for i in range(nsamples)]


def _calib_reference(path: Path, workdir: Path) -> str:
    if path.suffix in (".json", ".jsonl"):
        return str(path)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = workdir / "calib.jsonl"
    out.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines), encoding="utf-8")
    return str(out)


def _flatten_output(out: Path) -> None:
    """The reference saves into ``<out>/<model>-w<bits>g<group>/``; move that folder's files up
    so that ``--output-dir`` itself is the loadable model folder."""
    if (out / "config.json").is_file():
        return
    subs = [p for p in out.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if len(subs) != 1:
        raise RuntimeError(f"expected one saved model folder under {out}, found {subs}")
    for item in subs[0].iterdir():
        item.rename(out / item.name)
    subs[0].rmdir()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="local HF model folder")
    p.add_argument("--dataset", required=True, type=Path, help="local calibration text file")
    p.add_argument("--output-dir", required=True, type=Path, help="where the quantized model goes")
    p.add_argument("--json", required=True, type=Path, help="where the run record goes")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--format", default="fake", help="reference export format (fake, auto_round, ...)")
    p.add_argument("--calib-mode", choices=("windows", "reference"), default="windows")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype the model is loaded in before quantization")
    p.add_argument("--device", default="cpu", help="device_map for the reference (cpu, cuda:0, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--enable-alg-ext", action="store_true", help="the reference's enable_alg_ext (SignRoundV2 path)")
    p.add_argument("--avg-bits", type=float, default=None,
                   help="the reference's AutoScheme: mixed bits at this average over --options (bits, "
                        "group size and sym then come from the options)")
    p.add_argument("--options", default="W2A16G64,W4A16",
                   help="AutoScheme options, the reference's preset names (W2A16G64 = 2-bit g64 sym, W4A16 = 4-bit "
                        "g128 sym)")
    p.add_argument("--disable-amp", action="store_true",
                   help="amp=False: tune in float32 (by default the reference casts the model to bf16 for tuning on a "
                        "CPU with bf16 support)")
    p.add_argument("--disable-opt-rtn", action="store_true",
                   help="with --iters 0: plain round-to-nearest instead of the reference's optimized RTN (its default)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, record: dict, capture: _LossCapture) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import auto_round
    from auto_round import AutoRound

    if args.threads:
        torch.set_num_threads(args.threads)
    record["versions"] = {"auto_round": auto_round.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version()}
    record["torch_threads"] = torch.get_num_threads()

    t0 = time.perf_counter()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    record["load_s"] = time.perf_counter() - t0
    record["model_dtype"] = str(next(model.parameters()).dtype)

    with tempfile.TemporaryDirectory() as work:
        if args.calib_mode == "windows":
            dataset = _calib_windows(tokenizer, args.dataset, args.seqlen, args.nsamples)
        else:
            dataset = _calib_reference(args.dataset, Path(work))
        t1 = time.perf_counter()
        if args.avg_bits is not None:
            from auto_round import AutoScheme

            # The reference hands AutoRound's dataset to AutoScheme, which takes only a data set name or
            # file: the run then reads the same text through the reference's own loader (its windows).
            dataset = _calib_reference(args.dataset, Path(work))
            record["calibration_note"] = "avg_bits: the reference's own loader on the same text"
            scheme_kw = {"scheme": AutoScheme(avg_bits=args.avg_bits, options=args.options.split(","),
                                              nsamples=args.nsamples, seqlen=args.seqlen,
                                              batch_size=args.batch_size)}
        else:
            scheme_kw = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym}
        ar = AutoRound(
            model, tokenizer, **scheme_kw,
            iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
            dataset=dataset, seed=args.seed, device_map=args.device, enable_torch_compile=False,
            **({"enable_alg_ext": True} if args.enable_alg_ext else {}),
            **({"disable_opt_rtn": True} if args.disable_opt_rtn else {}),
            **({"amp": False} if args.disable_amp else {}),
        )
        ar.quantize_and_save(str(args.output_dir), format=args.format)
        record["quantize_and_save_s"] = time.perf_counter() - t1

    _flatten_output(args.output_dir)
    cfg_path = args.output_dir / "config.json"
    if cfg_path.is_file():
        record["quantization_config"] = json.loads(cfg_path.read_text()).get("quantization_config")
    record["saved_files"] = sorted(str(p.relative_to(args.output_dir))
                                   for p in args.output_dir.rglob("*") if p.is_file())


def main(argv=None) -> int:
    args = parse_args(argv)
    record: dict = {
        "runner": "reference", "model": str(args.model), "dataset": str(args.dataset),
        "settings": {k: getattr(args, k) for k in ("bits", "group_size", "sym", "iters", "nsamples",
                                                   "seqlen", "batch_size", "seed", "format",
                                                   "calib_mode", "dtype", "device", "enable_alg_ext",
                                                   "disable_opt_rtn", "disable_amp", "avg_bits", "options")},
        "output_dir": str(args.output_dir),
    }
    capture = _LossCapture()
    logging.getLogger("autoround").addHandler(capture)
    t0 = time.perf_counter()
    rc = 0
    try:
        run(args, record, capture)
    except BaseException as exc:  # record any failure, then re-raise below
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        rc = 1
    record["total_s"] = time.perf_counter() - t0
    record["peak_rss_mb"] = _peak_rss_mb()
    record["block_losses"] = capture.blocks
    record["reference_warnings"] = capture.warnings
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.json}: total {record['total_s']:.1f}s, peak RSS {record['peak_rss_mb']:.0f} MB, "
          f"{len(capture.blocks)} block losses" + (f", ERROR {record['error']}" if rc else ""))
    if rc:
        print(record["traceback"], file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
