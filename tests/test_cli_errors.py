"""The CLI and the API say what went wrong in one line, found before tuning where it can be."""

import logging

import pytest
import torch

from auto_round import AutoRound
from auto_round.cli import main
from tiny_models import tiny_llama, tiny_opt
from tokenizer_fixture import make_tokenizer


def test_truncated_safetensors_is_one_line_not_a_traceback(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["--model", str(broken), "--iters", "0", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "truncated or corrupt" in err
    with pytest.raises(Exception):  # --debug shows the real exception
        main(["--model", str(broken), "--iters", "0", "--output_dir", str(tmp_path / "o"), "--debug"])


def test_out_of_memory_suggests_what_to_change(model_dir, tmp_path, capsys, monkeypatch):
    from auto_round import autoround

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(autoround, "quantize_model", boom)
    argv = ["--model", str(model_dir), "--iters", "1", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
            "--dataset", "auto_round:offline_corpus", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--low_gpu_mem_usage" in err and "Traceback" not in err


@pytest.mark.parametrize("factory", [tiny_llama, tiny_opt])
def test_seqlen_beyond_the_models_positions_is_refused_before_tuning(factory):
    ar = AutoRound(factory(), make_tokenizer(), bits=4, group_size=32, iters=1, nsamples=2, batch_size=2, seqlen=1024,
                   dataset="auto_round:offline_corpus")
    with pytest.raises(ValueError, match="seqlen=1024 exceeds the model's max_position_embeddings=512"):
        ar.quantize()
    assert not ar.quantized_layers


def test_text_api_on_a_vlm_folder_points_to_the_mllm_api(tmp_path, capsys):
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()
    vlm.model.save_pretrained(tmp_path / "vlm")
    assert main(["--model", str(tmp_path / "vlm"), "--iters", "0", "--output_dir", str(tmp_path / "o")]) == 2
    assert "auto-round-mllm" in capsys.readouterr().err


def test_gpt2_conv1d_layers_are_announced(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    with caplog.at_level(logging.WARNING, logger="auto_round.tuning.plan"):
        with pytest.raises(ValueError, match="quantizes no layer"):
            AutoRound(model, make_tokenizer(), iters=0, disable_opt_rtn=True, group_size=32, to_quant_block_names="transformer.h").quantize()
    assert "8 transformers Conv1D layer(s) in the tuned blocks stay in full precision" in caplog.text


def test_pickled_weights_are_refused_unless_allowed(tmp_path, capsys):
    d = tmp_path / "pickled"
    model = tiny_llama()
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # transformers 5 writes only safetensors
    make_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors")) and list(d.glob("*.bin"))
    with pytest.raises(ValueError, match=r"pickled weights only \(pytorch_model.bin\).*allow_pickle=True"):
        AutoRound(str(d), iters=0)
    assert main(["--model", str(d), "--iters", "0", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--allow_pickle" in capsys.readouterr().err
    ar = AutoRound(str(d), iters=0, disable_opt_rtn=True, group_size=32, allow_pickle=True)
    assert torch.equal(ar.model.lm_head.weight, tiny_llama().lm_head.weight)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(Exception):  # a bad pickle fails loudly, and the CLI says so in one line
        AutoRound(str(d), iters=0, allow_pickle=True)
    assert main(["--model", str(d), "--iters", "0", "--allow_pickle", "--output_dir", str(tmp_path / "o")]) == 2
    assert "Traceback" not in capsys.readouterr().err
