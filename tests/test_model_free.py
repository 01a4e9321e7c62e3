"""Model-free RTN (``auto_round.model_free``): a safetensors checkpoint quantized shard by shard must give the
same bytes as the in-memory ``AutoRound(folder, iters=0, disable_opt_rtn=True).quantize_and_save`` (every
tensor, config.json, quantization_config.json), load with ``load_quantized`` to the same logits, and refuse
bad inputs with errors that name the problem."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from auto_round import AutoRound, quantize_model_free
from auto_round.inference import load_quantized
from auto_round.model_free import core
from checkpoints import checkpoint_tensors, save_model
from tiny_models import tiny_llama, tiny_qwen2
from tokenizer_fixture import make_tokenizer

RTN = dict(iters=0, disable_opt_rtn=True)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threading overhead dominates on 2 busy cores
    yield
    torch.set_num_threads(n)


def _both(src: Path, tmp: Path, fmt: str = "auto_round", **opts):
    mem = AutoRound(str(src), **RTN, **opts).quantize_and_save(tmp / "mem", format=fmt)[0]
    free = quantize_model_free(src, tmp / "free", format=fmt, **opts)
    return mem, free


def _assert_identical(mem: Path, free: Path):
    a, b = checkpoint_tensors(mem), checkpoint_tensors(free)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different[:5]
    for name in ("config.json", "quantization_config.json"):
        assert json.loads((mem / name).read_text()) == json.loads((free / name).read_text()), name
    return a


CASES = {
    # name: (factory, dtype, max_shard_size, options)
    "llama-fp32-single-sym": (tiny_llama, None, None, dict(bits=4, group_size=32)),
    "qwen2-bf16-sharded-tied-asym": (tiny_qwen2, torch.bfloat16, "60KB", dict(bits=4, group_size=32, sym=False)),
    "llama-bf16-sharded-overrides": (tiny_llama, torch.bfloat16, "40KB", dict(
        bits=4, group_size=128, layer_config={"mlp.down_proj": {"bits": 8, "group_size": 64}},
        fp_layers="layers.1.self_attn.o_proj", quant_lm_head=True)),
    "qwen2-3bit-asym-raw": (tiny_qwen2, None, "60KB", dict(bits=3, group_size=32, sym=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bytes_as_in_memory_rtn(case, tmp_path):
    """Every tensor (packed layers, copied embeddings/norms/lm_head, biases of Qwen2's q/k/v), config.json and
    quantization_config.json equal the in-memory path's; sharded inputs give sharded outputs with an index."""
    factory, dtype, shard, opts = CASES[case]
    src = save_model(factory(), tmp_path / "src", dtype, shard)
    mem, free = _both(src, tmp_path, **opts)
    tensors = _assert_identical(mem, free)
    packed = [k for k in tensors if k.endswith(".qweight")]
    assert len(packed) == (15 if opts.get("quant_lm_head") else 14) - (1 if opts.get("fp_layers") else 0)
    n_in = len(list(src.glob("*.safetensors")))
    assert len(list(free.glob("*.safetensors"))) == n_in
    assert (free / core.INDEX).is_file() == (n_in > 1)
    if n_in > 1:
        index = json.loads((free / core.INDEX).read_text())["weight_map"]
        assert sorted(index) == sorted(tensors)
        for k, f in index.items():
            with safe_open(str(free / f), "pt") as fh:
                assert k in fh.keys()
    assert (free / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_chunked_rounding_and_copying_change_no_bit(tmp_path, monkeypatch):
    """Weights are read and rounded in row chunks, other tensors copied in row chunks: with chunks of 3 rows
    (uneven, so the last chunk is short) the output is still the in-memory path's bytes."""
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 3 * 64)
    monkeypatch.setattr(core, "COPY_CHUNK_BYTES", 3 * 64 * 2)
    src = save_model(tiny_llama(), tmp_path / "src", torch.bfloat16)
    mem, free = _both(src, tmp_path, bits=4, group_size=32)
    _assert_identical(mem, free)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_round:auto_awq", "auto_awq"])
def test_other_packed_formats(fmt, tmp_path):
    src = save_model(tiny_llama(), tmp_path / "src", torch.bfloat16, "60KB")
    mem, free = _both(src, tmp_path, fmt=fmt, bits=4, group_size=32)
    tensors = _assert_identical(mem, free)
    assert any(k.endswith(".g_idx") for k in tensors) == (fmt == "auto_gptq")


def test_reloads_to_the_in_memory_logits(tmp_path):
    """load_quantized of the model-free folder gives the logits of the in-memory path's folder, and both are close
    to the in-memory quantized model itself."""
    src = save_model(tiny_qwen2(), tmp_path / "src", None, "60KB")
    ar = AutoRound(str(src), **RTN, bits=4, group_size=32)
    mem = ar.quantize_and_save(tmp_path / "mem", inplace=False)[0]
    free = quantize_model_free(src, tmp_path / "free", bits=4, group_size=32)
    ids = make_tokenizer()("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ar.model(ids).logits
        got_mem = load_quantized(str(mem), backend="torch")(ids).logits
        got_free = load_quantized(str(free), backend="torch")(ids).logits
    assert torch.equal(got_free, got_mem)
    assert torch.allclose(got_free, ref, atol=1e-3, rtol=1e-3), (got_free - ref).abs().max()


def test_cli_model_free(tmp_path):
    from auto_round.cli import main

    src = save_model(tiny_llama(), tmp_path / "src", torch.bfloat16, "60KB")
    assert main(["--model", str(src), "--model_free", "--group_size", "32", "--output_dir", str(tmp_path / "o")]) == 0
    free = tmp_path / "o" / "src-w4g32"
    mem = AutoRound(str(src), **RTN, group_size=32).quantize_and_save(tmp_path / "mem")[0]
    _assert_identical(mem, free)


def test_cli_model_free_refuses_tuning_iters(tmp_path, capsys):
    from auto_round.cli import main

    src = save_model(tiny_llama(), tmp_path / "src")
    with pytest.raises(SystemExit):
        main(["--model", str(src), "--model_free", "--iters", "5", "--output_dir", str(tmp_path / "o")])
    assert "--model_free" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------- refusals
def test_missing_folder_and_file_and_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*local model folder"):
        quantize_model_free(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        quantize_model_free(tmp_path / "f", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize_model_free(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused(tmp_path):
    src = tmp_path / "src"
    tiny_llama().config.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pickled weights only \(pytorch_model.bin\).*reads .safetensors only"):
        quantize_model_free(src, tmp_path / "out")


def test_unsupported_format_and_iters_are_refused_before_reading(tmp_path):
    src = save_model(tiny_llama(), tmp_path / "src")
    for fmt in ("fake", "gguf:q4_0", "llm_compressor"):
        with pytest.raises(ValueError, match=rf"format '{fmt}' is not available in model-free mode.*auto_gptq"):
            quantize_model_free(src, tmp_path / "out", format=fmt)
    with pytest.raises(ValueError, match="unknown export format 'nope'"):
        quantize_model_free(src, tmp_path / "out", format="nope")
    with pytest.raises(ValueError, match="iters=5: model-free mode is round-to-nearest"):
        quantize_model_free(src, tmp_path / "out", iters=5)
    with pytest.raises(ValueError, match="avg_bits=2.5.*mixed bits .* calibration data"):
        quantize_model_free(src, tmp_path / "out", avg_bits=2.5, scheme_options="W2G64,W4G128")
    with pytest.raises(ValueError, match="e2e_epochs=2: end-to-end scale tuning .* model-free mode never builds"):
        quantize_model_free(src, tmp_path / "out", e2e_epochs=2)
    with pytest.raises(TypeError, match="did you mean 'group_size'"):
        quantize_model_free(src, tmp_path / "out", group_sise=32)
    assert not (tmp_path / "out").exists()


def test_already_quantized_and_corrupt_inputs_are_refused(tmp_path):
    src = save_model(tiny_llama(), tmp_path / "src")
    out = quantize_model_free(src, tmp_path / "q", group_size=32)
    with pytest.raises(ValueError, match="already quantized.*quant_method 'auto-round'"):
        quantize_model_free(out, tmp_path / "q2")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid .safetensors file.*truncated or corrupt"):
        quantize_model_free(src, tmp_path / "q3")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_weight_is_refused_naming_the_layer_and_nothing_is_written(bad, tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 7] = float(bad)
    src = save_model(model, tmp_path / "src")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj holds NaN or Inf"):
        quantize_model_free(src, tmp_path / "out", group_size=32)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_renamed_checkpoint_tensors_are_refused_not_skipped(tmp_path):
    """A checkpoint whose tensor names are not the model's module names would quantize nothing: refused."""
    from safetensors.torch import load_file, save_file

    src = save_model(tiny_llama(), tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    save_file({k.replace("model.layers.", "model.decoder.layers."): v for k, v in state.items()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)does not hold the LlamaForCausalLM layers.*"
                                         r"model.layers.0.self_attn.q_proj.weight is missing"):
        quantize_model_free(src, tmp_path / "out", group_size=32)


def test_output_folder_rules(tmp_path):
    """The source folder is never written; a foreign non-empty folder needs overwrite=True and keeps the user's
    files; a rerun into our own checkpoint replaces it."""
    src = save_model(tiny_llama(), tmp_path / "src")
    with pytest.raises(ValueError, match="is inside the source model's folder"):
        quantize_model_free(src, src / "q", group_size=32)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by auto_round"):
        quantize_model_free(src, user, group_size=32)
    quantize_model_free(src, user, group_size=32, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"
    quantize_model_free(src, user, group_size=64)
    assert json.loads((user / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert (user / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vlm_keeps_the_vision_tower_and_matches_in_memory(family, tmp_path):
    """A VLM folder is planned by AutoRoundMLLM's hooks on the skeleton: the language model's blocks are quantized,
    the vision tower and projector copied. transformers saves these models under their legacy tensor names (LLaVA:
    language_model.model.layers.*, loaded into model.language_model.layers.*); the renaming is transformers' own,
    so the output has the in-memory path's bytes and names, and reloads to its logits."""
    from auto_round import AutoRoundMLLM
    from tiny_vlms import FAMILIES, make_image, skip_on_upstream_break

    skip_on_upstream_break(family)
    vlm = FAMILIES[family]()
    src = tmp_path / "src"
    vlm.model.save_pretrained(src, max_shard_size="100KB")
    vlm.processor.save_pretrained(src)
    mem = AutoRoundMLLM(str(src), **RTN, bits=4, group_size=32).quantize_and_save(tmp_path / "mem")[0]
    free = quantize_model_free(src, tmp_path / "free", bits=4, group_size=32)
    tensors = _assert_identical(mem, free)
    packed = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    assert len(packed) == 14 and all(".layers." in k and "vision" not in k and "visual" not in k for k in packed)
    assert any(("vision" in k or "visual" in k) and k.endswith(".weight") for k in tensors)
    cfg = json.loads((free / "config.json").read_text())["quantization_config"]
    assert cfg["block_name_to_quantize"] == "model.language_model.layers"
    inputs = vlm.inputs("What is shown?", images=[make_image(vlm.image_size)])
    with torch.no_grad():
        got_mem = load_quantized(str(mem), backend="torch")(**inputs).logits
        got_free = load_quantized(str(free), backend="torch")(**inputs).logits
    assert torch.equal(got_free, got_mem)


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    """write_shard's files (header first, tensors produced one by one, some in chunks) are what safe_open reads, for
    every dtype and odd sizes; ShardReader reads safetensors' own files, whole or by rows."""
    from safetensors.torch import save_file

    from auto_round.model_free.shards import OutSpec, ShardReader, write_shard

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bool": torch.rand(3, 5, generator=g) > 0.5, "b.u8": torch.randint(0, 255, (7,), dtype=torch.uint8),
               "c.f16": torch.randn(5, 3, generator=g).half(), "d.i64": torch.arange(5),
               "e.bf16": torch.randn(9, 2, generator=g).bfloat16(), "f.f32": torch.randn(2, 2, 2, generator=g),
               "g.scalar": torch.tensor(1.5), "h.empty": torch.zeros(0, 4)}
    specs = [OutSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    chunked = {"e.bf16", "c.f16"}
    path = tmp_path / "s.safetensors"
    write_shard(path, specs, lambda n: iter(tensors[n].split(2)) if n in chunked else tensors[n], {"format": "pt"})
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert sorted(fh.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v), k
    theirs = tmp_path / "t.safetensors"
    save_file(tensors, str(theirs))
    reader = ShardReader(theirs)
    for k, v in tensors.items():
        assert torch.equal(reader.get(k), v), k
    assert torch.equal(reader.get_rows("e.bf16", 2, 7), tensors["e.bf16"][2:7])
    assert torch.equal(torch.cat(list(reader.iter_rows("e.bf16", 8))), tensors["e.bf16"])
    reader.close()
    with pytest.raises(RuntimeError, match="'c.f16'.*planned"):
        write_shard(tmp_path / "bad.safetensors", specs,
                    lambda n: tensors[n].float() if n == "c.f16" else tensors[n], {})


def test_vlm_quant_nontext_module_quantizes_the_vision_blocks_too(tmp_path):
    """quant_nontext_module=True plans the vision tower's blocks and the projector as AutoRoundMLLM does (their
    Linear layers are packed under the checkpoint's names), same bytes as the in-memory path."""
    from auto_round import AutoRoundMLLM
    from tiny_vlms import FAMILIES, skip_on_upstream_break

    skip_on_upstream_break("llava")
    vlm = FAMILIES["llava"]()
    src = tmp_path / "src"
    vlm.model.save_pretrained(src)
    vlm.processor.save_pretrained(src)
    opts = dict(bits=4, group_size=32, quant_nontext_module=True)
    mem = AutoRoundMLLM(str(src), **RTN, **opts).quantize_and_save(tmp_path / "mem")[0]
    free = quantize_model_free(src, tmp_path / "free", **opts)
    tensors = _assert_identical(mem, free)
    packed = [k for k in tensors if k.endswith(".qweight")]
    assert any(k.startswith("vision_tower.") for k in packed) and any(k.startswith("language_model.") for k in packed)
    with pytest.raises(TypeError, match=r"\['quant_nontext_module'\] apply to vision-language models only"):
        quantize_model_free(save_model(tiny_llama(), tmp_path / "llm"), tmp_path / "o", quant_nontext_module=True)


def test_incomplete_or_ambiguous_shard_sets_are_refused(tmp_path):
    src = save_model(tiny_llama(), tmp_path / "src", None, "60KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].rename(tmp_path / "away.safetensors")
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) that are missing.*fetch those files"):
        quantize_model_free(src, tmp_path / "out")
    (tmp_path / "away.safetensors").rename(shards[-1])
    (src / core.INDEX).unlink()
    with pytest.raises(ValueError, match=r"several .safetensors files .* but no model.safetensors.index.json"):
        quantize_model_free(src, tmp_path / "out")


def test_cli_mllm_model_free(tmp_path):
    from auto_round.cli import main_mllm
    from tiny_vlms import FAMILIES, skip_on_upstream_break

    skip_on_upstream_break("llava")
    vlm = FAMILIES["llava"]()
    src = tmp_path / "vlm"
    vlm.model.save_pretrained(src)
    vlm.processor.save_pretrained(src)
    argv = ["--model", str(src), "--model_free", "--group_size", "32", "--output_dir", str(tmp_path / "o")]
    assert main_mllm(argv) == 0
    cfg = json.loads((tmp_path / "o" / "vlm-w4g32" / "config.json").read_text())["quantization_config"]
    assert cfg["block_name_to_quantize"] == "model.language_model.layers" and cfg["iters"] == 0


def test_moe_experts_fused_at_load_are_copied_as_stored(tmp_path):
    """Mixtral: transformers 5 fuses the per-expert checkpoint tensors into 3-D parameters at load (a WeightConverter,
    not a Linear, so neither path quantizes them) and splits them back at save. Model-free copies them as stored and
    packs the attention Linears: the in-memory path's bytes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        max_position_embeddings=512)
    src = save_model(MixtralForCausalLM(cfg).eval(), tmp_path / "src", None, "60KB")
    mem, free = _both(src, tmp_path, bits=4, group_size=32)
    tensors = _assert_identical(mem, free)
    assert sum(k.endswith(".qweight") for k in tensors) == 8
    assert "model.layers.0.block_sparse_moe.experts.1.w2.weight" in tensors


def test_a_stored_tied_lm_head_is_not_written_as_save_pretrained_drops_it(tmp_path):
    """Qwen2 ties lm_head to the embeddings; a checkpoint that stores lm_head.weight as well (some hub ones do) gives
    a checkpoint without it, as the in-memory path's save_pretrained writes it."""
    from safetensors.torch import load_file, save_file

    src = save_model(tiny_qwen2(), tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    mem, free = _both(src, tmp_path, bits=4, group_size=32)
    tensors = _assert_identical(mem, free)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
