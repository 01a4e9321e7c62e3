"""The run report: quantization_report.json in every checkpoint, the loss plot, the end-of-run table."""

import json
import logging
import sys
import types

import pytest

from auto_round import AutoRound
from auto_round.export.folder import read_manifest
from auto_round.report import (PLOT_FILE, REPORT_FILE, count_tokens, index_ranges, layer_rows, plot_losses,
                               summary_lines)
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, group_size=32, iters=3, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus",
            device="cpu")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **FAST)
    out = tmp_path_factory.mktemp("q")
    written = ar.quantize_and_save(out, format="auto_round,fake", inplace=False)
    return ar, written


def test_every_checkpoint_holds_its_report_listed_in_the_manifest(tuned):
    ar, written = tuned
    assert len(written) == 2
    for folder, fmt in zip(written, ("auto_round", "fake")):
        report = json.loads((folder / REPORT_FILE).read_text())
        assert REPORT_FILE in read_manifest(folder)
        assert report["format"] == fmt and report["model"]["model_type"] == "llama"
        assert report["settings"]["iters"] == 3 and report["settings"]["group_size"] == 32
        assert report["data"] == {"dataset": "auto_round:offline_corpus", "samples": 4, "tokens": 4 * 32}
        assert {"torch", "transformers", "python", "auto-round"} <= set(report["versions"])
        assert {"plan", "calibration_data", "tuning", f"export:{fmt}", "total"} <= set(report["seconds"])
        assert report["memory"]["peak_rss_mb"] > 0


def test_report_holds_the_plan_and_per_block_losses(tuned):
    ar, written = tuned
    report = json.loads((written[0] / REPORT_FILE).read_text())
    plan = report["plan"]
    assert plan["block_lists"] == {"model.layers": ["model.layers.0", "model.layers.1"]}
    assert plan["quantized"] == 14 and plan["kept_fp"] == {"lm_head": "outside the tuned blocks"}
    q = plan["layers"]["model.layers.0.mlp.down_proj"]
    assert q == {"shape": [64, 128], "block": "model.layers.0", "bits": 4, "group_size": 32, "scheme": "sym"}
    blocks = report["blocks"]
    assert [b["name"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    for b, r in zip(blocks, ar.block_results):
        assert (b["first"], b["best"], b["last"], b["best_iter"]) == (r.first_loss, r.best_loss, r.last_loss, r.best_iter)
        assert b["best"] <= b["first"] and 0 <= b["best_iter"] < 3


def test_summary_table_lists_blocks_time_and_memory(tuned):
    ar, _ = tuned
    lines = summary_lines(ar.run_report("auto_round"))
    text = "\n".join(lines)
    assert lines[0] == "quantized 14 linear layers, 1 kept in full precision (auto_round)"
    assert "FP (outside the tuned blocks): lm_head" in text and "blocks    2 tuned" in text
    assert "model.layers.0" in text and "time      plan" in text and "peak RSS" in text


def test_cli_run_ends_with_the_summary_table(tmp_path, capsys):
    from auto_round.cli import main

    d = tmp_path / "m"
    tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    argv = ["--model", str(d), "--group_size", "32", "--iters", "2", "--nsamples", "2", "--seqlen", "32",
            "--batch_size", "2", "--dataset", "auto_round:offline_corpus", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks    2 tuned; mean loss RTN" in out and "data      auto_round:offline_corpus: 2 samples, 64 tokens" in out
    assert (tmp_path / "o" / "m-w4g32" / REPORT_FILE).is_file()


def test_layer_rows_merge_the_same_layer_across_blocks(tuned):
    ar, _ = tuned
    rows = layer_rows(ar.plan)
    assert ("model.layers.[0-1].self_attn.k_proj", "32x64", "W4 g32 sym") in rows
    assert ("lm_head", "512x64", "FP (outside the tuned blocks)") in rows and len(rows) == 8
    assert index_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8" and index_ranges([3]) == "3"


def test_count_tokens_excludes_padding():
    import torch

    batches = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])},
               {"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    assert count_tokens(batches) == 7 + 4


BLOCKS = [{"name": "b0", "first": 2.0, "best": 1.0, "last": 1.5, "best_iter": 3},
          {"name": "b1", "first": 4.0, "best": 1.0, "last": 1.0, "best_iter": 9}]


def test_no_matplotlib_no_plot_and_one_clear_message(tmp_path, monkeypatch, caplog):
    import auto_round.report as report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(report, "_told_no_matplotlib", False)
    with caplog.at_level(logging.INFO, logger="auto_round.report"):
        assert plot_losses(BLOCKS, tmp_path / PLOT_FILE) is None
        assert plot_losses(BLOCKS, tmp_path / PLOT_FILE) is None
    assert caplog.text.count("matplotlib is not installed (pip install 'auto-round[plot]'") == 1
    assert not (tmp_path / PLOT_FILE).exists()


def test_plot_draws_rtn_and_tuned_loss_per_block(tmp_path, monkeypatch):
    calls = {}

    class Axes:
        def plot(self, x, y, **kw):
            calls.setdefault("plots", []).append((list(x), list(y), kw["label"]))

        def __getattr__(self, name):
            return lambda *a, **k: calls.setdefault(name, a)

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, path, **kw):
            path.write_bytes(b"\x89PNG")

    def subplots(rows=1, cols=1, **kw):
        calls["panels"] = cols
        return Figure(), [[Axes() for _ in range(cols)]]

    pyplot = types.SimpleNamespace(subplots=subplots, close=lambda fig: None)
    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: calls.setdefault("backend", backend)
    mpl.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    assert plot_losses(BLOCKS, tmp_path / PLOT_FILE) == tmp_path / PLOT_FILE
    assert calls["backend"] == "Agg" and (tmp_path / PLOT_FILE).read_bytes() == b"\x89PNG"
    assert calls["plots"] == [([0, 1], [2.0, 4.0], "round-to-nearest (first)"), ([0, 1], [1.0, 1.0], "tuned (best)")]
    assert calls["set_yscale"] == ("log",) and calls["panels"] == 1  # no loss history: one panel
    calls.clear()
    with_curves = [{**b, "losses": [b["first"], b["last"], b["best"]]} for b in BLOCKS]
    assert plot_losses(with_curves, tmp_path / PLOT_FILE) == tmp_path / PLOT_FILE
    assert calls["panels"] == 2
    assert calls["plots"][2:] == [([0, 1, 2], [2.0, 1.5, 1.0], "b0"), ([0, 1, 2], [4.0, 1.0, 1.0], "b1")]


def test_the_real_matplotlib_draws_the_loss_plot(tmp_path):
    pytest.importorskip("matplotlib")  # in the dev venv (make venv installs the [plot] extra)
    with_curves = [{**b, "losses": [b["first"], b["last"], b["best"]]} for b in BLOCKS]
    for blocks in (BLOCKS, with_curves):
        path = plot_losses(blocks, tmp_path / PLOT_FILE)
        assert path == tmp_path / PLOT_FILE
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
        path.unlink()


def test_curve_blocks_spread_over_the_depth():
    from auto_round.report import curve_blocks

    blocks = [{"name": f"b{i}", "losses": [1.0]} for i in range(10)] + [{"name": "rtn-only", "losses": []}]
    assert [b["name"] for b in curve_blocks(blocks)] == ["b0", "b3", "b6", "b9"]
    assert curve_blocks(blocks[:2]) == blocks[:2]


def test_the_summary_keeps_every_iterations_loss(tuned):
    ar, _ = tuned
    assert all(len(b["losses"]) == 3 and b["losses"][b["best_iter"]] == b["best"] for b in ar.summary["blocks"])


def test_a_vlm_report_names_its_family_and_why_the_vision_tower_stays_fp(tmp_path):
    from auto_round import AutoRoundMLLM
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, bits=4, group_size=32, iters=1, nsamples=2,
                       seqlen=48, batch_size=2)
    folder = ar.quantize_and_save(tmp_path / "q", inplace=False)[0]
    report = json.loads((folder / REPORT_FILE).read_text())
    assert report["model"]["family"] == "qwen2_vl" and report["data"]["samples"] == 2
    reasons = set(report["plan"]["kept_fp"].values())
    assert "vision tower (quant_nontext_module=False)" in reasons
    assert list(report["plan"]["block_lists"]) == ["model.language_model.layers"]
