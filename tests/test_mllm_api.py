"""AutoRoundMLLM's public surface: the seed's code block, the CLI, templates, processors, errors."""

import json

import pytest

from auto_round import AutoRoundMLLM
from auto_round.cli import main_mllm
from auto_round.mllm.processor import PROCESSORS, HFProcessor, register_processor
from auto_round.mllm.template import TEMPLATES, _register_template, get_template, load_template_file
from tiny_vlms import FAMILIES

FAST = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=48, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("Qwen2-VL-tiny")
    vlm = FAMILIES["qwen2_vl"]()
    vlm.model.save_pretrained(d)
    vlm.processor.save_pretrained(d)
    return d


def test_seed_code_block_runs_as_written(qwen2_vl_dir, tmp_path, monkeypatch):
    """The seed's example, with a local folder for the hub id (and the tuning shortened)."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    monkeypatch.chdir(tmp_path)
    model_name = str(qwen2_vl_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_name, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    processor = AutoProcessor.from_pretrained(model_name, trust_remote_code=True)
    bits, group_size, sym = 4, 128, True
    autoround = AutoRoundMLLM(model, tokenizer, processor, bits=bits, group_size=group_size, sym=sym,
                              iters=2, nsamples=4, seqlen=64)
    autoround.quantize()
    output_dir = "./tmp_autoround"
    autoround.save_quantized(output_dir, format="auto_round", inplace=True)
    saved = {p.name for p in (tmp_path / "tmp_autoround").iterdir()}
    assert {"config.json", "model.safetensors", "quantization_config.json", "tokenizer.json"} <= saved, saved
    assert {"processor_config.json", "preprocessor_config.json"} & saved, saved
    assert autoround.dataset_used == "auto_round:offline_corpus"  # pile-10k is out of reach offline


def test_cli_seed_command_with_several_formats(qwen2_vl_dir, tmp_path):
    argv = ["--model", str(qwen2_vl_dir), "--bits", "4", "--group_size", "32", "--format", "auto_round,auto_round:gptq",
            "--output_dir", str(tmp_path), "--iters", "2", "--nsamples", "2", "--batch_size", "2", "--seqlen", "48",
            "--device", "cpu"]
    assert main_mllm(argv) == 0
    root = tmp_path / f"{qwen2_vl_dir.name}-w4g32"
    assert (root / "auto_round" / "config.json").is_file() and (root / "auto_round-gptq" / "config.json").is_file()


def test_cli_image_text_and_nontext(qwen2_vl_dir, tmp_path):
    argv = ["--model", str(qwen2_vl_dir), "--group_size", "32", "--quant_nontext_module", "--iters", "1",
            "--nsamples", "2", "--batch_size", "2", "--output_dir", str(tmp_path)]
    assert main_mllm(argv) == 0
    cfg = json.loads((tmp_path / f"{qwen2_vl_dir.name}-w4g32" / "config.json").read_text())["quantization_config"]
    assert cfg["block_name_to_quantize"].startswith("model.visual.blocks")
    assert cfg["dataset"] == "auto_round:offline_image_text" and cfg["seqlen"] == 512


def test_text_dataset_with_nontext_is_refused():
    vlm = FAMILIES["llava"]()
    with pytest.raises(ValueError, match="needs image-text calibration data"):
        AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, quant_nontext_module=True,
                      dataset="auto_round:offline_corpus", **FAST)


def test_mllama_switches_to_image_text_with_reason(caplog):
    vlm = FAMILIES["mllama"]()
    with caplog.at_level("WARNING"):
        ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, dataset="auto_round:offline_corpus", **FAST)
    assert ar.data_kind == "image" and "cannot calibrate on text alone" in caplog.text


def test_padded_batches_mask_padding_out_of_the_loss():
    vlm = FAMILIES["qwen2_vl"]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, dataset="auto_round:offline_image_text",
                       bits=4, group_size=32, iters=1, nsamples=6, batch_size=3, seqlen=512)
    batches = ar.calibration_batches()
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 3 for b in batches)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches), "samples differ in length: padding expected"


def test_register_template_as_in_the_seed_and_json_templates(tmp_path, caplog):
    t = _register_template(model_type="my_vlm", default_dataset="NeelNanda/pile-10k", processor=PROCESSORS["hf"])
    assert TEMPLATES["my_vlm"] is t and t.processor == "hf"
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"model_type": "x", "user_format": "<u>{content}</u>", "replace_tokens": [["<image>\n", "<img>"]]}))
    tj = load_template_file(f)
    assert tj.render([("user", "hi"), ("assistant", "yo")], has_image=True).startswith("<u><img>hi</u>")
    assert get_template("anything", str(f)).model_type == "x"
    with caplog.at_level("INFO"):
        assert get_template("never_seen_type").model_type == "default"
    assert "generic" in caplog.text
    f.write_text(json.dumps({"model_type": "x", "usr_format": "{content}"}))
    with pytest.raises(ValueError, match="usr_format"):
        load_template_file(f)
    with pytest.raises(ValueError, match="neither a registered template"):
        get_template("llava", "no_such_template")


def test_register_processor_rejects_duplicates():
    @register_processor("my_proc_for_test")
    class Mine(HFProcessor):
        pass

    assert PROCESSORS["my_proc_for_test"] is Mine
    with pytest.raises(ValueError, match="already registered"):
        register_processor("my_proc_for_test")(Mine)
