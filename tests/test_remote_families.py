"""The six remote-code VLM families (stand-ins, tests/remote_standins.py): quantize, save, reload, generate.

Phi-3.5-Vision, CogVLM2, DeepSeek-VL2, Molmo, Kimi-VL and GLM-4V-9B ship their modeling code with their
checkpoints; the stand-ins mirror the published module trees, forward signatures and input builders. Text-only
calibration must tune exactly the text block list; with quant_nontext_module (where families.py allows it) the
vision blocks are tuned first on image-text data. A checkpoint reloaded with AutoModelForCausalLM must give the
in-memory model's logits for an image + prompt, and generate. Every case must pass (what the families needed from
the library is listed in tests/REMOTE_STANDINS.md).
"""

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from auto_round import AutoRoundMLLM
from auto_round.inference.qlinear import QuantLinear
from auto_round.mllm import remote_processors  # noqa: F401  registers the remote-code processors
from auto_round.mllm.dataset import OFFLINE_IMAGE_TEXT, load_image_text_samples
from auto_round.mllm.families import family_for, resolve_family_blocks
from auto_round.mllm.processor import PROCESSORS
from auto_round.mllm.template import Template
from remote_standins import STANDINS, make_cogvlm2, registered
from tiny_vlms import make_image

FAST = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=48, batch_size=2)
NAMES = sorted(STANDINS)

# Published paths (text block list, vision block lists, projector) as the stand-ins build them under
# transformers 5 (Phi-3-V's CLIPVisionModel has no `.vision_model` level there).
PATHS = {
    "phi3_v": ("model.layers", ["model.vision_embed_tokens.img_processor.encoder.layers"],
               "model.vision_embed_tokens.img_projection"),
    "cogvlm2": ("model.layers", ["model.vision.transformer.layers"], "model.vision.linear_proj"),
    "deepseek_vl_v2": ("language.model.layers", ["vision.blocks"], "projector"),
    "molmo": ("model.transformer.blocks", ["model.vision_backbone.image_vit.transformer.resblocks"],
              "model.vision_backbone.image_projector"),
    "kimi_vl": ("language_model.model.layers", ["vision_tower.encoder.blocks"], "multi_modal_projector"),
    "chatglm": ("transformer.encoder.layers", ["transformer.vision.transformer.layers"],
                "transformer.vision.linear_proj"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    with registered():  # AutoConfig / AutoModelForCausalLM know the stand-ins only inside this module
        yield


def _linears(model, prefixes):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n.startswith(p + ".") or n == p for p in prefixes)}


def _check_roundtrip(s, ar, out):
    ar.save_quantized(out, inplace=False)
    inputs = s.inputs("What is shown?", make_image(s.image_size))
    with torch.no_grad():
        ref = ar.model(**inputs).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=ar.model.dtype)
    assert type(reloaded) is type(ar.model)
    assert all(isinstance(reloaded.get_submodule(n), QuantLinear) for n in ar.quantized_layers)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()
    gen = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", NAMES)
def test_image_reaches_logits(name):
    s = STANDINS[name]()
    with torch.no_grad():
        a = s.model(**s.inputs("What is shown?", make_image(s.image_size, seed=0))).logits[:, -1]
        b = s.model(**s.inputs("What is shown?", make_image(s.image_size, seed=1))).logits[:, -1]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_family_record_matches_published_tree(name):
    """Every path of the published tree is a candidate of the family record, and is a block list there."""
    s = STANDINS[name]()
    fam = family_for(s.model_type)
    assert fam is not None and fam.remote_code
    text, vision, projector = PATHS[name]
    assert text in fam.text_blocks and projector in fam.projectors and all(v in fam.vision_blocks for v in vision)
    assert resolve_family_blocks(s.model, fam) == (text, vision, projector)


@pytest.mark.parametrize("name", NAMES)
def test_blocks_resolve(name):
    """What the quantizer will use (family paths, else the structural fallback)."""
    s = STANDINS[name]()
    assert resolve_family_blocks(s.model, family_for(s.model_type)) == PATHS[name]


def test_cogvlm2_config_without_model_type_resolves_structurally():
    """The published CogVLMConfig sets no model_type (""), so no family record matches; the structure still
    finds the language and vision block lists (not the projector)."""
    s = make_cogvlm2()
    assert family_for("") is None
    assert resolve_family_blocks(s.model, None) == ("model.layers", ["model.vision.transformer.layers"], None)


@pytest.mark.parametrize("name", NAMES)
def test_text_module_only(name, tmp_path):
    s = STANDINS[name]()
    text, vision, _ = PATHS[name]
    expected = _linears(s.model, [text])
    ar = AutoRoundMLLM(s.model, s.tokenizer, s.processor, dataset="auto_round:offline_corpus", **FAST)
    assert ar.data_kind == "text"
    ar.quantize()
    assert set(ar.quantized_layers) == expected
    assert not _linears(s.model, vision) & set(ar.quantized_layers)
    _check_roundtrip(s, ar, tmp_path / "q")


NONTEXT = [n for n in NAMES if family_for(n).quant_nontext]


@pytest.mark.parametrize("name", NONTEXT)
def test_quant_nontext_module(name, tmp_path):
    s = STANDINS[name]()
    text, vision, projector = PATHS[name]
    ar = AutoRoundMLLM(s.model, s.tokenizer, s.processor, dataset=OFFLINE_IMAGE_TEXT, quant_nontext_module=True,
                       template=Template(s.model_type, processor=s.processor_name), **FAST)
    assert ar.data_kind == "image"
    ar.quantize()
    names = set(ar.quantized_layers)
    assert _linears(s.model, vision) <= names, "vision layers left unquantized"
    assert _linears(s.model, [projector]) <= names, "projector layers left unquantized"
    assert _linears(s.model, [text]) <= names
    lists = [r["name"].split(",")[0] for r in ar.summary["blocks"]]
    assert lists[0].startswith(vision[0] + ".") and lists[-1].startswith(text + "."), "vision first, language last"
    _check_roundtrip(s, ar, tmp_path / "q")


@pytest.mark.parametrize("name", [n for n in NAMES if not family_for(n).quant_nontext])
def test_quant_nontext_module_refused(name):
    s = STANDINS[name]()
    ar = AutoRoundMLLM(s.model, s.tokenizer, s.processor, dataset=OFFLINE_IMAGE_TEXT, quant_nontext_module=True,
                       template=Template(s.model_type, processor=s.processor_name), **FAST)
    with pytest.raises(ValueError, match="not supported"):
        ar.quantize()


@pytest.mark.parametrize("name", NAMES)
def test_processor_encodes_and_batches(name):
    """The family's processor: 4 offline image-text samples, truncated to seqlen without cutting the image,
    right-padded batches whose rows give the single-sample logits."""
    s = STANDINS[name]()
    samples, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, None, 4, 42)
    short = PROCESSORS[s.processor_name](s.model, s.tokenizer, s.processor, None, Template(name), 24, None)
    enc = short.encode(samples[0])
    assert enc["input_ids"].shape[1] >= 24  # kept through the last image position
    with torch.no_grad():
        assert torch.isfinite(s.model(**enc).logits).all()
    proc = PROCESSORS[s.processor_name](s.model, s.tokenizer, s.processor, None, Template(name), 512, None)
    enc = sorted((proc.encode(x) for x in samples), key=lambda e: e["input_ids"].shape[1])
    batch = proc.collate([enc[0], enc[-1]])
    assert batch["input_ids"].shape == (2, enc[-1]["input_ids"].shape[1])
    with torch.no_grad():
        single = s.model(**enc[0]).logits[0]
        batched = s.model(**batch).logits[0, :single.shape[0]]
    assert torch.allclose(single, batched, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_family_processor_used_without_template(name, monkeypatch):
    """Image-text calibration picks the family's processor when no template names one."""
    s = STANDINS[name]()
    used = []
    for key, cls in list(PROCESSORS.items()):
        monkeypatch.setitem(PROCESSORS, key, lambda *a, _key=key, _cls=cls: used.append(_key) or _cls(*a))
    ar = AutoRoundMLLM(s.model, s.tokenizer, s.processor, dataset=OFFLINE_IMAGE_TEXT, **FAST)
    batches = ar.calibration_batches()
    assert used == [s.processor_name]
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 2 for b in batches)


def test_processor_errors_name_what_is_missing():
    samples, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, None, 1, 42)
    kimi = STANDINS["kimi_vl"]()  # a model without CogVLM's build_conversation_input_ids
    args = (kimi.model, kimi.tokenizer, None, None, None, 48, None)
    with pytest.raises(ValueError, match="build_conversation_input_ids: is trust_remote_code on"):
        PROCESSORS["cogvlm2"](*args).encode(samples[0])
    with pytest.raises(ValueError, match="DeepseekVLV2Processor"):
        PROCESSORS["deepseek_vl_v2"](*args).encode(samples[0])
    with pytest.raises(ValueError, match=r"process\(text=..., images=...\)"):
        PROCESSORS["molmo"](*args).encode(samples[0])
    with pytest.raises(ValueError, match="AutoProcessor"):
        PROCESSORS["phi3_v"](*args).encode(samples[0])
    with pytest.raises(ValueError, match="returned no 'images'"):
        PROCESSORS["chatglm"](*args).encode(samples[0])  # a plain tokenizer renders no image
