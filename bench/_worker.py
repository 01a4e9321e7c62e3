"""One measured job of the bench scripts, in its own process (so peak RSS belongs to this run).

    python bench/_worker.py SPEC.json OUT.json

``SPEC.json`` keys:

- ``job``: ``"quantize"`` or ``"ppl"``.
- ``kind``: ``"llm"`` (``model`` is an HF folder, loaded by ``AutoRound``) or ``"llava"``
  (``model`` is the SmolLM2 folder; the VLM is built with ``build_llava_with_lm`` and quantized
  with ``AutoRoundMLLM``).
- ``model_dtype``: dtype the folder is loaded in (``"fp32"`` by default).
- ``options`` (quantize): keywords for ``AutoRound``/``AutoRoundMLLM`` (bits, iters, dataset, ...).
- ``calib_windows`` (quantize, optional): a ``torch.save``d LongTensor ``[n, seqlen]``; the run
  then calibrates on exactly these token windows (in order, ``batch_size`` per batch, attention
  mask all ones) instead of building samples from ``options['dataset']``: the same ids that the
  reference runner hands to the reference.
- ``save_dir`` (quantize, optional): also export (``format='auto_round'``) and time it;
  ``save_inplace`` (default False) packs the in-memory model instead of a copy (as the reference
  runner's ``quantize_and_save`` does); it must stay False when ``ppl_windows`` is given.
- ``ext_tuner`` (quantize, optional): fields of :class:`auto_round.tuning.block.ExtendedTuner` that replace
  the extended tuner's (``enable_alg_ext``) for this run, e.g. ``{"clip_max": 1.5}``: the bench's way to
  measure one piece of it at a time (bench_frontier.py ``--ext``).
- ``ppl_windows`` (optional): a ``torch.save``d LongTensor of evaluation windows; perplexity of the
  (fake-quantized, cast to fp32) model after quantization, or of the loaded model for ``ppl``;
  with ``ppl_bf16_weights`` also after rounding every weight to bf16 (evaluated in fp32).

``OUT.json`` gets the timings (load, quantize, save), peak RSS (``VmHWM``) of loading, of
``quantize()`` alone and of the whole measured part (load + quantize + save, before
perplexity), ``summary`` (our per-block losses), ``ppl`` and, on failure, ``error`` with the
traceback.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the demo package (demo/) beside src/


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MiB: ``VmHWM`` from /proc (``ru_maxrss`` would include the
    launching process's peak, which Linux carries over exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _fixed_windows_class(base, windows):
    """A subclass of ``base`` whose calibration data are exactly ``windows`` (no sampling)."""
    import torch

    class FixedWindows(base):
        def calibration_batches(self):
            self.dataset_used = f"fixed token windows {tuple(windows.shape)}"
            dev = next(self.model.parameters()).device
            bs = self.settings.batch_size
            return [{"input_ids": windows[i:i + bs].to(dev),
                     "attention_mask": torch.ones_like(windows[i:i + bs]).to(dev)}
                    for i in range(0, windows.shape[0], bs)]

    return FixedWindows


def _amp_dtype(ar) -> str:
    """The autocast dtype our tuning forward will use ("none" = plain fp32), when the library says."""
    try:
        from auto_round.tuning.block import amp_dtype
    except ImportError:
        return "none (library without amp_dtype)"
    try:
        return str(amp_dtype(ar.device, ar.settings, next(ar.model.parameters()).dtype) or "none")
    except Exception as exc:  # a changed signature must not break the measurement
        return f"unknown ({type(exc).__name__})"


def _ppl(model, windows_path: str) -> float:
    import torch

    from demo.assets import perplexity_of_windows

    windows = torch.load(windows_path)
    return perplexity_of_windows(model.float(), windows)


def job_quantize(spec: Dict[str, Any], rec: Dict[str, Any]) -> None:
    import torch

    from auto_round import AutoRound, AutoRoundMLLM

    rec["torch_threads"] = torch.get_num_threads()
    opts = dict(spec.get("options", {}))
    if spec.get("ext_tuner"):
        import dataclasses

        from auto_round.tuning import block

        block.EXTENDED_TUNER = dataclasses.replace(block.EXTENDED_TUNER, **spec["ext_tuner"])
        rec["ext_tuner"] = dataclasses.asdict(block.EXTENDED_TUNER)
    windows = torch.load(spec["calib_windows"]) if spec.get("calib_windows") else None
    t0 = time.perf_counter()
    if spec.get("kind", "llm") == "llava":
        from demo.model import build_llava_with_lm

        model, tok, proc = build_llava_with_lm(spec["model"])
        cls = _fixed_windows_class(AutoRoundMLLM, windows) if windows is not None else AutoRoundMLLM
        ar = cls(model, tok, proc, **opts)
    else:
        cls = _fixed_windows_class(AutoRound, windows) if windows is not None else AutoRound
        ar = cls(spec["model"], None, model_dtype=spec.get("model_dtype", "fp32"), **opts)
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    rec["model_dtype"] = str(next(ar.model.parameters()).dtype)
    rec["amp_dtype"] = _amp_dtype(ar)
    load_peak = peak_rss_mb()
    rec["peak_rss_load_mb"] = round(load_peak, 1)
    rec["peak_rss_reset"] = reset_peak_rss()

    t1 = time.perf_counter()
    ar.quantize()
    rec["quantize_s"] = round(time.perf_counter() - t1, 2)
    # Peak during quantize() alone (only meaningful when the reset worked), and since the start.
    rec["peak_rss_quantize_mb"] = round(peak_rss_mb(), 1) if rec["peak_rss_reset"] else None
    rec["peak_rss_after_quantize_mb"] = round(max(load_peak, peak_rss_mb()), 1)
    summary = dict(ar.summary)
    summary.pop("plan", None)
    rec["summary"] = summary
    if getattr(ar, "data_kind", None):
        rec["data_kind"] = ar.data_kind

    if spec.get("save_dir"):
        t2 = time.perf_counter()
        inplace = bool(spec.get("save_inplace", False))
        ar.save_quantized(spec["save_dir"], format="auto_round", inplace=inplace, overwrite=True)
        rec["save_inplace"] = inplace
        rec["save_s"] = round(time.perf_counter() - t2, 2)
    rec["peak_rss_mb"] = round(max(load_peak, peak_rss_mb()), 1)
    rec["measured_s"] = round(time.perf_counter() - t0, 2)

    if spec.get("ppl_windows") and not spec.get("save_inplace"):
        t3 = time.perf_counter()
        rec["ppl"] = _ppl(ar.model, spec["ppl_windows"])
        rec["ppl_s"] = round(time.perf_counter() - t3, 2)
        if spec.get("ppl_bf16_weights"):
            # The same model with every weight rounded to bf16 (what a bf16 fake-quant folder holds).
            rec["ppl_bf16_weights"] = _ppl(ar.model.to(torch.bfloat16), spec["ppl_windows"])


def job_ppl(spec: Dict[str, Any], rec: Dict[str, Any]) -> None:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("model_dtype", "fp32")]
    t0 = time.perf_counter()
    if spec.get("kind", "llm") == "llava":
        from demo.model import build_llava_with_lm

        model = build_llava_with_lm(spec["model"])[0]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    model.eval()
    rec["load_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    rec["ppl"] = _ppl(model, spec["ppl_windows"])
    rec["ppl_s"] = round(time.perf_counter() - t1, 2)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    rec: Dict[str, Any] = {"spec": spec}
    rc = 0
    try:
        {"quantize": job_quantize, "ppl": job_ppl}[spec["job"]](spec, rec)
    except BaseException as exc:  # record the failure; the parent prints the traceback
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()
        traceback.print_exc()
        rc = 1
    rec.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    out_path.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
