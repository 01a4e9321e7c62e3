"""The frontier plot merges result files of one setting only, and draws a real PNG (matplotlib, [plot])."""

import json

import pytest

from bench import plot_frontier


def _write(path, points, seed=42, fp=31.0, nsamples=32):
    settings = {"nsamples": nsamples, "seqlen": 256, "batch_size": 4, "seed": seed, "sym": True,
                "calibration": "identical BBC windows", "eval_windows": 16, "eval_seqlen": 512}
    path.write_text(json.dumps({"settings": settings, "fp_ppl": fp, "points": points}))
    return path


def _pt(label, iters, ppl, seconds=10.0, scheme="W2G64"):
    return {"scheme": scheme, "iters": iters, "label": label, "ppl": ppl, "seconds": seconds}


def test_merge_puts_each_label_on_its_curve_and_keeps_other_seeds_apart(tmp_path):
    a = _write(tmp_path / "frontier_a.json", [_pt("ours opt-RTN", 0, 400.0), _pt("ours", 50, 97.0),
                                             _pt("ref alg_ext", 50, 85.0), _pt("ours ext clip_max=2.0", 50, 88.0),
                                             _pt("ref", 50, None)])  # a failed run: no point
    b = _write(tmp_path / "frontier_b.json", [_pt("ours", 50, 96.0)], seed=1)
    merged = plot_frontier.merge([a, b])
    curves = sorted((p["curve"], p["iters"]) for p in merged["points"])
    assert curves == [("ours enable_alg_ext (default)", 0), ("ours plain tuner", 50),
                      ("ours plain tuner, seed 1", 50), ("reference enable_alg_ext", 50)]
    assert len(plot_frontier.merge([a], pieces=True)["points"]) == 4  # the single-piece run drawn too


def test_merge_refuses_files_of_other_settings_or_fp(tmp_path):
    a = _write(tmp_path / "frontier_a.json", [_pt("ours", 50, 97.0)])
    with pytest.raises(ValueError, match="other settings"):
        plot_frontier.merge([a, _write(tmp_path / "frontier_b.json", [], nsamples=16)])
    with pytest.raises(ValueError, match="FP perplexity"):
        plot_frontier.merge([a, _write(tmp_path / "frontier_c.json", [], fp=35.0)])


def test_main_writes_a_png_and_the_merged_points(tmp_path):
    pytest.importorskip("matplotlib")
    src = _write(tmp_path / "frontier_x.json", [_pt("ours opt-RTN", 0, 60.0, 200.0, "W3G128"),
                                               _pt("ours", 50, 43.0, 360.0, "W3G128"),
                                               _pt("ours RTN", 0, 120.0, 2.0, "W3G128")])
    out = tmp_path / "all.png"
    assert plot_frontier.main(["--files", str(src), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    merged = json.loads(out.with_suffix(".json").read_text())
    assert {p["curve"] for p in merged["points"]} == {"ours enable_alg_ext (default)", "ours plain tuner",
                                                      "plain RTN, ours"}
