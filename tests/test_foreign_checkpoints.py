"""Checkpoints other tools write, read by ``load_quantized``: GPTQModel's GPTQ configs (its ``meta`` block, which
transformers' AutoRoundConfig refuses; ``gptq_v2`` raw zeros; ``dynamic`` per-module rules), act-order
(``desc_act=True``) ``g_idx``, and layouts refused by name.

The folders are built here from our own ``auto_gptq`` export, rewritten the way GPTQModel 7.7 writes its files
(config keys and tensors as measured in ``bench/bench_peers.py``, which runs GPTQModel itself): each is compared
with the original folder's logits or with an independent dequantization of the rewritten tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_round import AutoRound, AutoRoundMLLM
from auto_round.inference import load_quantized
from auto_round.inference.foreign import normalize_quantization_config
from auto_round.inference.qlinear import QuantLinear
from auto_round.quant.pack import pack_bits, unpack_bits
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

RTN = dict(bits=4, group_size=32, iters=0, disable_opt_rtn=True)
# What GPTQModel 7.7 adds to a v1 checkpoint's quantization_config (its meta block, abridged).
GPTQMODEL_KEYS = {"checkpoint_format": "gptq", "format": "gptq", "method": "gptq", "pack_dtype": "int32",
                  "lm_head": False, "meta": {"quantizer": ["gptqmodel:7.7.0"], "damp_percent": 0.05,
                                             "act_group_aware": True, "mse": 0.0}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our auto_gptq export of a tiny Llama, and the logits its own folder loads to."""
    ar = AutoRound(tiny_llama(), make_tokenizer(), **RTN)
    out = ar.quantize_and_save(tmp_path_factory.mktemp("gptq") / "q", format="auto_gptq", inplace=False)[0]
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_quantized(str(out), backend="torch")(ids).logits
    return out, ids, ref


def _rewrite(src, dst, config_update=None, tensors=None, drop=()):
    """A copy of the checkpoint folder ``src`` at ``dst`` with its quantization_config updated and tensors
    replaced (``tensors``: name -> tensor) or removed (``drop``)."""
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    for k in drop:
        del state[k]
    state.update(tensors or {})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(config_update or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _logits(folder, ids):
    with torch.no_grad():
        return load_quantized(str(folder), backend="torch")(ids).logits


def test_gptqmodel_v1_config_loads(exported, tmp_path):
    out, ids, ref = exported
    folder = _rewrite(out, tmp_path / "gm", GPTQMODEL_KEYS)
    assert torch.equal(_logits(folder, ids), ref)


def test_gptqmodel_v2_raw_zeros_load(exported, tmp_path):
    out, ids, ref = exported
    state = load_file(str(out / "model.safetensors"))
    raw = {}
    for k, t in state.items():  # v1 stores z - 1; v2 stores z
        if k.endswith(".qzeros"):
            stored = unpack_bits(t, 4, dim=1, length=t.shape[1] * 8)
            raw[k] = pack_bits((stored + 1) & 15, 4, dim=1)
    folder = _rewrite(out, tmp_path / "v2", {**GPTQMODEL_KEYS, "checkpoint_format": "gptq_v2", "format": "gptq_v2"},
                      raw)
    assert torch.equal(_logits(folder, ids), ref)
    # the same tensors read as v1 would be off by one level everywhere: the layout key is what is read
    wrong = _rewrite(folder, tmp_path / "v2-as-v1", {"checkpoint_format": "gptq", "format": "gptq"})
    assert not torch.allclose(_logits(wrong, ids), ref, atol=1e-2)


def test_gptqmodel_dynamic_rules_apply_per_module(exported, tmp_path):
    """``-:`` keeps a module in full precision; ``+:`` gives its bits; first matching rule wins."""
    out, ids, ref = exported
    state = load_file(str(out / "model.safetensors"))
    fp_name, q8_name = "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    model = load_quantized(str(out), backend="torch")
    with torch.no_grad():
        fp_weight = model.get_submodule(fp_name)(torch.eye(128)).t().contiguous()  # its dequantized weight [64, 128]
    codes = unpack_bits(state[q8_name + ".qweight"], 4, dim=0, length=64)  # 4-bit levels are valid 8-bit levels
    zeros = unpack_bits(state[q8_name + ".qzeros"], 4, dim=1, length=64)  # z - 1 (mod 16)
    zeros8 = ((zeros + 1) & 15) - 1  # the same zero point, stored as z - 1 in 8 bits
    tensors = {fp_name + ".weight": fp_weight.to(torch.float32),
               q8_name + ".qweight": pack_bits(codes, 8, dim=0), q8_name + ".qzeros": pack_bits(zeros8 & 255, 8, dim=1)}
    drop = [fp_name + s for s in (".qweight", ".qzeros", ".scales", ".g_idx")]
    dynamic = {r"-:.*\.1\.mlp\.down_proj": {}, r"+:.*\.0\.self_attn\.q_proj": {"bits": 8},
               r"+:.*\.0\.self_attn\.q.*": {"bits": 2}}  # never reached: the first matching rule decides
    folder = _rewrite(out, tmp_path / "dyn", {**GPTQMODEL_KEYS, "dynamic": dynamic}, tensors, drop)
    loaded = load_quantized(str(folder), backend="torch")
    assert type(loaded.get_submodule(fp_name)) is torch.nn.Linear
    assert loaded.get_submodule(q8_name).bits == 8 and loaded.get_submodule("model.layers.0.self_attn.k_proj").bits == 4
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)
    no_rule = _rewrite(folder, tmp_path / "dyn-none", {"dynamic": {r"-:.*\.1\.mlp\.down_proj": {}}})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # q_proj read as 4-bit: transformers refuses
        load_quantized(str(no_rule), backend="torch")


def test_act_order_g_idx_is_read(exported, tmp_path):
    """desc_act=True: channel i belongs to group g_idx[i], any grouping of 32 channels per group."""
    out, ids, _ = exported
    state = load_file(str(out / "model.safetensors"))
    name, in_, gs = "model.layers.0.mlp.down_proj", 128, 32
    perm = torch.randperm(in_, generator=torch.Generator().manual_seed(3))
    g_idx = torch.empty(in_, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_) // gs).to(torch.int32)  # act order: channel perm[j] is the j-th quantized
    folder = _rewrite(out, tmp_path / "act", {**GPTQMODEL_KEYS, "desc_act": True}, {name + ".g_idx": g_idx})
    layer = load_quantized(str(folder), backend="torch").get_submodule(name)
    codes = unpack_bits(state[name + ".qweight"], 4, dim=0, length=in_).float()  # [in, out]
    zeros = ((unpack_bits(state[name + ".qzeros"], 4, dim=1, length=64) + 1) & 15).float()  # [G, out]
    scales = state[name + ".scales"].float()
    weight = ((codes - zeros[g_idx.long()]) * scales[g_idx.long()]).t()  # independent dequantization [out, in]
    x = torch.randn(3, in_)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ weight.t(), atol=1e-5)
        fast = load_quantized(str(folder)).get_submodule(name)  # the default backend takes the same permutation
        got = fast(x.bfloat16()).float()
        assert fast.backend_name == "cpu_int4"
        assert torch.allclose(got, x @ weight.t(), atol=3e-2 * float(got.abs().max()))
    bad = g_idx.clone()
    bad[0] = bad[1] = 0
    bad[2] = 3  # group 0 with 33 channels
    broken = _rewrite(folder, tmp_path / "act-bad", tensors={name + ".g_idx": bad})
    with pytest.raises(ValueError, match="does not give every group group_size=32 input channels"):
        load_quantized(str(broken), backend="torch")(ids)


@pytest.mark.parametrize("update, message", [
    ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'.*format='gptq'"),
    ({"pack_dtype": "int16"}, "pack_dtype='int16'.*int32"),
])
def test_gptqmodel_layouts_this_loader_cannot_read_are_refused_by_name(exported, tmp_path, update, message):
    out, _, _ = exported
    folder = _rewrite(out, tmp_path / "bad", {**GPTQMODEL_KEYS, **update})
    with pytest.raises(ValueError, match=message):
        load_quantized(str(folder))


def test_awq_kernel_layouts_other_than_gemm_are_refused():
    for key in ("version", "format"):
        with pytest.raises(ValueError, match="'gemv'.*'gemm'"):
            normalize_quantization_config({"quant_method": "awq", "bits": 4, key: "gemv"})
    assert normalize_quantization_config({"quant_method": "awq", "format": "gemm", "meta": {}})["version"] == "gemm"


def test_configs_of_this_package_pass_unchanged():
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    assert normalize_quantization_config(cfg) == cfg
    cfg = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4}
    assert normalize_quantization_config(cfg) == cfg


@pytest.mark.parametrize("name, fmt", [("llava", "auto_gptq"), ("qwen2_vl", "auto_gptq"), ("llava", "auto_awq")])
def test_vlm_folder_without_block_names_keeps_its_vision_tower(name, fmt, tmp_path):
    """GPTQModel and AutoAWQ record no block_name_to_quantize: the quantized block lists are read from the tensor
    names on disk, which for a LLaVA are not the module names (transformers saves it with the hub's renamings)."""
    from tiny_vlms import FAMILIES, make_image, skip_on_upstream_break

    skip_on_upstream_break(name)
    vlm = FAMILIES[name]()
    ar = AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, **RTN)
    out = ar.quantize_and_save(tmp_path / "q", format=fmt, inplace=False)[0]
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        ref = load_quantized(str(out), backend="torch")(**inputs).logits
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    del qc["block_name_to_quantize"]
    if fmt == "auto_gptq":
        qc.update(GPTQMODEL_KEYS)
    else:  # AutoAWQ writes modules_to_not_convert: null
        qc["modules_to_not_convert"] = None
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = load_quantized(str(out), backend="torch")
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == len(ar.quantized_layers) and all("vision" not in n for n in quantized)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ref)


def test_block_lists_of_a_hub_checkpoint_come_from_its_remote_headers(monkeypatch, caplog):
    """A hub repo id: the tensor names come from huggingface_hub's safetensors metadata (no download); when the hub
    cannot be reached the config is left as it is, with a warning."""
    import types

    import huggingface_hub

    from auto_round.inference.foreign import with_block_lists

    names = ["model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.up_proj.scales", "lm_head.weight",
             "model.layers.1.self_attn.q_proj.qweight"]
    seen = []

    def metadata(repo_id, **_):
        seen.append(repo_id)
        return types.SimpleNamespace(weight_map={n: "model.safetensors" for n in names})

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    qc = {"quant_method": "gptq", "bits": 4}
    assert with_block_lists(qc, "org/model", tiny_llama)["block_name_to_quantize"] == ["model.layers"]
    assert seen == ["org/model"]

    def offline(repo_id, **_):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline)
    with caplog.at_level("WARNING"):
        assert with_block_lists(qc, "org/model", tiny_llama) == qc
    assert "could not list the tensors of 'org/model'" in caplog.text
