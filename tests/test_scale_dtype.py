"""``scale_dtype`` is honoured: the scales are stored in that dtype, recorded, and reloaded in it."""

import json

import pytest
import torch
from safetensors import safe_open

from auto_round import AutoRound
from auto_round.inference import load_quantized
from auto_round.inference.convert_model import scale_storage_dtype
from auto_round.inference.qlinear import QuantLinear
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, group_size=32, iters=3, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_scales_stored_and_reloaded_in_the_requested_dtype(name, tmp_path):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[name]
    tok = make_tokenizer()
    ar = AutoRound(tiny_llama(), tok, scale_dtype=name, **FAST)
    out = ar.quantize_and_save(tmp_path / "q", format="auto_round", inplace=False)[0]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scale_dtype"] == name
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scale_keys = [k for k in f.keys() if k.endswith(".scales")]
        assert len(scale_keys) == 14
        for key in scale_keys:
            stored = f.get_tensor(key)
            assert stored.dtype == dtype, key
            # exactly the tuned scales, not a second rounding through fp16
            assert torch.equal(stored, ar.quantized_layers[key[: -len(".scales")]].scale.t()), key
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ar.model(ids).logits
    for reloaded in (AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32),
                     load_quantized(str(out), backend="torch", dtype=torch.float32)):
        layers = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 14 and {m.scales.dtype for m in layers} == {dtype}
        with torch.no_grad():
            assert torch.allclose(reloaded(ids).logits, ref, atol=1e-3, rtol=1e-3)


def test_bf16_scales_differ_from_fp16_scales():
    """The setting reaches the tuning: bf16 scales are not fp16 scales relabelled."""
    a = AutoRound(tiny_llama(), make_tokenizer(), scale_dtype="fp16", **{**FAST, "iters": 0}).quantize()
    b = AutoRound(tiny_llama(), make_tokenizer(), scale_dtype="bf16", **{**FAST, "iters": 0}).quantize()
    name = "model.layers.0.self_attn.q_proj"
    sa, sb = a.quantized_layers[name].scale, b.quantized_layers[name].scale
    assert sa.dtype == torch.float16 and sb.dtype == torch.bfloat16
    assert not torch.equal(sa.float(), sb.float())


@pytest.mark.parametrize("name", ["bf16", "fp32"])
def test_auto_gptq_refuses_non_fp16_scales_before_tuning(name):
    ar = AutoRound(tiny_llama(), make_tokenizer(), scale_dtype=name, **FAST)
    with pytest.raises(ValueError, match="fp16 scales.*scale_dtype='fp16'"):
        ar.quantize(format="auto_gptq")
    assert not ar.quantized_layers


@pytest.mark.parametrize("raw,dtype", [(None, torch.float16), ("fp16", torch.float16), ("torch.float16", torch.float16),
                                       ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                       ("float32", torch.float32), ("torch.float32", torch.float32)])
def test_loader_reads_every_spelling(raw, dtype):
    assert scale_storage_dtype({} if raw is None else {"scale_dtype": raw}) is dtype


@pytest.mark.parametrize("raw", ["int8", "torch.float8_e4m3fn", "half-ish"])
def test_loader_refuses_unknown_scale_dtype(raw):
    with pytest.raises(ValueError, match="scale_dtype"):
        scale_storage_dtype({"scale_dtype": raw})
