"""One frontier plot from every ``bench/results/frontier*.json``: perplexity against quantize time.

``bench_frontier.py`` plots the points of its own run; the frontier of issue 9 was measured over
several runs (one scheme and one iteration count at a time, on the same identical windows and the
same held-out split: each file records them). This script merges the files, checks that they
share the calibration and evaluation settings and the FP perplexity, and draws one panel per
scheme with a curve per method (ours ``enable_alg_ext``, our default since 2026-12-07, ours plain, the
reference plain and with ``enable_alg_ext``; iters 0 of a default curve is its optimized RTN); plain RTN, mixed bits,
runs at another seed than 42 and (``--pieces``) the single-piece ``ours ext FIELD=VALUE`` runs are
points of their own. Each point is annotated with its iteration count. Writes
``bench/results/frontier_all.png`` and ``frontier_all.json``
(the merged points, with the file each came from).

    .venv/bin/python bench/plot_frontier.py
    .venv/bin/python bench/plot_frontier.py --pieces     # also the single-piece runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, fmt, log, print_table  # noqa: E402

# label as bench_frontier.py writes it -> the curve it belongs to (None: a point of its own)
# Since 2026-12-07 our default tuner is the extended one, and "ours" runs name the plain tuner (enable_alg_ext=False);
# iters 0 (optimized RTN, no tuner) starts the default curve.
DEFAULT_EXT = "ours enable_alg_ext (default)"
CURVES = {"ours": "ours plain tuner", "ours opt-RTN": DEFAULT_EXT, "ours ext": DEFAULT_EXT,
          "ours ext+e2e": "ours enable_alg_ext + e2e_epochs",
          "ref": "reference plain", "ref opt-RTN": "reference plain", "ref alg_ext": "reference enable_alg_ext",
          "ours RTN": "plain RTN, ours", "ref RTN": "plain RTN, reference"}
# Points measured before ``enable_alg_ext`` took its present pieces (e6dd1ef): (file, label) -> the
# curve they belong to now. The W2G64 "ours ext" run of frontier_it50_w2g64.json was the clip start alone;
# today's enable_alg_ext (clip start + top-0.1% cut below 4 bits + per-token relative loss) is the
# "outlier_fraction=0.001,token_norm=true" run of the pieces file.
RELABEL = {("frontier_it50_w2g64.json", "ours ext"): "ours ext clip start only (enable_alg_ext before 12-03)",
           ("frontier_it50_w2g64_pieces.json", "ours ext outlier_fraction=0.001,token_norm=true"): "ours ext"}
SETTINGS_KEYS = ("nsamples", "seqlen", "batch_size", "sym", "calibration", "eval_windows", "eval_seqlen")


def style(curve: str) -> Dict[str, Any]:
    """Colour by side (ours blue, the reference red), marker and line by kind of run."""
    ref = "reference" in curve
    kind = ("rtn" if "plain RTN" in curve else "mixed" if ("mixed" in curve or "AutoScheme" in curve)
            else "e2e" if "e2e" in curve else "ext" if ("ext" in curve) else "default")
    if kind == "e2e":
        return {"color": "navy", "marker": "D", "linestyle": "-."}
    marker, line = {"default": ("o", "-"), "ext": ("^", "--"), "rtn": ("x", "none"), "mixed": ("s", "none")}[kind]
    if kind == "ext" and curve not in (DEFAULT_EXT, "reference enable_alg_ext"):
        marker, line = "v", "none"  # a single piece or a superseded variant
    return {"color": ("tab:red" if ref else "tab:blue") if kind != "ext" or "enable_alg_ext" in curve
            else "tab:cyan", "marker": marker, "linestyle": line}


def curve_of(label: str, pieces: bool) -> Optional[str]:
    """The curve a point is drawn on; mixed-bit and single-piece runs are their own series (pieces only
    with ``pieces``)."""
    if label in CURVES:
        return CURVES[label]
    if "mixed" in label or "AutoScheme" in label:
        return label.replace("ref ", "reference ")
    return label if pieces else None


def merge(files: Sequence[Path], pieces: bool = False) -> Dict[str, Any]:
    """The points of ``files`` on one set of settings: raises ValueError naming the file that differs."""
    points: List[Dict[str, Any]] = []
    base: Optional[Dict[str, Any]] = None
    fp: Optional[float] = None
    for path in files:
        rec = json.loads(path.read_text())
        settings = {k: rec.get("settings", {}).get(k) for k in SETTINGS_KEYS}
        if base is None:
            base, fp, first = settings, rec.get("fp_ppl"), path
        elif settings != base:
            raise ValueError(f"{path} was measured with other settings than {first}: {settings} vs {base}; "
                             f"pass only files of one setting (--files)")
        if fp and rec.get("fp_ppl") and abs(rec["fp_ppl"] - fp) > 1e-3 * fp:
            raise ValueError(f"{path}: FP perplexity {rec['fp_ppl']:.4f} differs from {fp:.4f} in {first}")
        seed = rec.get("settings", {}).get("seed", 42)
        for p in rec.get("points", []):
            curve = curve_of(RELABEL.get((path.name, p["label"]), p["label"]), pieces)
            if curve is None or not p.get("ppl") or not p.get("seconds"):
                continue
            if seed != 42:  # another tuning seed: a point of its own beside the curve (the seed spread)
                curve = f"{curve}, seed {seed}"
            points.append({**p, "curve": curve, "file": path.name})
    return {"settings": base or {}, "fp_ppl": fp, "points": points}


def plot(points: Sequence[Dict[str, Any]], fp_ppl: float, path: Path) -> Path:
    """One panel per scheme: the curves by time (x) and perplexity (y, log), iteration counts annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = sorted({p["scheme"] for p in points}, key=lambda s: -int(s[1]))  # W4, W3, W2
    fig, axes = plt.subplots(1, len(schemes), figsize=(5.5 * len(schemes), 4.5), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        mine = [p for p in points if p["scheme"] == scheme]
        for curve in sorted({p["curve"] for p in mine}):
            pts = sorted((p["seconds"], p["ppl"], p["iters"]) for p in mine if p["curve"] == curve)
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], label=curve, **style(curve))
            for x, y, it in pts:
                ax.annotate(f"it{it}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(fp_ppl, color="gray", linestyle=":", label=f"FP {fp_ppl:.2f}")
        ax.set_title(f"SmolLM2-135M {scheme} sym")
        ax.set_xlabel("quantize seconds (2-core CPU, shared)")
        ax.set_ylabel("held-out BBC perplexity")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="*", type=Path, default=None,
                    help="frontier JSON files (default: every bench/results/frontier*.json but the merged one)")
    ap.add_argument("--pieces", action="store_true", help="also draw the single-piece 'ours ext FIELD=VALUE' runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "frontier_all.png")
    args = ap.parse_args(argv)
    files = args.files or sorted(p for p in RESULTS.glob("frontier*.json") if p.stem != args.out.stem)
    if not files:
        raise SystemExit(f"no frontier results in {RESULTS}: run bench/bench_frontier.py first")
    merged = merge(files, args.pieces)
    if not merged["points"] or not merged["fp_ppl"]:
        raise SystemExit(f"no point with a perplexity and a time in {', '.join(map(str, files))}")
    rows = [[p["scheme"], p["iters"], p["curve"], fmt(p["ppl"], ".2f"), fmt(p["ppl"] - merged["fp_ppl"], ".2f"),
             fmt(p["seconds"], ".0f"), p["file"]]
            for p in sorted(merged["points"], key=lambda p: (p["scheme"], p["curve"], p["iters"]))]
    merged["table"] = print_table(["scheme", "iters", "curve", "ppl", "+ over FP", "s", "from"], rows,
                                  f"SmolLM2-135M frontier, FP {merged['fp_ppl']:.3f}, {len(files)} files")
    try:
        merged["plot"] = str(plot(merged["points"], merged["fp_ppl"], args.out))
    except ImportError:
        raise SystemExit("matplotlib is not installed: make venv installs it (the [plot] extra)")
    args.out.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    log(f"plot: {merged['plot']}, points: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
