"""Loading is strict: a quantized layer whose checkpoint tensor is missing or misshapen is an error naming
the layer and the tensor (it loaded uninitialised memory and gave NaN logits)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_round import AutoRound
from auto_round.inference import load_quantized
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    AutoRound(tiny_llama(), make_tokenizer(), bits=4, group_size=32, iters=0, disable_opt_rtn=True).quantize().save_quantized(out, inplace=False)
    return out


def _broken(checkpoint, tmp_path, edit):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(checkpoint, out)
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


LAYER = "model.layers.1.self_attn.o_proj"
EDITS = {
    "qweight": lambda st: st.pop(f"{LAYER}.qweight"),
    "scales": lambda st: st.pop(f"{LAYER}.scales"),
    "qzeros": lambda st: st.pop(f"{LAYER}.qzeros"),
}
MISSHAPEN = lambda st: st.update({f"{LAYER}.qzeros": st[f"{LAYER}.qzeros"][:1].contiguous()})  # noqa: E731


@pytest.mark.parametrize("tensor", sorted(EDITS))
@pytest.mark.parametrize("loader", ["from_pretrained", "load_quantized"])
def test_missing_or_misshapen_tensor_is_an_error_naming_the_layer(checkpoint, tmp_path, tensor, loader):
    from transformers import AutoModelForCausalLM

    out = _broken(checkpoint, tmp_path, EDITS[tensor])
    load = (lambda: AutoModelForCausalLM.from_pretrained(out)) if loader == "from_pretrained" else \
        (lambda: load_quantized(str(out)))
    with pytest.raises(ValueError, match=rf"quantized layer '{LAYER}': the checkpoint has no {tensor} "):
        load()


def test_misshapen_tensor_is_refused_even_when_mismatches_are_ignored(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _broken(checkpoint, tmp_path, MISSHAPEN)
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # transformers refuses by itself
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match=rf"quantized layer '{LAYER}': the checkpoint has no qzeros of the right shape"):
        AutoModelForCausalLM.from_pretrained(out, ignore_mismatched_sizes=True)


def test_complete_checkpoint_still_loads(checkpoint):
    model = load_quantized(str(checkpoint))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
