"""VLM evaluation: task routing (lm-eval / lmms-eval / ppl), the adapter's log-likelihood and generation on a
tiny LLaVA, and (where lmms-eval is installed: ``make test-vlm-eval``) a custom lmms-eval task on local images
run end to end through ``lmms_eval.evaluator.simple_evaluate`` with our loaded model object."""

import importlib.util
import json
import textwrap

import pytest
import torch

from auto_round.cli import main_mllm
from auto_round.evaluation import Task, check_tasks, evaluate, parse_tasks
from auto_round.evaluation.lmms import continuation_logprob, encode, generate_text, render_prompt
from tiny_vlms import make_image, tiny_llava

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def test_tasks_go_to_the_harness_their_prefix_or_the_model_kind_names():
    assert parse_tasks("mme,lm_eval:hellaswag,lmms:pope", vlm=True) == [
        Task("lmms_eval", "mme"), Task("lm_eval", "hellaswag"), Task("lmms_eval", "pope")]
    assert parse_tasks("hellaswag,lmms_eval:mme") == [Task("lm_eval", "hellaswag"), Task("lmms_eval", "mme")]
    with pytest.raises(ValueError, match="names no task after 'lmms:'"):
        parse_tasks("lmms:")


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed")
def test_lmms_tasks_without_lmms_eval_name_the_install_command(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'auto-round\[vlm-eval\]'"):
        check_tasks(parse_tasks("mme", vlm=True))


def test_lmms_tasks_need_the_processor(llava):
    with pytest.raises(ValueError, match="need the model's processor"):
        evaluate(llava.model, llava.tokenizer, [Task("lmms_eval", "mme")])


def test_continuation_logprob_is_the_models_own_log_probability(llava):
    model, proc = llava.model, llava.processor
    image = make_image(llava.image_size)
    context, continuation = "What is shown?", " a cat"
    logp, greedy = continuation_logprob(model, proc, context, continuation, [image])
    prompt = render_prompt(model, proc, context, 1)
    assert prompt.count("<image>") == 1 and prompt.endswith("<|assistant|>\n")
    ids = encode(model, proc, prompt + continuation, [image])
    n = encode(model, proc, prompt, [image])["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**ids).logits[0].float()
    target = ids["input_ids"][0, n:]
    expected = torch.log_softmax(logits[n - 1:-1], -1).gather(1, target[:, None]).sum()
    assert logp == pytest.approx(float(expected), abs=1e-4) and logp < 0
    assert greedy == bool((logits[n - 1:-1].argmax(-1) == target).all())
    other, _ = continuation_logprob(model, proc, context, continuation, [make_image(llava.image_size, seed=5)])
    assert other != pytest.approx(logp, abs=1e-6)  # the image reaches the score


def test_generation_is_greedy_and_cut_at_the_stop_strings(llava):
    model, proc = llava.model, llava.processor
    image = make_image(llava.image_size)
    text = generate_text(model, proc, "Describe.", [image], {"max_new_tokens": 6, "temperature": 0})
    assert text == generate_text(model, proc, "Describe.", [image], {"max_new_tokens": 6, "until": []})
    inputs = encode(model, proc, render_prompt(model, proc, "Describe.", 1), [image])
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=llava.tokenizer.eos_token_id)
    assert text == llava.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if len(text) > 2:
        stop = text[1:3]
        assert generate_text(model, proc, "Describe.", [image], {"max_new_tokens": 6, "until": [stop]}) == \
            text.split(stop, 1)[0]


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed")
def test_mllm_cli_refuses_an_lmms_task_before_loading_or_tuning(tmp_path, capsys):
    code = main_mllm(["--model", str(tmp_path / "not-even-there"), "--tasks", "mme", "--output_dir", str(tmp_path)])
    assert code == 2 and "lmms-eval is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- with lmms-eval
def _local_task(folder, images, kind: str) -> str:
    """A custom lmms-eval task over local images (JSON lines + utils.py + YAML); returns the YAML path."""
    (folder / "data.jsonl").write_text("".join(json.dumps({"image": str(p), "question": q, "answer": a}) + "\n"
                                               for p, q, a in images), encoding="utf-8")
    (folder / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"]

        def process_results(doc, results):
            return {"exact_match": float(results[0].strip() == doc["answer"])}
        """), encoding="utf-8")
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'data.jsonl'}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        metadata:
          - version: 0.0
        """
    if kind == "generate":
        body = """
        task: ar_tiny_vqa_gen
        output_type: generate_until
        generation_kwargs:
          max_new_tokens: 4
          temperature: 0
          until: ["\\n"]
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """
    else:
        body = """
        task: ar_tiny_vqa_mc
        output_type: multiple_choice
        doc_to_choice: ["yes", "no"]
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    path = folder / f"{kind}.yaml"
    path.write_text(textwrap.dedent(common) + textwrap.dedent(body), encoding="utf-8")
    return str(path)


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (make test-vlm-eval)")
def test_a_local_lmms_task_runs_through_the_harness_with_our_model_object(llava, tmp_path):
    pics = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        make_image(llava.image_size, seed=i).save(p)
        pics.append((p, f"Is picture {i} bright?", "yes" if i % 2 else "no"))
    gen = _local_task(tmp_path / "g", pics, "generate") if (tmp_path / "g").mkdir() is None else None
    mc = _local_task(tmp_path / "m", pics, "mc") if (tmp_path / "m").mkdir() is None else None
    check_tasks(parse_tasks(f"{gen},{mc}", vlm=True))
    res = evaluate(llava.model, llava.tokenizer, parse_tasks(f"{gen},{mc}", vlm=True), processor=llava.processor)
    assert 0.0 <= res["ar_tiny_vqa_gen"]["exact_match,none"] <= 1.0
    # The multiple-choice accuracy is what our own log-likelihoods say, document by document.
    from PIL import Image

    expected = []
    for path, question, answer in pics:
        image = Image.open(path).convert("RGB")
        scores = [continuation_logprob(llava.model, llava.processor, question, " " + c, [image])[0]
                  for c in ("yes", "no")]
        expected.append(float(("yes", "no")[scores.index(max(scores))] == answer))
    assert res["ar_tiny_vqa_mc"]["acc,none"] == pytest.approx(sum(expected) / len(expected))


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (make test-vlm-eval)")
def test_an_unknown_lmms_task_is_named_with_the_closest_ones():
    with pytest.raises(ValueError, match=r"lmms-eval has no task mmeee \(did you mean"):
        check_tasks(parse_tasks("mmeee", vlm=True))


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (make test-vlm-eval)")
def test_mllm_cli_quantizes_then_evaluates_fp_and_quantized_in_lmms_eval(llava, tmp_path, capsys):
    src = tmp_path / "tiny-llava"
    llava.model.save_pretrained(src)
    llava.processor.save_pretrained(src)
    pics = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        make_image(llava.image_size, seed=i).save(p)
        pics.append((p, f"Is picture {i} bright?", "yes" if i % 2 else "no"))
    (tmp_path / "m").mkdir()
    mc = _local_task(tmp_path / "m", pics, "mc")
    argv = ["--model", str(src), "--group_size", "32", "--iters", "0", "--nsamples", "2", "--batch_size", "2",
            "--seqlen", "48", "--output_dir", str(tmp_path / "o"), "--tasks", mc, "--eval_fp", "--device", "cpu"]
    assert main_mllm(argv) == 0
    out = capsys.readouterr().out
    assert "ar_tiny_vqa_mc" in out and "fp" in out and "quantized" in out
    saved = json.loads((tmp_path / "o" / "tiny-llava-w4g32" / "eval_results.json").read_text())["runs"]
    assert set(saved) == {"fp", "quantized"}
    assert all(0.0 <= saved[r]["ar_tiny_vqa_mc"]["acc,none"] <= 1.0 for r in saved)
