"""GGUF K-quants (gguf:q2_k_s ... q6_k): the K grid is what is tuned, and the file holds it bit for bit.

Exactness. A K record keeps the tuned codes, the integer sub-block scales (and mins) and the fp16
``d``/``dmin``; its weight is ``(d*sc)*q - dmin*m`` (or ``(d*sc)*(q - z)``) in float32, in ggml's
order, so ``gguf.quants.dequantize`` (an independent numpy reader) must give the same floats:
the comparisons below are ``torch.equal``. Fallback layers of the ``_0`` types are exact too; the
``q5_1`` fallback carries one fp16 rounding of ``m`` (bound as in test_export_gguf.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from auto_round import AutoRound  # noqa: E402
from auto_round.export import get_format  # noqa: E402
from auto_round.export.gguf import KMIXES  # noqa: E402
from auto_round.export.gguf.kblocks import K_BLOCK_TYPES, pack_k_blocks  # noqa: E402
from auto_round.export.gguf.kmix import tensor_type, use_more_bits  # noqa: E402
from auto_round.quant.kquant import KQUANT_SPECS, kquant_params, kquant_record  # noqa: E402
from auto_round.quant.qdq import QuantParams, qdq_weight  # noqa: E402
from auto_round.tuning.wrapper import TunableLinear  # noqa: E402
from tiny_models import VOCAB, tiny_llama  # noqa: E402  (tiny_llama: hidden 64, every row a fallback)
from tokenizer_fixture import make_tokenizer  # noqa: E402

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
RUN = dict(iters=1, nsamples=2, seqlen=16, batch_size=2, dataset="auto_round:offline_corpus")
T = gguf.GGMLQuantizationType


def llama_256(layers: int = 2, intermediate: int = 512, hidden: int = 256, seed: int = 0):
    """A tiny Llama whose rows are whole super-blocks (hidden 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _gguf_name(layer: str) -> str:
    if layer == "lm_head":
        return "output.weight"
    _, _, idx, rest = layer.split(".", 3)
    return f"blk.{idx}.{HF_TO_GGUF[rest]}.weight"


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute, written out independently of the exporter."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(folder: Path):
    files = sorted(Path(folder).glob("*.gguf"))
    assert len(files) == 1, files
    reader = gguf.GGUFReader(files[0])
    return reader, {t.name: t for t in reader.tensors}, files[0]


def _dequant(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _assert_file_holds(ar: AutoRound, folder: Path) -> dict:
    """Every quantized layer's tensor dequantizes (gguf.quants) to our record; returns {layer: type name}."""
    _, tensors, _ = _read(folder)
    cfg = ar.model.config
    types = {}
    for layer, qw in ar.quantized_layers.items():
        t = tensors[_gguf_name(layer)]
        theirs, ours = _dequant(t), qw.dequantize()
        if layer.endswith(("q_proj", "k_proj")):
            ours = _rope_permute(ours, cfg.num_attention_heads if layer.endswith("q_proj") else cfg.num_key_value_heads)
        if t.tensor_type == T.Q5_1:  # fallback with one fp16 rounding of m = -scale*zero
            assert (theirs - ours).abs().max() <= 2.0**-11 * float((qw.scale.float() * qw.zero).abs().max()) + 1e-6
        else:
            assert torch.equal(theirs, ours), (layer, t.tensor_type.name)
        types[layer] = t.tensor_type.name.lower()
    return types


# ---------------------------------------------------------------------------------- pure math
def test_k_numbers_match_the_gguf_package():
    for name, kb in K_BLOCK_TYPES.items():
        assert T[name.upper()] == kb.ggml_type
        assert gguf.GGML_QUANT_SIZES[T[name.upper()]] == (256, kb.type_size)
    for name, mix in KMIXES.items():
        assert gguf.LlamaFileType[f"MOSTLY_{name.upper()}"] == mix.file_type


@pytest.mark.parametrize("ktype", list(KQUANT_SPECS))
def test_k_blocks_read_back_bit_exact(ktype):
    """Codes, sub-block scales/mins and d/dmin packed by us, unpacked by gguf.quants: the same floats as
    our record and as the qdq the tuner runs, with offsets V and clip factors away from their start."""
    torch.manual_seed(1)
    w = torch.randn(6, 512) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block: d stays positive, the grid defined
    w[1, 256:] *= 1e-4  # a super-block of tiny weights
    p = kquant_params(ktype)
    v = (torch.rand(6, 512) - 0.5) * 0.8
    a, b = torch.rand(6, 512 // p.group_size) * 0.4 + 0.6, torch.rand(6, 512 // p.group_size) * 0.4 + 0.6
    qw = kquant_record(w, p, v, a, b)
    theirs = torch.from_numpy(gguf.quants.dequantize(pack_k_blocks(qw), T[ktype.upper()]))
    assert torch.equal(theirs, qw.dequantize())
    assert torch.equal(qdq_weight(w, p, v, a, b), qw.dequantize())
    spec = KQUANT_SPECS[ktype]
    sc = qw.kquant["sc"]
    assert int(sc.min()) >= spec.sc_min and int(sc.max()) <= spec.sc_max
    assert int(qw.codes.max()) <= 2**spec.bits - 1
    assert qw.kquant["d"].dtype == torch.float16 and (qw.kquant["d"] > 0).all()
    # the tuned sub-block scales are on the grid: scale == d * sc exactly
    d = qw.kquant["d"].float().repeat_interleave(256 // spec.sub, dim=1)
    assert torch.equal(qw.scale, d * sc.float())
    rel = ((qw.dequantize() - w)[2:].pow(2).mean() / w[2:].pow(2).mean()).sqrt()
    assert rel < {2: 0.9, 3: 0.6, 4: 0.35, 5: 0.3, 6: 0.3}[spec.bits]  # offsets V of +-0.4 step included


@pytest.mark.parametrize("ktype", ["q4_k", "q6_k"])
def test_rtn_error_close_to_the_plain_grid(ktype):
    """Double-quantizing the scales costs little: within 15% of the same bits' plain grid at the sub size."""
    torch.manual_seed(2)
    w = torch.randn(64, 1024) * 0.02
    p = kquant_params(ktype)
    plain = QuantParams(bits=p.bits, group_size=p.group_size, scheme="asym" if not p.sym else "sym")
    err_k = (qdq_weight(w, p) - w).pow(2).mean()
    err_plain = (qdq_weight(w, plain) - w).pow(2).mean()
    assert err_k < 1.15 * err_plain


@pytest.mark.parametrize("ktype", ["q4_k", "q3_k"])
def test_k_grid_gets_gradients(ktype):
    """The tuner's forward runs the K grid: rounding offsets and both clip factors receive gradients,
    and the forward equals the record finalize() writes."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(256, 8, bias=False)
    tl = TunableLinear(lin, kquant_params(ktype), minmax=True, dtype=torch.float32)
    with torch.no_grad():
        tl.alpha.mul_(0.9)
        tl.beta.mul_(0.95)
    x = torch.randn(4, 256)
    tl(x).pow(2).sum().backward()
    for p in (tl.v, tl.alpha, tl.beta):
        assert p.grad is not None and p.grad.abs().sum() > 0
    w = tl.qdq().detach().clone()
    qw = tl.finalize()
    assert qw.kquant is not None and torch.equal(qw.dequantize(), w)


def test_mix_rules_are_llama_cpps():
    n = 32  # use_more_bits by hand: first/last eighth and every third in between
    assert [i for i in range(n) if use_more_bits(i, n)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]

    def types(mix, tensor):
        return [tensor_type(KMIXES[mix], f"blk.{i}.{tensor}.weight", i, n, 2, False)[0] for i in range(n)]

    more = ["q6_k" if use_more_bits(i, n) else "q4_k" for i in range(n)]
    assert types("q4_k_m", "attn_v") == more and types("q4_k_m", "ffn_down") == more
    assert types("q4_k_m", "attn_q") == ["q4_k"] * n
    assert types("q4_k_s", "attn_v") == ["q5_k"] * 4 + ["q4_k"] * 28
    assert types("q4_k_s", "ffn_down") == ["q5_k"] * 4 + ["q4_k"] * 28
    assert types("q3_k_m", "attn_v") == ["q5_k"] * 2 + ["q4_k"] * 30
    assert types("q3_k_m", "ffn_down") == ["q5_k"] * 2 + ["q4_k"] * 30
    assert types("q3_k_m", "attn_output") == ["q4_k"] * n and types("q3_k_m", "ffn_up") == ["q3_k"] * n
    assert types("q2_k_s", "ffn_down") == ["q4_k"] * 4 + ["q2_k"] * 28
    assert types("q2_k_s", "attn_v") == ["q2_k"] * n  # n_gqa 2
    assert tensor_type(KMIXES["q2_k_s"], "blk.0.attn_v.weight", 0, n, 4, False)[0] == "q4_k"
    assert types("q5_k_s", "ffn_down") == ["q5_k"] * n
    assert tensor_type(KMIXES["q4_k_s"], "blk.9.attn_v.weight", 9, 80, 8, True)[0] == "q5_k"  # 70B attn_v
    for mix in KMIXES:
        assert tensor_type(KMIXES[mix], "output.weight", None, n, 2, False)[0] == "q6_k"


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("mix", ["q2_k_s", "q3_k_m", "q4_k_s", "q5_k_s", "q5_k_m", "q6_k"])
def test_every_k_mix_round_trips(tmp_path, mix):
    ar = AutoRound(llama_256(), make_tokenizer(), **RUN)
    ar.quantize_and_save(tmp_path, format=f"gguf:{mix}", inplace=False)
    types = _assert_file_holds(ar, tmp_path)
    want = {name: tensor_type(KMIXES[mix], _gguf_name(name), int(name.split(".")[2]), 2, 2, False)[0]
            for name in ar.quantized_layers}
    assert types == want
    reader, _, path = _read(tmp_path)
    assert path.name == f"model-{mix.upper()}.gguf"
    assert reader.fields["general.file_type"].contents() == KMIXES[mix].file_type


def test_k_grid_tunes_without_minmax_tuning(tmp_path):
    """With ``enable_minmax_tuning=False`` there are no clip factors to start from the K search: the K layers
    tune their rounding from the full range (this raised in init_clip once the search became the K start)."""
    ar = AutoRound(llama_256(), make_tokenizer(), enable_minmax_tuning=False, **{**RUN, "iters": 2})
    ar.quantize_and_save(tmp_path, format="gguf:q4_k_m", inplace=False)
    _assert_file_holds(ar, tmp_path)


def test_tuned_q4_k_m_with_quantized_lm_head(tmp_path):
    """iters > 0: the tuned K grid is what the file holds; attn_v/ffn_down of the last block and the
    output get q6_k as llama.cpp's q4_k_m gives them; transformers' GGUF reader rebuilds the model."""
    from transformers import AutoModelForCausalLM

    ar = AutoRound(llama_256(), make_tokenizer(), quant_lm_head=True, **{**RUN, "iters": 3, "nsamples": 4})
    ar.quantize_and_save(tmp_path, format="gguf:q4_k_m", inplace=False)
    assert all(qw.kquant is not None for qw in ar.quantized_layers.values())
    types = _assert_file_holds(ar, tmp_path)
    six = {n for n, t in types.items() if t == "q6_k"}
    assert six == {"model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "lm_head"}
    assert set(types.values()) == {"q4_k", "q6_k"}
    qconfig = json.loads((tmp_path / "quantization_config.json").read_text())
    assert qconfig["gguf_type"] == "q4_k_m" and qconfig["gguf_tensor_types"] == {"q4_k": 12, "q6_k": 3}
    assert any("gguf:q4_k_m q6_k" in line for line in ar.summary["plan"])
    _, _, path = _read(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([make_tokenizer().encode("The quick brown fox jumps.")])
    emb = ar.model.model.embed_tokens.weight
    with torch.no_grad():
        emb.copy_(emb.half().float())  # the file keeps the embeddings in F16
        ref, got = ar.model(x).logits, loaded(x).logits
    assert (ref - got).abs().max() < 1e-4


def test_fallback_is_decided_in_the_plan_and_listed(tmp_path):
    """Rows that are not whole super-blocks take llama.cpp's fallback type (q4_k -> q5_0, q6_k -> q8_0),
    tuned as that type; a row not a multiple of 32 stays F16 with the reason."""
    ar = AutoRound(llama_256(hidden=64, intermediate=80), make_tokenizer(), **RUN)  # hidden 64, down_proj in 80
    ar.quantize_and_save(tmp_path, format="gguf:q4_k_m", inplace=False)
    plan = "\n".join(ar.summary["plan"])
    assert "fallback q4_k -> q5_0: row length 64 is not a multiple of 256" in plan
    assert "fallback q6_k -> q8_0: row length 64 is not a multiple of 256" in plan  # blk.1 attn_v
    assert "row length 80 is not a multiple of 32: F16" in plan
    assert ar.summary["kept_fp"]["model.layers.0.mlp.down_proj"].endswith("row length 80 is not a multiple of 32: F16")
    types = _assert_file_holds(ar, tmp_path)
    assert types["model.layers.1.self_attn.v_proj"] == "q8_0" and types["model.layers.0.self_attn.q_proj"] == "q5_0"
    _, tensors, _ = _read(tmp_path)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.F16
    ar2 = AutoRound(tiny_llama(), make_tokenizer(), **RUN)
    ar2.quantize_and_save(tmp_path / "q5", format="gguf:q5_k_m", inplace=False)
    assert set(_assert_file_holds(ar2, tmp_path / "q5").values()) == {"q5_1", "q8_0"}  # q5_k -> q5_1


def test_one_run_fake_and_gguf_k(tmp_path):
    """Several formats from one tuning run: 'fake' stores the K layers' weights exactly; integer-zero
    formats are refused before tuning, naming the layers and what to do."""
    from safetensors.torch import load_file

    ar = AutoRound(llama_256(), make_tokenizer(), **RUN)
    written = ar.quantize_and_save(tmp_path, format="fake,gguf:q4_k_m", inplace=False)
    assert [p.name for p in written] == ["fake", "gguf-q4_k_m"]
    _assert_file_holds(ar, tmp_path / "gguf-q4_k_m")
    state = load_file(str(tmp_path / "fake" / "model.safetensors"))
    for layer, qw in ar.quantized_layers.items():
        assert torch.equal(state[f"{layer}.weight"].float(), qw.dequantize()), layer
    refused = AutoRound(llama_256(), make_tokenizer(), **RUN)
    with pytest.raises(ValueError, match=r"(?s)q_proj.*'auto_round' stores one scale and an integer zero point "
                                         r"per group, not a GGUF K-quant layer.*only gguf:\*_k and 'fake' store"):
        refused.quantize_and_save(tmp_path / "x", format="auto_round,gguf:q4_k_m")
    assert refused.quantized_layers == {}


def test_k_mix_refusals(tmp_path):
    ar = AutoRound(llama_256(), make_tokenizer(), layer_config={"v_proj": {"bits": 8}}, **RUN)
    with pytest.raises(ValueError, match=r"layer_config\['v_proj'\].*export format decides each layer's scheme"):
        ar.quantize(format="gguf:q4_k_m")
    with pytest.raises(ValueError, match=r"choose different schemes"):
        AutoRound(llama_256(), make_tokenizer(), **RUN).quantize(format="gguf:q4_k_m,gguf:q4_k_s")
    plain = AutoRound(llama_256(), make_tokenizer(), bits=4, group_size=128, **{**RUN, "iters": 0})
    plain.quantize()  # tuned without the format: W4G128, not the K grid
    with pytest.raises(ValueError, match=r"tune with format='gguf:q4_k_m'"):
        plain.save_quantized(tmp_path, format="gguf:q4_k_m", inplace=False)
    why = get_format("gguf:q4_k_m").check_params("w", 8, 320, kquant_params("q4_k"))
    assert "in_features=320 is not a multiple of 256" in why


def test_resume_keeps_the_k_blocks(tmp_path):
    from auto_round.tuning.resume import ResumeStore

    qw = kquant_record(torch.randn(4, 256), kquant_params("q4_k"))
    store = ResumeStore(tmp_path, {"x": 1})
    store.save_unit(0, "model.layers.0", {"a": qw}, {}, torch.zeros(1))
    back = store.load_unit(0, "model.layers.0")[0]["a"]
    assert back.kquant is not None and torch.equal(back.dequantize(), qw.dequantize())
