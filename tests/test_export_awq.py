"""AWQ layouts: the auto_awq format, asym auto_round as ``auto_round:auto_awq`` (as the reference writes it),
and reading such files back. The packing is checked against an independent unpacker written from AutoAWQ's
documented word order (column j of every 8 sits at bit shift 4 * (0, 4, 1, 5, 2, 6, 3, 7)[j])."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_round import AutoRound, AutoRoundMLLM
from auto_round.inference import load_quantized
from tiny_models import tiny_llama
from tiny_vlms import FAMILIES, make_image
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")
SHIFTS = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]) * 4


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> int [rows, cols] (independent of auto_round's packer)."""
    nib = (packed.to(torch.int64).unsqueeze(-1) >> SHIFTS) & 0xF  # nib[..., j] = column j of the 8
    return nib.reshape(packed.shape[0], -1)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    words = (v << SHIFTS).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _ids(tok):
    return tok("the quick brown fox jumps", return_tensors="pt").input_ids


def _check_layers(out, ar):
    state = load_file(str(out / "model.safetensors"))
    for name, qw in ar.quantized_layers.items():
        assert state[f"{name}.qweight"].shape == (qw.in_features, qw.out_features // 8)
        assert torch.equal(awq_unpack(state[f"{name}.qweight"]), qw.codes.t().to(torch.int64)), name
        assert torch.equal(awq_unpack(state[f"{name}.qzeros"]), qw.zero.t().to(torch.int64)), name  # raw zeros
        assert state[f"{name}.scales"].dtype == torch.float16


def _reload_matches(out, ar, tok, plain=True):
    """Our loader, and (for quant_method auto-round) plain from_pretrained; plain from_pretrained of an AWQ
    checkpoint needs gptqmodel, which is not installed here."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = ar.model(_ids(tok)).logits
        loaders = [lambda: load_quantized(str(out), dtype=torch.float32)]
        if plain:
            loaders.append(lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
        for load in loaders:
            model = load()
            assert torch.allclose(model(_ids(tok)).logits, ref, atol=1e-3, rtol=1e-3)


def test_asym_auto_round_is_written_in_the_awq_packing_engines_read(tmp_path):
    tok = make_tokenizer()
    ar = AutoRound(tiny_llama(), tok, **{**FAST, "sym": False})
    out = ar.quantize_and_save(tmp_path / "q", format="auto_round", inplace=False)[0]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["packing_format"] == "auto_round:auto_awq" and cfg["sym"] is False
    _check_layers(out, ar)
    _reload_matches(out, ar, tok)


def test_asym_8_bit_stays_raw_packing(tmp_path):
    tok = make_tokenizer()
    ar = AutoRound(tiny_llama(), tok, **{**FAST, "sym": False, "bits": 8})
    out = ar.quantize_and_save(tmp_path / "q", format="auto_round", inplace=False)[0]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["packing_format"] == "auto_round"
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(_ids(tok)).logits
        assert torch.allclose(got, ar.model(_ids(tok)).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sym", [True, False])
def test_auto_awq_export(sym, tmp_path):
    from transformers import AwqConfig

    tok = make_tokenizer()
    ar = AutoRound(tiny_llama(), tok, **{**FAST, "sym": sym})
    out = ar.quantize_and_save(tmp_path / "q", format="auto_awq", inplace=False)[0]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == \
        {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": not sym}
    assert cfg["modules_to_not_convert"] == ["lm_head"] and "dataset" not in cfg
    assert AwqConfig.from_dict(cfg).bits == 4
    _check_layers(out, ar)
    _reload_matches(out, ar, tok, plain=False)


@pytest.mark.parametrize("kw,match", [({"bits": 3}, "stores bits \\(4,\\)"),
                                      ({"scale_dtype": "bf16"}, "fp16 scales"),
                                      ({"layer_config": {"down_proj": {"group_size": 64}}}, "one group_size")])
def test_auto_awq_refuses_what_it_cannot_store_before_tuning(kw, match):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, **kw})
    with pytest.raises(ValueError, match=match):
        ar.quantize(format="auto_awq")
    assert not ar.quantized_layers


def test_vlm_auto_awq_keeps_the_vision_tower_out(tmp_path):
    vlm = FAMILIES["llava"]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **{**FAST, "iters": 0})
    out = ar.quantize_and_save(tmp_path / "q", format="auto_awq", inplace=False)[0]
    not_converted = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    vision = [n for n, m in vlm.model.named_modules() if isinstance(m, torch.nn.Linear) and "vision_tower" in n]
    assert vision and set(vision) <= set(not_converted)
    # AWQ readers match these entries as substrings of their own module names, and vLLM's LLaVA names the
    # tower differently (vision_tower.vision_model.encoder...): a whole FP sub-tree is listed by its own name too
    renamed = [n.replace("model.vision_tower.", "vision_tower.vision_model.") for n in vision]
    assert all(any(entry in name for entry in not_converted) for name in renamed)
    assert not [q for q in ar.quantized_layers if any(entry in q for entry in not_converted)]
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        ref = ar.model(**inputs).logits
        got = load_quantized(str(out), dtype=ar.model.dtype)(**inputs).logits
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3)


def test_reads_a_reference_style_auto_awq_checkpoint(tmp_path):
    """A folder laid out as auto-round 0.16.1 writes 4-bit asym auto_round (packing auto_round:auto_awq),
    packed here by the independent packer, loads and computes the dequantized weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model, tok = tiny_llama(), make_tokenizer()
    gs, state = 32, {}
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        out_f, in_f = lin.weight.shape
        codes = torch.randint(0, 16, (in_f, out_f))
        zeros = torch.randint(0, 16, (in_f // gs, out_f))
        scales = (torch.rand(in_f // gs, out_f) * 0.02 + 0.001).half()
        state.update({f"{name}.qweight": awq_pack(codes), f"{name}.qzeros": awq_pack(zeros), f"{name}.scales": scales})
        w = (codes - zeros.repeat_interleave(gs, 0)).float() * scales.float().repeat_interleave(gs, 0)
        lin.weight.data = w.t().contiguous()
    expected = model
    for key, value in expected.state_dict().items():
        if not any(key.startswith(n.rsplit(".qweight", 1)[0] + ".weight") for n in state if n.endswith(".qweight")):
            state[key] = value.contiguous()
    (tmp_path / "ref").mkdir()
    save_file(state, str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    config = expected.config.to_dict()
    config["quantization_config"] = {"quant_method": "auto-round", "packing_format": "auto_round:auto_awq", "bits": 4,
                                     "group_size": gs, "sym": False, "data_type": "int",
                                     "block_name_to_quantize": "model.layers", "autoround_version": "0.16.1"}
    (tmp_path / "ref" / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded(_ids(tok)).logits, expected(_ids(tok)).logits, atol=1e-4, rtol=1e-4)
