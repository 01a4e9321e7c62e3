"""The run report: ``quantization_report.json`` (and an optional loss plot) beside every checkpoint.

Written into each exported folder by :meth:`auto_round.AutoRound.save_quantized`, inside the
atomic write, so the folder's manifest lists it. It holds the resolved plan (block lists, every
linear layer's scheme, what stayed in full precision and why), per-block losses (first = the
round-to-nearest start, best, last, best iteration), the end-to-end scale tuning (``e2e``: KL before and
after, kept or not; null when off), time per phase, peak memory, the calibration
data really used, the settings and package versions. :func:`summary_lines` is the compact table the
CLI prints at the end of a run; :func:`plot_losses` draws the per-block loss (RTN vs tuned) when
matplotlib is installed and says so, once, when it is not.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from auto_round.tuning.plan import LayerPlan, QuantPlan

logger = logging.getLogger(__name__)

REPORT_FILE = "quantization_report.json"
PLOT_FILE = "quantization_report.png"
REPORT_VERSION = 1
# Packages whose versions decide a run's numbers (recorded when installed).
VERSIONED_PACKAGES = ("auto-round", "torch", "transformers", "accelerate", "safetensors", "numpy", "datasets",
                      "gguf", "compressed-tensors", "lm-eval", "matplotlib")


# ---------------------------------------------------------------------------------------- plan
def scheme_text(lp: LayerPlan) -> str:
    """``"W4 g128 sym"`` for a quantized layer, ``"FP (reason)"`` for one kept in full precision."""
    if lp.params is None:
        return f"FP ({lp.reason})"
    return f"W{lp.params.bits} g{lp.params.group_size} {lp.params.scheme}"


def index_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts, start = [], None
    ordered = sorted(indices)
    for i, v in enumerate(ordered):
        if start is None:
            start = v
        if i + 1 == len(ordered) or ordered[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def layer_rows(plan: QuantPlan) -> List[Tuple[str, str, str]]:
    """``(name, shape, scheme)`` per linear layer; a layer repeated with the same shape and scheme across
    the blocks of one block list is one row, ``model.layers.[0-29].mlp.up_proj``."""
    where: Dict[str, Tuple[str, int]] = {}
    for path, units in plan.block_lists:
        for i, unit in enumerate(units):
            if unit != path:
                where[unit] = (path, i)
    groups: Dict[Tuple[str, str, str], List[int]] = {}
    for lp in plan.layers:
        shape = f"{lp.out_features}x{lp.in_features}"
        scheme = scheme_text(lp) + (f"; {lp.note}" if lp.note else "")
        if lp.block in where and lp.name.startswith(lp.block + "."):
            path, i = where[lp.block]
            groups.setdefault((path + ".[{}]" + lp.name[len(lp.block):], shape, scheme), []).append(i)
        else:
            groups.setdefault((lp.name, shape, scheme), [])
    return [(name.format(index_ranges(ix)) if ix else name, shape, scheme) for (name, shape, scheme), ix in
            groups.items()]


def plan_dict(plan: QuantPlan) -> Dict[str, Any]:
    """The plan as JSON data: block lists, every layer's scheme, and the FP layers with their reasons."""
    layers = {}
    for lp in plan.layers:
        entry: Dict[str, Any] = {"shape": [lp.out_features, lp.in_features], "block": lp.block}
        if lp.params is None:
            entry["kept_fp"] = lp.reason
        else:
            entry.update(bits=lp.params.bits, group_size=lp.params.group_size, scheme=lp.params.scheme)
            if lp.note:
                entry["note"] = lp.note
        layers[lp.name] = entry
    return {"block_lists": {path: list(units) for path, units in plan.block_lists},
            "quantized": len(plan.quantized), "kept_fp": {lp.name: lp.reason for lp in plan.kept_fp},
            "summary": plan.summary_lines(), "layers": layers}


# ---------------------------------------------------------------------------------------- data, versions
def count_tokens(batches: Iterable[Mapping[str, Any]]) -> int:
    """Tokens in calibration batches: the attention mask's ones when there is a mask, else every input id."""
    total = 0
    for b in batches:
        mask = b.get("attention_mask")
        ids = b.get("input_ids")
        if mask is not None:
            total += int(mask.sum())
        elif ids is not None:
            total += int(ids.numel())
    return total


def package_versions(names: Sequence[str] = VERSIONED_PACKAGES) -> Dict[str, str]:
    """Installed versions of ``names`` (packages that are not installed are left out), and Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------- the report
def build_report(*, settings: Any, plan: QuantPlan, summary: Mapping[str, Any], phases: Mapping[str, float],
                 data: Mapping[str, Any], model: Mapping[str, Any], fmt: str, peak_rss_mb: float,
                 peak_gpu_mb: float) -> Dict[str, Any]:
    """The report as JSON data (see the module docstring); ``summary`` is :attr:`AutoRound.summary`."""
    blocks = [dict(b) for b in summary.get("blocks", [])]
    return _jsonable({
        "report_version": REPORT_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "format": fmt,
        "model": dict(model),
        "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings),
        "plan": plan_dict(plan),
        "data": dict(data),
        "blocks": blocks,
        "e2e": summary.get("e2e"),
        "seconds": {**{k: round(v, 3) for k, v in phases.items()}, "total": round(sum(phases.values()), 3)},
        "memory": {"peak_rss_mb": round(peak_rss_mb, 1), "peak_gpu_mb": round(peak_gpu_mb, 1)},
        "versions": package_versions(),
    })


def write_report(folder: Path, report: Mapping[str, Any], plot: bool = True) -> List[Path]:
    """Write ``quantization_report.json`` (and the loss plot when ``plot`` and matplotlib allow) into ``folder``."""
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    written = [path]
    if plot:
        png = plot_losses(report.get("blocks", []), Path(folder) / PLOT_FILE)
        if png is not None:
            written.append(png)
    return written


_told_no_matplotlib = False


def plot_losses(blocks: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    """Per-block loss at the round-to-nearest start (``first``) and after tuning (``best``), log scale, and
    beside it the loss per iteration of a few blocks (:func:`curve_blocks`), as a PNG at ``path``. Returns None (and says so once, with the install command) without matplotlib, or
    when there are no tuned blocks."""
    global _told_no_matplotlib
    if not blocks:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        if not _told_no_matplotlib:
            logger.info("no loss plot: matplotlib is not installed (pip install 'auto-round[plot]' or pip install "
                        "matplotlib); the losses are in %s", REPORT_FILE)
            _told_no_matplotlib = True
        return None
    x = list(range(len(blocks)))
    curves = curve_blocks(blocks)
    fig, axes = plt.subplots(1, 2 if curves else 1, squeeze=False,
                             figsize=(max(6.0, 0.25 * len(blocks)) + (5.0 if curves else 0.0), 3.5))
    ax = axes[0][0]
    try:
        ax.plot(x, [b["first"] for b in blocks], marker="o", label="round-to-nearest (first)")
        ax.plot(x, [b["best"] for b in blocks], marker="o", label="tuned (best)")
        if all(b["first"] > 0 and b["best"] > 0 for b in blocks):
            ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("block output MSE")
        ax.set_title("loss per block")
        ax.legend()
        if curves:
            cx = axes[0][1]
            for b in curves:
                cx.plot(range(len(b["losses"])), b["losses"], label=b["name"])
            if all(v > 0 for b in curves for v in b["losses"]):
                cx.set_yscale("log")
            cx.set_xlabel("iteration")
            cx.set_ylabel("batch loss")
            cx.set_title("loss per iteration")
            cx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def curve_blocks(blocks: Sequence[Mapping[str, Any]], count: int = 4) -> List[Mapping[str, Any]]:
    """Up to ``count`` blocks spread over the depth (first, last and between) that have a loss per iteration."""
    with_losses = [b for b in blocks if b.get("losses")]
    if len(with_losses) <= count:
        return with_losses
    picks = sorted({round(i * (len(with_losses) - 1) / (count - 1)) for i in range(count)})
    return [with_losses[i] for i in picks]


def _reduction(first: float, best: float) -> str:
    return f"{100 * (1 - best / first):.0f}%" if first > 0 else "-"


def summary_lines(report: Mapping[str, Any], max_blocks: int = 6) -> List[str]:
    """The compact end-of-run table: what was quantized, the blocks with the largest tuned loss, time
    per phase and memory."""
    plan, blocks = report["plan"], report.get("blocks", [])
    secs, mem, data = report["seconds"], report["memory"], report.get("data", {})
    lines = [f"quantized {plan['quantized']} linear layers, {len(plan['kept_fp'])} kept in full precision "
             f"({report['format']})"]
    lines += [line for line in plan["summary"] if line.startswith("  FP")]
    if data.get("samples") is not None:
        lines.append(f"data      {data['dataset']}: {data['samples']} samples, {data.get('tokens', '-')} tokens")
    elif data.get("dataset"):
        lines.append(f"data      {data['dataset']}")
    if blocks:
        worst = sorted(blocks, key=lambda b: -b["best"])[:max_blocks]
        lines.append(f"blocks    {len(blocks)} tuned; mean loss RTN {sum(b['first'] for b in blocks) / len(blocks):.3g}"
                     f" -> tuned {sum(b['best'] for b in blocks) / len(blocks):.3g}; largest tuned losses:")
        lines.append(f"  {'block':<32} {'RTN':>10} {'best':>10} {'last':>10} {'iter':>5} {'cut':>5}")
        for b in worst:
            lines.append(f"  {b['name']:<32} {b['first']:>10.3g} {b['best']:>10.3g} {b['last']:>10.3g} "
                         f"{b['best_iter']:>5} {_reduction(b['first'], b['best']):>5}")
    e2e = report.get("e2e")
    if e2e:
        lines.append(f"e2e       {e2e['epochs']} epochs of scale tuning: calibration KL {e2e['kl_before']:.4g} -> "
                     f"{e2e['kl_after']:.4g}" + ("" if e2e["kept"] else " (not lower: block-wise scales kept)"))
    lines.append("time      " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    lines.append(f"memory    peak RSS {mem['peak_rss_mb']:.0f} MiB, peak GPU {mem['peak_gpu_mb']:.0f} MiB")
    return lines
