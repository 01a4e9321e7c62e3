"""The demo LLaVA (``demo.model``) saves the tensor names of the hub's LLaVA checkpoints."""

import pytest
import torch
from safetensors import safe_open

from auto_round import AutoRoundMLLM
from demo.model import build_llava_with_lm


def _vision_names(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return [k for k in fh.keys() if k.startswith("vision_tower.")]


def test_built_llava_saves_nested_clip_names_and_reloads(model_dir, tmp_path):
    """A model built from a config loses CLIP's ``vision_model.`` level on save in transformers 5 (vLLM refuses
    ``vision_tower.embeddings``); the demo records the hub mapping, so FP and quantized folders carry it."""
    from transformers import LlavaForConditionalGeneration

    model, tok, proc = build_llava_with_lm(model_dir, vision_hidden=32, vision_layers=1)
    model.save_pretrained(tmp_path / "fp")
    names = _vision_names(tmp_path / "fp")
    assert names and all(k.startswith("vision_tower.vision_model.") for k in names), names[:4]
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fp")
    want = model.state_dict()
    got = back.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

    ar = AutoRoundMLLM(model, tok, proc, bits=4, group_size=32, iters=0, disable_opt_rtn=True)
    ar.quantize()
    ar.save_quantized(tmp_path / "q", format="auto_round")
    qnames = _vision_names(tmp_path / "q")
    assert qnames and all(k.startswith("vision_tower.vision_model.") for k in qnames), qnames[:4]
    # and our loader reads the nested names back into the same model (vision tower included)
    from auto_round.inference import load_quantized

    loaded = load_quantized(str(tmp_path / "q"), backend="torch", dtype=torch.float32)
    inputs = proc(text="<image> describe", images=torch.rand(3, 64, 64), return_tensors="pt")
    with torch.no_grad():
        want_logits = ar.model(**inputs).logits
        got_logits = loaded(**inputs).logits
    assert torch.allclose(got_logits, want_logits, atol=1e-4), (got_logits - want_logits).abs().max()


def test_mllm_dataset_of_another_type_is_a_clear_error(model_dir):
    """A list of texts (the reference takes one) is refused with the fix, not an AttributeError."""
    model, tok, proc = build_llava_with_lm(model_dir, vision_hidden=32, vision_layers=1)
    with pytest.raises(TypeError, match=r"dataset=\['a text'\] \(list\) must be a string.*\.txt or \.jsonl"):
        AutoRoundMLLM(model, tok, proc, iters=0, dataset=["a text"])
