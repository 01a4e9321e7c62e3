"""GGUF export: blocks written from the tuned integers, metadata, tokenizer, refusals before tuning.

Tolerances. q4_0 / q5_0 / q8_0 store ``d`` = the tuned fp16 scale and the codes unchanged, so ggml's
``d * (q - z)`` equals our ``scale * (code - zero)`` bit for bit (both exact in fp32). The ``_1``
types store ``m = fp16(-scale * zero)``: ``scale * zero`` is exact in fp32 (11-bit significand times
a zero below 32), so ``m`` carries one fp16 rounding, at most half an ulp: ``2^-11 * |scale*zero|``
(``2^-25`` below fp16's normal range). ggml's ``d*q + m`` then rounds once more in fp32
(``2^-24`` relative). That bound is what the ``_1`` comparisons allow, per element.
"""

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from auto_round import AutoRound  # noqa: E402
from auto_round.export import get_format  # noqa: E402
from auto_round.export.gguf import BLOCK_TYPES  # noqa: E402
from auto_round.export.gguf.arch import extra_tensors  # noqa: E402
from auto_round.export.gguf.blocks import asym_offset, pack_blocks  # noqa: E402
from auto_round.export.gguf.vocab import build_vocab  # noqa: E402
from auto_round.quant.qdq import QuantParams, quantize_weight  # noqa: E402
from auto_round.quant.types import QuantizedWeight  # noqa: E402
from tiny_models import tiny_llama, tiny_opt, tiny_qwen2  # noqa: E402
from tokenizer_fixture import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

TYPES = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False), "q8_0": (8, True)}
FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2}
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
RUN = dict(group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


def _gguf_name(layer: str) -> str:
    if layer == "lm_head":
        return "output.weight"
    _, _, idx, rest = layer.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{idx}.{HF_TO_GGUF[rest]}.weight"


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute, written out independently of the exporter."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(folder: Path):
    files = sorted(Path(folder).glob("*.gguf"))
    assert len(files) == 1, files
    return gguf.GGUFReader(files[0]), files[0]


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def _dequant(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _m_tolerance(qw: QuantizedWeight) -> torch.Tensor:
    """Per-element bound for the *_1 types (module docstring)."""
    idx = torch.arange(qw.in_features) // qw.group_size
    sz = (qw.scale.float() * qw.zero.float()).abs()[:, idx]
    s = qw.scale.float().abs()[:, idx]
    return torch.clamp(sz * 2.0**-11, min=2.0**-25) + 2.0**-23 * (s * (2**qw.bits - 1) + sz)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(family, type) -> (AutoRound, folder); each quantized and exported once per module."""
    cache = {}

    def get(family: str, qtype: str):
        if (family, qtype) not in cache:
            bits, sym = TYPES[qtype]
            ar = AutoRound(FACTORIES[family](), make_tokenizer(), bits=bits, sym=sym, **RUN)
            folder = tmp_path_factory.mktemp(f"{family}-{qtype}")
            ar.quantize_and_save(folder, format=f"gguf:{qtype}", inplace=False, overwrite=True)
            cache[family, qtype] = (ar, folder)
        return cache[family, qtype]

    return get


# ---------------------------------------------------------------------------------- pure blocks
def test_block_type_numbers_match_the_gguf_package():
    for name, bt in BLOCK_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name.upper()]
        assert bt.ggml_type == int(qtype)
        assert gguf.GGML_QUANT_SIZES[qtype] == (32, bt.type_size)
        assert bt.file_type == int(gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])


def test_q4_0_nibble_layout_by_hand():
    codes = torch.full((1, 32), 8, dtype=torch.uint8)
    codes[0, 0], codes[0, 16], codes[0, 15], codes[0, 31] = 1, 2, 15, 0
    qw = QuantizedWeight(codes, torch.tensor([[0.5]], dtype=torch.float16), torch.full((1, 1), 8, dtype=torch.int32),
                         4, 32, True)
    raw = pack_blocks(qw, BLOCK_TYPES["q4_0"])[0]
    assert raw.shape == (18,)
    assert raw[:2].view("<f2")[0] == 0.5
    assert raw[2] == 0x21 and raw[2 + 15] == 0x0F and raw[3] == 0x88  # element j low, j + 16 high


@pytest.mark.parametrize("qtype,scheme", [(t, s) for t, (_, sym) in TYPES.items()
                                          for s in (("sym", "sym_gptq") if sym else ("asym",))])
def test_blocks_dequantize_to_our_weights(qtype, scheme):
    bits, sym = TYPES[qtype]
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3, 40:72] = 0.0  # an all-zero group
    codes, scale, zero = quantize_weight(w, QuantParams(bits=bits, group_size=32, scheme=scheme))
    qw = QuantizedWeight(codes, scale, zero, bits, 32, sym)
    bt = BLOCK_TYPES[qtype]
    raw = pack_blocks(qw, bt)
    assert raw.shape == (48, 3 * bt.type_size)
    ours = qw.dequantize()
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype.upper()]))
    if sym:
        assert torch.equal(theirs, ours)
    else:
        assert ((theirs - ours).abs() <= _m_tolerance(qw)).all()
        m = torch.from_numpy(raw.reshape(48, 3, bt.type_size)[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32))
        assert torch.equal(m, asym_offset(qw).float())


def test_pack_refuses_what_it_cannot_store():
    codes, scale, zero = quantize_weight(torch.randn(4, 64), QuantParams(bits=4, group_size=32, scheme="asym"))
    with pytest.raises(ValueError, match="sym=False"):
        pack_blocks(QuantizedWeight(codes, scale, zero, 4, 32, False), BLOCK_TYPES["q4_0"])
    with pytest.raises(ValueError, match="fp16"):
        pack_blocks(QuantizedWeight(codes, scale.float(), zero, 4, 32, False), BLOCK_TYPES["q4_1"])


# ---------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("family", list(FACTORIES))
@pytest.mark.parametrize("qtype", list(TYPES))
def test_every_quantized_tensor_is_ours(exports, family, qtype):
    ar, folder = exports(family, qtype)
    reader, path = _reader(folder)
    assert path.name == f"model-{qtype.upper()}.gguf"
    tensors = _tensors(reader)
    cfg = ar.model.config
    assert len(ar.quantized_layers) == 14
    for layer, qw in ar.quantized_layers.items():
        t = tensors[_gguf_name(layer)]
        assert t.tensor_type == gguf.GGMLQuantizationType[qtype.upper()], layer
        theirs, ours = _dequant(t), qw.dequantize()
        if family == "llama" and layer.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if layer.endswith("q_proj") else cfg.num_key_value_heads
            ours = _rope_permute(ours, heads)
        if TYPES[qtype][1]:
            assert torch.equal(theirs, ours), layer
        else:
            tol = _m_tolerance(qw)
            if family == "llama" and layer.endswith(("q_proj", "k_proj")):
                tol = _rope_permute(tol, heads)
            assert ((theirs - ours).abs() <= tol).all(), layer
    # Everything else is F16 (matrices) or F32 (norms, biases); tied qwen2 has no output.weight.
    quantized = {_gguf_name(n) for n in ar.quantized_layers}
    for name, t in tensors.items():
        if name not in quantized:
            want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16
            assert t.tensor_type == want, name
    assert ("output.weight" in tensors) == (family == "llama")
    emb = ar.model.get_input_embeddings().weight.detach()
    assert torch.equal(torch.from_numpy(np.array(tensors["token_embd.weight"].data)).float(), emb.half().float())
    assert _field(reader, "general.file_type") == BLOCK_TYPES[qtype].file_type
    qconfig = json.loads((folder / "quantization_config.json").read_text())
    assert qconfig["gguf_type"] == qtype and qconfig["bits"] == TYPES[qtype][0]
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()


def test_metadata_and_tokenizer(exports):
    ar, folder = exports("llama", "q4_0")
    reader, _ = _reader(folder)
    tok = make_tokenizer()
    expect = {
        "general.architecture": "llama", "llama.context_length": 512, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 512,
        "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.unknown_token_id": tok.unk_token_id, "tokenizer.ggml.padding_token_id": tok.pad_token_id,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(ar.model.config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(ar.model.config.rms_norm_eps)
    vocab = tok.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and all(vocab[t] == i for i, t in enumerate(tokens))
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [3, 3, 3, 3] and set(types[4:]) == {1}  # special tokens CONTROL, rest NORMAL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert json.loads(_field(reader, "auto_round.quantization_config"))["gguf_type"] == "q4_0"


def _fp16_rounded(model):
    """``model`` with every parameter the file keeps as F16 rounded through fp16."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1 and not name.startswith("model.layers."):
                p.copy_(p.half().float())
    return m


@pytest.mark.parametrize("family,qtype", [("llama", "q4_0"), ("qwen2", "q4_1")])
def test_transformers_gguf_loader_reproduces_the_model(exports, family, qtype):
    """transformers' own GGUF reader (its own q/k un-permutation, config and tokenizer conversion)
    rebuilds our quantized model from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ar, folder = exports(family, qtype)
    _, path = _reader(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    text = "The quick brown fox, 12345 times.\n  Done!"
    ids = make_tokenizer().encode(text)
    assert tok.encode(text) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref, got = _fp16_rounded(ar.model)(x).logits, loaded(x).logits
    # Weights are equal (q*_1 within fp16 rounding of m, ~1e-4 of a weight); what is left is fp32
    # summation order.
    assert (ref - got).abs().max() < (2e-3 if qtype.endswith("_1") else 2e-5)


def test_multi_format_writes_both_folders(tmp_path):
    ar = AutoRound(tiny_llama(), make_tokenizer(), bits=4, sym=True, **RUN)
    written = ar.quantize_and_save(tmp_path / "out", format="auto_round,gguf:q4_0", inplace=False)
    assert [p.name for p in written] == ["auto_round", "gguf-q4_0"]
    assert (tmp_path / "out" / "auto_round" / "model.safetensors").is_file()
    reader, _ = _reader(tmp_path / "out" / "gguf-q4_0")
    assert _field(reader, "general.architecture") == "llama"


def test_fp_layer_and_quantized_lm_head(tmp_path):
    ar = AutoRound(tiny_llama(), make_tokenizer(), bits=8, sym=True, quant_lm_head=True,
                   fp_layers="model.layers.1.mlp.down_proj", **{**RUN, "iters": 0})
    ar.quantize_and_save(tmp_path, format="gguf:q8_0", inplace=False)
    tensors = _tensors(_reader(tmp_path)[0])
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert torch.equal(_dequant(tensors["output.weight"]), ar.quantized_layers["lm_head"].dequantize())
    fp = tensors["blk.1.ffn_down.weight"]
    assert fp.tensor_type == gguf.GGMLQuantizationType.F16
    w = ar.model.get_submodule("model.layers.1.mlp.down_proj").weight.detach()
    assert torch.equal(torch.from_numpy(np.array(fp.data)).float(), w.half().float())


def test_mistral_is_written_as_llama_with_permuted_rows(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, sliding_window=None)).eval()
    ar = AutoRound(model, make_tokenizer(), bits=4, sym=True, **{**RUN, "iters": 0})
    ar.quantize_and_save(tmp_path, format="gguf:q4_0", inplace=False)
    reader, path = _reader(tmp_path)
    assert _field(reader, "general.architecture") == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([make_tokenizer().encode("a mistral in the valley")])
    with torch.no_grad():
        assert (_fp16_rounded(ar.model)(x).logits - loaded(x).logits).abs().max() < 2e-5


# ---------------------------------------------------------------------------------- refusals
def _refused(model, match, tokenizer="default", fmt="gguf:q4_0", **kw):
    tok = make_tokenizer() if tokenizer == "default" else tokenizer
    ar = AutoRound(model, tok, **{**RUN, "bits": 4, "sym": True, **kw})
    with pytest.raises(ValueError, match=match):
        ar.quantize(format=fmt)
    assert ar.quantized_layers == {}  # refused before any tuning


@pytest.mark.parametrize("fmt,kw,match", [
    ("gguf:q4_0", {"sym": False}, r"use bits=4 group_size=32 sym=True for gguf:q4_0"),
    ("gguf:q4_1", {"sym": True}, r"q_proj.*use bits=4 group_size=32 sym=False for gguf:q4_1"),
    ("gguf:q4_0", {"group_size": 64}, r"group_size=64"),
    ("gguf:q8_0", {"bits": 4}, r"bits=4.*use bits=8 group_size=32 sym=True"),
    ("gguf:q5_0", {"bits": 5, "scale_dtype": "bf16"}, r"scale_dtype='fp16'"),
])
def test_wrong_scheme_refused_before_tuning(fmt, kw, match):
    _refused(tiny_llama(), match, fmt=fmt, **kw)


def test_in_features_not_multiple_of_32_refused():
    # (AutoRound's plan already keeps such layers FP when no group size >= 32 divides them.)
    why = get_format("gguf:q4_0").check_layer("model.layers.0.mlp.down_proj", 64, 48, 4, 32, True)
    assert "'model.layers.0.mlp.down_proj'" in why and "in_features=48 is not a multiple of 32" in why


def test_unsupported_model_and_tokenizers_refused():
    _refused(tiny_opt(), r"model types \['llama', 'mistral', 'qwen2'\], not 'opt'.*format='auto_round'")
    _refused(tiny_llama(), r"carries the tokenizer", tokenizer=None, iters=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    small_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    _refused(small_vocab, r"ids up to 511 but the model embeds only 300", iters=0)
    qwen = tiny_qwen2(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                                       "rope_theta": 10000.0})
    _refused(qwen, r"rope_type 'llama3' is not representable for llama.cpp arch 'qwen2'")
    with pytest.raises(ValueError, match=r"'gguf:iq2_xs'; valid formats: .*'gguf:q4_0', 'gguf:q4_1'"):
        get_format("gguf:iq2_xs")  # llama.cpp's i-quants are not written


# ---------------------------------------------------------------------------------- tokenizers
def _with_pre_tokenizer(pre: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    j = json.loads(make_tokenizer().backend_tokenizer.to_str())
    j["pre_tokenizer"] = pre
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)), bos_token="<|bos|>",
                                   eos_token="<|eos|>")


def test_pre_tokenizer_names_and_fallback(caplog):
    from auto_round.export.gguf.vocab import _LLAMA3_SPLIT

    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    llama3 = _with_pre_tokenizer({"type": "Sequence", "pretokenizers": [split, level]})
    assert build_vocab(llama3, 512).pre == "llama-bpe"
    odd = dict(split, pattern={"Regex": r"\p{L}+|\s+|."})
    vocab = build_vocab(_with_pre_tokenizer({"type": "Sequence", "pretokenizers": [odd, level]}), 512)
    assert vocab.pre == "gpt-2" and "no llama.cpp pre-tokenizer is known" in vocab.notes[0]
    with caplog.at_level(logging.WARNING):  # announced before tuning
        assert get_format("gguf:q4_0").check_model(tiny_llama(), _with_pre_tokenizer(
            {"type": "Sequence", "pretokenizers": [odd, level]})) is None
    assert "wrote 'gpt-2'" in caplog.text


def _sentencepiece_tokenizer():
    """A SentencePiece-style BPE (byte fallback, ▁ for spaces, <0xXX> byte pieces), as transformers
    holds Llama-2/Mistral tokenizers, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tokenizer_fixture import _training_text

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = meta
    trained.train_from_iterator(_training_text()[:200], trainers.BpeTrainer(vocab_size=200, show_progress=False))
    j = json.loads(trained.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(j["model"]["vocab"], key=j["model"]["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in j["model"]["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = meta
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, merges


def test_sentencepiece_vocabulary():
    tok, merges = _sentencepiece_tokenizer()
    n = len(tok) + 3  # the model embeds a few ids the tokenizer lacks
    vocab = build_vocab(tok, n)
    assert vocab.model == "llama" and vocab.pre is None and not vocab.merges
    assert vocab.token_types[:4] == [2, 3, 3, 6]  # <unk> UNKNOWN, <s> </s> CONTROL, <0x00> BYTE
    assert set(vocab.token_types[3:259]) == {6} and vocab.token_types[-3:] == [5, 5, 5]
    assert vocab.tokens[-1] == f"[PAD{n - 1}]"
    ids = tok.get_vocab()
    first = "".join(merges[0])
    assert vocab.scores[ids[first]] == 0.0 and vocab.scores[ids["".join(merges[5])]] == -5.0
    assert vocab.add_space_prefix is True and vocab.add_bos is True and vocab.add_eos is False
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0}


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
    model = type("M", (), {"config": cfg})()
    factors = extra_tensors(model)["rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert factors.shape == (64,)
    assert torch.allclose(base / factors, scaled.float(), rtol=1e-5)


def test_sentencepiece_file_reads_back_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok, _ = _sentencepiece_tokenizer()
    AutoRound(tiny_llama(), tok, bits=4, sym=True, **{**RUN, "iters": 0}).quantize_and_save(
        tmp_path, format="gguf:q4_0", inplace=False)
    reader, path = _reader(tmp_path)
    assert _field(reader, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in reader.fields
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("The quick brown fox jumps.", "two  spaces\nnew line, é ü 中"):  # bytes fall back
        assert back.encode(text) == tok.encode(text)
