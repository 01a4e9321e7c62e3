"""Every VLM family of the support matrix (transformers classes): quantize, save, reload, generate.

Text-only calibration (default) tunes the language model only; with quant_nontext_module the vision
tower (and projector) are tuned first on image-text data. The reloaded checkpoint must give the
in-memory quantized model's logits for an image + prompt, and generate.
"""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from auto_round import AutoRoundMLLM
from auto_round.mllm.families import family_for, resolve_family_blocks
from tiny_vlms import FAMILIES, make_image, skip_on_upstream_break

FAST = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=48, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_roundtrip(vlm, ar, out):
    ar.save_quantized(out, inplace=False)
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        ref = ar.model(**inputs).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=ar.model.dtype)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()
    gen = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_text_module_only(name, tmp_path):
    skip_on_upstream_break(name)
    vlm = FAMILIES[name]()
    assert family_for(vlm.model_type) is not None, f"{vlm.model_type} has no family record"
    text, vision, _ = resolve_family_blocks(vlm.model, family_for(vlm.model_type))
    assert vision, "vision block list not found"
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, dataset="auto_round:offline_corpus", **FAST)
    if not family_for(vlm.model_type).text_only:
        assert ar.data_kind == "image"  # switched, with a logged reason
    ar.quantize()
    names = set(ar.quantized_layers)
    assert names and all(n.startswith(text + ".") for n in names)
    assert not any(n.startswith(v) for v in vision for n in names)
    kept = ar.summary["kept_fp"]
    assert any("vision tower" in why for why in kept.values())
    _check_roundtrip(vlm, ar, tmp_path / "q")


NONTEXT = sorted(FAMILIES)


@pytest.mark.parametrize("name", NONTEXT)
def test_quant_nontext_module(name, tmp_path):
    skip_on_upstream_break(name)
    vlm = FAMILIES[name]()
    fam = family_for(vlm.model_type)
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, quant_nontext_module=True, **FAST)
    assert ar.data_kind == "image"
    ar.quantize()
    text, vision, projector = resolve_family_blocks(vlm.model, fam)
    names = set(ar.quantized_layers)
    assert any(n.startswith(v + ".") for v in vision for n in names), "no vision layer quantized"
    assert any(n.startswith(text + ".") for n in names)
    lists = [r["name"].split(",")[0] for r in ar.summary["blocks"]]
    assert lists.index(next(x for x in lists if x.startswith(text))) > 0, "language model must come after vision"
    _check_roundtrip(vlm, ar, tmp_path / "q")


def test_processor_comes_from_the_family_table_unless_a_template_names_one():
    from auto_round.mllm.families import family_for, processor_for
    from auto_round.mllm.template import Template, get_template

    qwen = family_for("qwen2_5_vl")
    assert get_template("qwen2_5_vl").processor is None  # the built-in template leaves it to the family
    assert processor_for(qwen, get_template("qwen2_5_vl").processor) == "qwen2_vl"
    assert processor_for(qwen, Template("qwen2_5_vl", processor="hf").processor) == "hf"  # named: the template wins
    assert processor_for(family_for("llava"), get_template("llava").processor) == "hf"
    assert processor_for(None, get_template("default").processor) == "hf"
