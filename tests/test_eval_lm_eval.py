"""lm-eval tasks through our loaded model: a custom task on a local file, offline (needs lm-eval)."""

import json

import pytest

from auto_round.cli import main
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'auto-round[eval]')")

DOCS = [{"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "purple sky."], "label": 0},
        {"question": "The cat sat on the", "choices": ["mat.", "moon."], "label": 0},
        {"question": "One, two, three,", "choices": ["four.", "banana."], "label": 1}]


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    (d / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in DOCS) + "\n")
    (d / "local_choice.yaml").write_text(f"""task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d / "local_choice.yaml"


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tiny_llama().save_pretrained(d / "tiny")
    make_tokenizer().save_pretrained(d / "tiny")
    assert main(["--model", str(d / "tiny"), "--group_size", "32", "--recipe", "rtn", "--output_dir", str(d / "o")]) == 0
    return d / "o" / "tiny-w4g32"


def test_a_custom_lm_eval_task_on_a_local_file_runs_on_the_quantized_model(quantized_dir, task_yaml, capsys):
    from auto_round.evaluation.harness import run_lm_eval
    from auto_round.inference import load_quantized

    capsys.readouterr()
    assert main(["--eval", "--model", str(quantized_dir), "--tasks", str(task_yaml)]) == 0
    saved = json.loads((quantized_dir / "eval_results.json").read_text())["runs"]["quantized"]["local_choice"]
    assert 0.0 <= saved["acc,none"] <= 1.0 and saved["acc,none"] * 3 == pytest.approx(round(saved["acc,none"] * 3))
    assert any(line.startswith("local_choice") and "acc,none" in line for line in capsys.readouterr().out.splitlines())
    # the same number straight from the adapter on the model object we load (our QuantLinear backends)
    model = load_quantized(str(quantized_dir))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    again = run_lm_eval(model, make_tokenizer(), [str(task_yaml)])
    assert again["local_choice"]["acc,none"] == saved["acc,none"]


@pytest.mark.slow  # indexes all of lm-eval's own tasks (about 40 s)
def test_an_unknown_lm_eval_task_is_refused_before_tuning(tmp_path, capsys, monkeypatch):
    from auto_round import autoround

    monkeypatch.setattr(autoround, "quantize_model", lambda *a, **k: pytest.fail("tuning started"))
    d = tmp_path / "tiny"
    tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    assert main(["--model", str(d), "--group_size", "32", "--tasks", "hellaswagg", "--output_dir", str(tmp_path)]) == 2
    assert "lm-eval has no task hellaswagg (did you mean hellaswag" in capsys.readouterr().err
