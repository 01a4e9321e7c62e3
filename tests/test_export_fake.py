"""The fake format: a plain checkpoint whose weights are the tuned qdq weights."""

import json

import torch

from auto_round import AutoRound
from auto_round.export.fake_format import RECORD_FILE
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

FAST = dict(bits=3, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset="auto_round:offline_corpus")


def test_fake_checkpoint_loads_plainly_with_the_dequantized_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    fp = tiny_llama()
    ar = AutoRound(tiny_llama(), tok, **FAST)
    out = ar.quantize_and_save(tmp_path / "q", format="fake,auto_round", inplace=False)[0]
    assert out.name == "fake"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / RECORD_FILE).read_text())["bits"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, qw in ar.quantized_layers.items():
        w = loaded.get_submodule(name).weight
        assert torch.equal(w, qw.dequantize()), name
        assert not torch.equal(w, fp.get_submodule(name).weight), name
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ar.model(ids).logits, atol=1e-5)
    assert (tmp_path / "q" / "auto_round" / "model.safetensors").is_file()  # several formats from one run
