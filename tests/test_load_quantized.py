"""``auto_round.inference.load_quantized`` loads causal LMs and VLMs alike, with the matching auto class."""

import pytest
import torch

from auto_round import AutoRound, AutoRoundMLLM
from auto_round.inference import load_quantized
from auto_round.inference.qlinear import QuantLinear
from tiny_models import tiny_llama
from tiny_vlms import FAMILIES, make_image, skip_on_upstream_break
from tokenizer_fixture import make_tokenizer

RTN = dict(bits=4, group_size=32, iters=0, disable_opt_rtn=True)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava", "gemma3"])
def test_vlm_folder_loads_and_matches(name, tmp_path):
    skip_on_upstream_break(name)
    vlm = FAMILIES[name]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RTN)
    out = ar.quantize_and_save(tmp_path / "q", inplace=False)[0]
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        ref = ar.model(**inputs).logits
    loaded = load_quantized(str(out), backend="torch", dtype=ar.model.dtype)
    assert type(loaded) is type(vlm.model)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(ar.quantized_layers)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, ref, atol=2e-3, rtol=1e-3)


def test_causal_lm_still_loads_as_causal_lm(tmp_path):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **RTN)
    out = ar.quantize_and_save(tmp_path / "q", inplace=False)[0]
    assert type(load_quantized(str(out))).__name__ == "LlamaForCausalLM"


def test_folder_no_auto_class_can_build_is_refused_by_name(tmp_path):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="CLIPVisionConfig.*neither AutoModelForCausalLM nor AutoModelForImageTextToText"):
        load_quantized(str(tmp_path))
