"""Block-streamed tuning (``low_cpu_mem_usage=True``, :mod:`auto_round.model_free.streaming`): a model read
from its shards one block at a time must write the same tensors as the in-memory
``AutoRound(folder).quantize_and_save`` with the same settings and seed (tuning really running, iters > 0),
hold one unit's weights at a time, and refuse what it cannot stream before tuning, naming the fix."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from auto_round import AutoRound
from auto_round.models import streamed
from checkpoints import checkpoint_tensors, save_model
from tiny_models import tiny_llama, tiny_qwen2
from tokenizer_fixture import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = "auto_round:offline_corpus"
FAST = dict(bits=4, group_size=32, iters=3, nsamples=4, seqlen=32, batch_size=2, dataset=CORPUS)


def _both(src: Path, tmp: Path, fmt: str = "auto_round", **opts):
    mem = AutoRound(str(src), **opts).quantize_and_save(tmp / "mem", format=fmt)[0]
    st = AutoRound(str(src), low_cpu_mem_usage=True, **opts).quantize_and_save(tmp / "st", format=fmt)[0]
    return mem, st


def _assert_identical(mem: Path, st: Path):
    a, b = checkpoint_tensors(mem), checkpoint_tensors(st)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different[:5]
    for name in ("config.json", "quantization_config.json"):
        assert json.loads((mem / name).read_text()) == json.loads((st / name).read_text()), name
    return a


def test_same_tensors_as_in_memory_tuning(model_dir, tmp_path):
    """The tuner really runs (iters > 0: the losses move) and every tensor, config.json and
    quantization_config.json equal the in-memory run's."""
    mem, st = _both(model_dir, tmp_path, **FAST)
    tensors = _assert_identical(mem, st)
    assert len([k for k in tensors if k.endswith(".qweight")]) == 14
    report = json.loads((st / "quantization_report.json").read_text())
    assert len(report["blocks"]) == 2 and all(len(b["losses"]) == 3 for b in report["blocks"])
    assert (st / "tokenizer.json").is_file()


CASES = {
    # name: (factory, dtype, max_shard_size, format, options)
    "bf16-sharded-asym-awq": (tiny_llama, torch.bfloat16, "40KB", "auto_round", dict(sym=False)),
    "qwen2-tied-biases-gptq": (tiny_qwen2, None, "60KB", "auto_gptq", {}),
    "overrides-lm_head-nblocks2": (tiny_llama, torch.bfloat16, None, "auto_round", dict(
        quant_lm_head=True, nblocks=2, layer_config={"mlp.down_proj": {"bits": 8, "group_size": 64}},
        fp_layers="layers.1.self_attn.o_proj")),
    "optimized-rtn": (tiny_llama, None, "40KB", "auto_round", dict(iters=0)),
    "alg-ext-fp-input": (tiny_llama, None, None, "auto_round:auto_awq", dict(sym=False, enable_alg_ext=True,
                                                                              enable_quanted_input=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_across_settings(case, tmp_path):
    """Sharded and bf16 checkpoints, tied embeddings and biases, other packed formats, layers outside the
    blocks (lm_head), nblocks > 1, optimized RTN (iters=0) and the extended tuner stream to the same bytes."""
    factory, dtype, shard, fmt, opts = CASES[case]
    src = save_model(factory(), tmp_path / "src", dtype, shard)
    mem, st = _both(src, tmp_path, fmt, **{**FAST, **opts})
    _assert_identical(mem, st)
    assert len(list(st.glob("*.safetensors"))) == len(list(src.glob("*.safetensors")))


def test_one_unit_loaded_at_a_time(model_dir, tmp_path, monkeypatch):
    """While a unit is tuned, every block outside it holds no weights (meta), and the modules before the
    first block are freed after the capture."""
    seen = []
    real_load = streamed.StreamedWeights.load

    def load(self, prefix):
        real_load(self, prefix)
        if prefix.startswith("model.layers."):
            loaded = [n for n, p in self.model.named_parameters() if not p.is_meta]
            seen.append((prefix, sorted({".".join(n.split(".")[:3]) for n in loaded})))

    monkeypatch.setattr(streamed.StreamedWeights, "load", load)
    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    ar.quantize_and_save(tmp_path / "st")
    assert seen == [("model.layers.0", ["model.layers.0"]), ("model.layers.1", ["model.layers.1"])]
    assert all(p.is_meta for p in ar.model.parameters())


def test_resume_reuses_streamed_units(model_dir, tmp_path, caplog, monkeypatch):
    """A streamed run checkpoints its units; after an interruption, a rerun with the same resume_dir reuses them
    and writes the same tensors (the model part of the fingerprint is read from the shards)."""
    from auto_round.model_free import streaming

    resume = str(tmp_path / "resume")

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(streaming.StreamedWriter, "copy_rest", interrupted)  # after the tuning, before the files complete
        with pytest.raises(KeyboardInterrupt):
            AutoRound(str(model_dir), low_cpu_mem_usage=True, resume_dir=resume, **FAST).quantize_and_save(
                tmp_path / "st")
    assert not (tmp_path / "st").exists() and len(list(Path(resume).glob("unit-*"))) == 2
    again = AutoRound(str(model_dir), low_cpu_mem_usage=True, resume_dir=resume, **FAST)
    with caplog.at_level("INFO"):
        out = again.quantize_and_save(tmp_path / "st")[0]
    assert caplog.text.count("resumed from") == 2
    mem = AutoRound(str(model_dir), **FAST).quantize_and_save(tmp_path / "mem")[0]
    _assert_identical(mem, out)


def test_in_memory_and_streamed_fingerprints_agree(model_dir):
    from auto_round.tuning.resume import model_fingerprint

    mem = AutoRound(str(model_dir), **FAST)
    st = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    assert st.streamed_weights.fingerprint() == model_fingerprint(mem.model)


# ----------------------------------------------------------------------------------------- refusals
def test_refuses_a_model_object(model_dir):
    with pytest.raises(ValueError, match="folder or hub id, not a loaded LlamaForCausalLM.*low_cpu_mem_usage=False"):
        AutoRound(tiny_llama(), make_tokenizer(), low_cpu_mem_usage=True)


def test_refuses_a_folder_without_safetensors(tmp_path):
    src = tmp_path / "pickled"
    model = tiny_llama()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors shards.*pytorch_model.bin.*save_pretrained"):
        AutoRound(str(src), low_cpu_mem_usage=True)


@pytest.mark.parametrize("fmt, match", [
    ("gguf:q4_0", "format 'gguf:q4_0' has no streaming writer.*auto_round"),
    ("fake", "format 'fake' has no streaming writer"),
    ("auto_round,auto_gptq", "one format per run"),
])
def test_refuses_formats_without_a_streaming_writer(model_dir, tmp_path, fmt, match):
    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    with pytest.raises(ValueError, match=match):
        ar.quantize_and_save(tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opts, match", [
    (dict(avg_bits=3.0, scheme_options="W2G32,W4G32"), "avg_bits=3.0.*layer_config"),
    (dict(iters=0, disable_opt_rtn=True), "quantize_model_free"),
    (dict(to_quant_block_names="model.layers,model.layers"), "one block list per run"),
])
def test_refuses_settings_it_cannot_stream(model_dir, tmp_path, opts, match):
    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **{**FAST, **opts})
    with pytest.raises(ValueError, match=match):
        ar.quantize_and_save(tmp_path / "out")


def test_quantize_and_save_quantized_point_to_quantize_and_save(model_dir, tmp_path):
    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    with pytest.raises(RuntimeError, match=r"quantize_and_save\(output_dir"):
        ar.quantize()
    with pytest.raises(RuntimeError, match=r"quantize_and_save\(output_dir"):
        ar.save_quantized(tmp_path / "out")


def test_refuses_a_vision_language_model(tmp_path):
    from transformers import LlavaConfig

    from auto_round import AutoRoundMLLM

    with pytest.raises(ValueError, match="text LLM.*low_cpu_mem_usage=False"):
        AutoRoundMLLM("any/vlm", low_cpu_mem_usage=True)
    folder = tmp_path / "llava"
    LlavaConfig().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config refuses first
    with pytest.raises(ValueError, match="vision-language model.*streams text LLMs only.*low_cpu_mem_usage=False"):
        AutoRound(str(folder), low_cpu_mem_usage=True)


def test_refuses_blocks_whose_output_is_not_their_hidden_state(model_dir, tmp_path, monkeypatch):
    """A family whose block returns more than its hidden state (the next block's input would depend on it)
    cannot be captured weightless: refused at the capture, before any block is tuned."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, hidden_states, *args, **kwargs):
        out = real(self, hidden_states, *args, **kwargs)
        return out, out * 2

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    with pytest.raises(ValueError, match="block 0 .*cannot be captured block by block.*low_cpu_mem_usage=False"):
        ar.quantize_and_save(tmp_path / "out")
    assert not ar.block_results


def test_refuses_a_checkpoint_missing_a_block_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_model(tiny_llama(), tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is not in the checkpoint"):
        AutoRound(str(src), low_cpu_mem_usage=True)


def test_cli_flag(model_dir, tmp_path):
    from auto_round.cli import main

    out = tmp_path / "cli"
    rc = main(["--model", str(model_dir), "--low_cpu_mem_usage", "--iters", "2", "--nsamples", "4", "--seqlen", "32",
               "--batch_size", "2", "--group_size", "32", "--dataset", CORPUS, "--output_dir", str(out)])
    assert rc == 0
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(checkpoint_tensors(folders[0])) > 0


def test_meta_params_only_no_buffer_lost(model_dir):
    """The skeleton's parameters are weightless while its buffers (rotary inv_freq) hold the values
    from_pretrained computes."""
    from transformers import AutoModelForCausalLM

    ar = AutoRound(str(model_dir), low_cpu_mem_usage=True, **FAST)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert all(p.is_meta for p in ar.model.parameters())
    for (n, b), (_, r) in zip(ar.model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, r), n
    assert {n: p.dtype for n, p in ar.model.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    assert isinstance(ar.model.model.layers[0].mlp.up_proj, nn.Linear)


def test_the_heap_is_trimmed_after_each_streamed_unit(monkeypatch):
    """glibc keeps a freed block's pages; the streamed release hands them back (trim_heap) once per unit."""
    import sys

    from auto_round.device import trim_heap
    from auto_round.model_free import streaming

    assert trim_heap() is sys.platform.startswith("linux")  # glibc here: malloc_trim exists and ran
    calls = []
    monkeypatch.setattr(streaming, "trim_heap", lambda: calls.append(1) or True)

    class _Writer:
        def write_layers(self, records):
            pass

    class _Weights:
        def free(self, name):
            pass

    units = streaming.StreamedUnits.__new__(streaming.StreamedUnits)
    units.writer, units.weights = _Writer(), _Weights()
    assert units.release(None, ["model.layers.0"], {}) == {}
    assert calls == [1]
