"""Evaluation: the built-in ppl:FILE task, lm-eval's install hint, --tasks / --eval in the CLI."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn as nn

from auto_round.cli import main
from auto_round.evaluation import Task, check_tasks, evaluate, parse_tasks, results_table
from auto_round.evaluation.ppl import perplexity, window_bounds
from auto_round.export.folder import read_manifest
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 30).strip()


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "held_out.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_windows_do_not_overlap_and_keep_the_tail():
    assert window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_bounds(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail predicts nothing
    assert window_bounds(3, 8) == [(0, 3)]
    with pytest.raises(ValueError, match="seqlen=1 is too short"):
        window_bounds(10, 1)


class Uniform(nn.Module):
    """Equal logits over ``vocab`` tokens: the perplexity of any text is exactly ``vocab``."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids):
        self.seen.append(tuple(input_ids.shape))
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.w})()


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size():
    tok = make_tokenizer()
    n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    model = Uniform(512)
    res = perplexity(model, tok, TEXT, seqlen=16, batch_size=4)
    assert res["ppl"] == pytest.approx(512, rel=1e-5)
    assert res["tokens"] == n and res["windows"] == len(window_bounds(n, 16))
    assert res["predicted_tokens"] == sum(e - s - 1 for s, e in window_bounds(n, 16))
    assert all(shape[1] == 16 for shape in model.seen[:-1]) and max(s[0] for s in model.seen) == 4


def test_perplexity_matches_the_models_own_loss_on_one_window():
    tok, model = make_tokenizer(), tiny_llama().eval()
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"][:40]])
    text = tok.decode(ids[0])
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tok, text, seqlen=64)["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_tasks_are_parsed_and_checked_before_any_work(tmp_path, text_file):
    assert parse_tasks(f"ppl:{text_file}, hellaswag") == [Task("ppl", str(text_file)), Task("lm_eval", "hellaswag")]
    assert parse_tasks(f"ppl:{text_file}")[0].label == "ppl:held_out.txt"
    with pytest.raises(ValueError, match="names no task"):
        parse_tasks(" , ")
    with pytest.raises(ValueError, match=r"task ppl:nope.txt: no such file"):
        check_tasks(parse_tasks("ppl:nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        check_tasks(parse_tasks(f"ppl:{tmp_path / 'empty.txt'}"))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_tasks_without_lm_eval_name_the_install_command():
    with pytest.raises(ImportError, match=r"pip install 'auto-round\[eval\]'"):
        check_tasks(parse_tasks("hellaswag"))


def test_results_table_puts_runs_side_by_side():
    runs = {"fp": {"ppl:a.txt": {"ppl": 10.0, "tokens": 5}}, "quantized": {"ppl:a.txt": {"ppl": 10.5, "tokens": 5},
                                                                           "arc": {"acc,none": 0.25}}}
    lines = results_table(runs)
    assert lines[0].split() == ["task", "metric", "fp", "quantized"]
    assert lines[1].split() == ["ppl:a.txt", "ppl", "10", "10.5"] and lines[2].split() == ["arc", "acc,none", "-", "0.25"]


def test_evaluate_caps_the_window_at_the_models_positions(text_file):
    res = evaluate(tiny_llama(), make_tokenizer(), parse_tasks(f"ppl:{text_file}"), seqlen=100_000)
    assert res["ppl:held_out.txt"]["seqlen"] == 512


def test_cli_quantize_then_evaluate_fp_and_quantized_side_by_side(model_dir, tmp_path, text_file, capsys):
    argv = ["--model", str(model_dir), "--bits", "8", "--group_size", "32", "--iters", "2", "--nsamples", "2",
            "--seqlen", "32", "--batch_size", "2", "--dataset", "auto_round:offline_corpus", "--output_dir",
            str(tmp_path / "o"), "--tasks", f"ppl:{text_file}", "--eval_fp", "--eval_seqlen", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "o" / f"{model_dir.name}-w8g32"
    saved = json.loads((folder / "eval_results.json").read_text())
    fp, q = saved["runs"]["fp"]["ppl:held_out.txt"]["ppl"], saved["runs"]["quantized"]["ppl:held_out.txt"]["ppl"]
    assert 1 < fp and abs(q / fp - 1) < 0.02  # 8 bits: the quantized model scores like the FP one
    assert "eval_results.json" in read_manifest(folder)
    row = next(line for line in out.splitlines() if line.startswith("ppl:held_out.txt"))
    assert row.split()[2:] == [f"{fp:.4g}", f"{q:.4g}"]


def test_cli_eval_of_an_existing_folder_and_of_the_fp_model(model_dir, tmp_path, text_file, capsys):
    argv = ["--model", str(model_dir), "--group_size", "32", "--recipe", "rtn", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 0
    folder = tmp_path / "o" / f"{model_dir.name}-w4g32"
    capsys.readouterr()
    assert main(["--eval", "--model", str(folder), "--tasks", f"ppl:{text_file}", "--eval_seqlen", "64"]) == 0
    q = json.loads((folder / "eval_results.json").read_text())["runs"]["quantized"]["ppl:held_out.txt"]["ppl"]
    assert "quantized" in capsys.readouterr().out
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["--eval", "--model", str(model_dir), "--tasks", f"ppl:{text_file}", "--eval_seqlen", "64",
                 "--output_dir", str(tmp_path / "ev")]) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == before  # a folder we did not write is never written
    fp = json.loads((tmp_path / "ev" / f"{model_dir.name}-eval_results.json").read_text())["runs"]["fp"]
    assert fp["ppl:held_out.txt"]["ppl"] != q


def test_cli_refuses_a_task_that_cannot_run_before_tuning(model_dir, tmp_path, capsys, monkeypatch):
    from auto_round import autoround

    monkeypatch.setattr(autoround, "quantize_model", lambda *a, **k: pytest.fail("tuning started"))
    argv = ["--model", str(model_dir), "--group_size", "32", "--output_dir", str(tmp_path / "o"),
            "--tasks", "ppl:missing.txt"]
    assert main(argv) == 2
    assert "task ppl:missing.txt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--eval", "--model", str(model_dir)])
    assert e.value.code == 2 and "--eval needs --tasks" in capsys.readouterr().err


def test_a_harness_that_cannot_download_its_data_says_so_naming_the_tasks():
    from auto_round.evaluation.harness import missing_data_said_plainly

    with pytest.raises(ValueError, match=r"lmms-eval task\(s\) \['mme'\] need a data set that is not on disk .*"
                                         r"Couldn't reach the hub.*or use local files"):
        with missing_data_said_plainly("lmms-eval", ["mme"], "or use local files"):
            raise ConnectionError("Couldn't reach the hub")
    with pytest.raises(KeyError):  # anything else passes unchanged
        with missing_data_said_plainly("lm-eval", ["hellaswag"], "or use local files"):
            raise KeyError("acc")
