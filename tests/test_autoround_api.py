"""End to end through the public API and CLI: tune, export auto_round, reload, generate."""

import json

import pytest
import torch
from safetensors import safe_open

from auto_round import AutoRound
from auto_round.cli import main
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=4, group_size=32, iters=4, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


def test_quantize_save_reload_generate(tmp_path):
    model, tok = tiny_llama(), make_tokenizer()
    ar = AutoRound(model, tok, **FAST)
    out = tmp_path / "q"
    ar.quantize_and_save(out, format="auto_round", inplace=False)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ar.model(ids).logits
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "auto-round" and cfg["block_name_to_quantize"] == "model.layers"
    assert cfg["dataset"] == "auto_round:offline_corpus" and cfg["packing_format"] == "auto_round:auto_gptq"
    assert (out / "quantization_config.json").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    gen = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert ar.summary["quantized_layers"] == 14 and len(ar.summary["blocks"]) == 2


def test_save_refuses_unrelated_nonempty_folder_and_keeps_it(tmp_path):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "iters": 0})
    ar.quantize()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ar.save_quantized(keep, inplace=False)
    assert (keep / "notes.txt").read_text() == "precious"
    ar.save_quantized(tmp_path / "ckpt", inplace=False)
    ar.save_quantized(tmp_path / "ckpt", inplace=False)  # an earlier checkpoint is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_existing_checkpoint(tmp_path, monkeypatch):
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "iters": 0})
    ar.quantize()
    out = tmp_path / "ckpt"
    ar.save_quantized(out, inplace=False)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(ar, "save_extra_files", lambda folder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ar.save_quantized(out, inplace=False)
    assert sorted(p.name for p in out.iterdir()) == before


def test_refuses_to_overwrite_source_model(model_dir):
    ar = AutoRound(str(model_dir), **{**FAST, "iters": 0})
    ar.quantize()
    with pytest.raises(ValueError, match="source model's folder"):
        ar.save_quantized(model_dir, overwrite=True)


def test_api_errors():
    with pytest.raises(TypeError, match="did you mean 'nsamples'"):
        AutoRound(tiny_llama(), make_tokenizer(), n_samples=4)
    ar = AutoRound(tiny_llama(), make_tokenizer(), **FAST)
    with pytest.raises(RuntimeError, match="quantize"):
        ar.save_quantized("x")
    with pytest.raises(ValueError, match="format"):
        AutoRound(tiny_llama(), make_tokenizer(), **FAST).quantize(format="no_such_format")
    with pytest.raises(OSError, match="local model folder"):
        AutoRound("no-such-org/no-such-model-xyz", iters=0)


def test_cli_quantizes_local_folder(model_dir, tmp_path, capsys):
    argv = ["--model", str(model_dir), "--bits", "4", "--group_size", "32", "--iters", "2", "--nsamples", "2",
            "--seqlen", "32", "--batch_size", "2", "--dataset", "auto_round:offline_corpus",
            "--output_dir", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    out = tmp_path / f"{model_dir.name}-w4g32"
    assert str(out) in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    asked = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True, "iters": 2, "nsamples": 2,
             "seqlen": 32, "batch_size": 2, "dataset": "auto_round:offline_corpus",
             "block_name_to_quantize": "model.layers"}
    assert {k: cfg[k] for k in asked} == asked
    assert cfg["enable_alg_ext"] is True  # the tuner that ran, resolved from the default None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    linears = [f"model.layers.{i}.{m}" for i in range(2) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert all(f"{n}.qweight" in keys and f"{n}.weight" not in keys for n in linears)
    assert "lm_head.weight" in keys  # not quantized by default
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = make_tokenizer()("the quick brown fox", return_tensors="pt").input_ids
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_cli_reports_bad_value(model_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--bits", "9", "--output_dir", str(tmp_path)]) == 2
    assert "bits=9" in capsys.readouterr().err


def test_cli_refuses_unsupported_reference_options(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model_dir), "--adam", "--output_dir", str(tmp_path)])
    assert e.value.code == 2 and "--adam is not supported" in capsys.readouterr().err


def test_auto_gptq_export_loads_and_matches(tmp_path):
    from safetensors.torch import load_file

    from auto_round.inference import load_quantized

    ar = AutoRound(tiny_llama(), make_tokenizer(), **FAST)
    out = ar.quantize_and_save(tmp_path / "q", format="auto_gptq", inplace=False)[0]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["desc_act"] is False and cfg["bits"] == 4
    # transformers' own GPTQ config (what plain from_pretrained builds) accepts it: "dataset" may only be
    # wikitext2/c4/c4-new there, so ours is recorded as autoround_dataset
    from transformers import GPTQConfig

    assert "dataset" not in cfg and cfg["autoround_dataset"] == "auto_round:offline_corpus"
    assert GPTQConfig.from_dict(cfg).bits == 4
    state = load_file(str(out / "model.safetensors"))
    gidx = state["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(gidx, torch.arange(128, dtype=torch.int32) // 32)
    assert int(state["model.layers.0.mlp.down_proj.qzeros"][0, 0]) == 0x77777777
    ids = make_tokenizer()("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        ref, got = ar.model(ids).logits, load_quantized(out)(ids).logits
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)


def test_auto_gptq_refuses_mixed_schemes_before_tuning():
    ar = AutoRound(tiny_llama(), make_tokenizer(), **{**FAST, "layer_config": {"q_proj": {"bits": 8}}})
    with pytest.raises(ValueError, match="one \\(bits, group_size\\)"):
        ar.quantize(format="auto_gptq")
    assert not ar.quantized_layers  # refused before any tuning


def test_cli_help_of_negated_flags_describes_what_the_flag_does():
    from auto_round.cli import NEGATED_FLAGS, build_parser

    actions = {a.option_strings[0]: a for a in build_parser("auto-round")._actions if a.option_strings}
    assert actions["--asym"].help.startswith("asymmetric")
    assert actions["--disable_amp"].help.startswith("tune in float32")
    assert actions["--disable_minmax_tuning"].help.startswith("do not tune")
    assert actions["--disable_quanted_input"].help.startswith("feed each block the full-precision")
    assert all(actions[flag].dest == name and actions[flag].default is True for name, flag in NEGATED_FLAGS.items())
