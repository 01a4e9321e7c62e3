"""Block-input capture: what every block receives, with and without pass-through blocks.

Pass-through (the default) runs the blocks only for the first batch; the captured hidden states,
arguments and loss masks must be exactly those of running every block for real, for every family.
"""

from __future__ import annotations

import pytest
import torch

from auto_round.calib.cache import capture_block_inputs
from auto_round.mllm.families import family_for, resolve_family_blocks
from tiny_models import tiny_llama, tiny_opt, tiny_qwen2
from tiny_vlms import FAMILIES, make_image

CPU = torch.device("cpu")


def _same(a, b) -> bool:
    """Exact equality of captured inputs: tensors by dtype, shape and values; containers element-wise; any other
    value by type and ``==``, except objects that define no ``__eq__`` (cache stand-ins...): by type and state
    (``vars()``, compared the same way), or by identity when they have no ``__dict__``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):  # also keeps False from matching 0, or a list a tuple
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):
        return a is b or _same(vars(a), vars(b))
    return bool(a == b)


class _Opaque:
    """Stands in for a captured object without ``__eq__`` (e.g. a cache object)."""

    def __init__(self, **state):
        self.__dict__.update(state)


def test_same_rejects_differing_values():
    """The comparison used below can fail on every kind of captured value, not only on tensors."""
    t = torch.ones(2)
    assert _same({"x": t, "flag": False, "cache": _Opaque(n=1, t=t)}, {"x": t.clone(), "flag": False,
                                                                        "cache": _Opaque(n=1, t=t.clone())})
    assert _same(None, None) and _same((1, "a"), (1, "a"))
    assert not _same({"flag": False}, {"flag": True})
    assert not _same({"output_hidden_states": -2}, {"output_hidden_states": -1})
    assert not _same(0, False) and not _same(None, False) and not _same((1,), [1]) and not _same("a", "b")
    assert not _same(_Opaque(n=1), _Opaque(n=2)) and not _same(_Opaque(t=t), _Opaque(t=t * 2))
    assert not _same(_Opaque(n=1), object()) and not _same({"a": 1}, {"b": 1})
    assert not _same(t, t.double()) and not _same(t, t[:1]) and not _same(t, None)


def _compare(model, path, batches):
    blocks = list(model.get_submodule(path))
    calls = []
    probe = next(m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear))
    handle = probe.register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = capture_block_inputs(model, blocks, batches, CPU)
        n_fast = len(calls)
        full = capture_block_inputs(model, blocks, batches, CPU, pass_through=False)
    finally:
        handle.remove()
    assert all("forward" not in b.__dict__ for b in blocks), "a pass-through was left in place"
    assert len(fast) == len(full) == len(batches)
    for f, r in zip(fast, full):
        assert _same(f.hidden, r.hidden) and _same(f.loss_mask, r.loss_mask)
        assert _same(f.block_args, r.block_args), path
        assert _same(f.block_kwargs, r.block_kwargs), path
    return n_fast, len(calls) - n_fast


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_opt])
def test_text_models_capture_the_same_and_skip_the_blocks(factory):
    model = factory(layers=3)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 512, (2, 12), generator=g),
                "attention_mask": torch.tensor([[1] * 12, [0] * 3 + [1] * 9])} for _ in range(3)]
    path = "model.decoder.layers" if factory is tiny_opt else "model.layers"
    fast_calls, full_calls = _compare(model, path, batches)
    # block 0 runs for real on the first batch only; the last block never runs
    assert fast_calls == 1 and full_calls == 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vlm_families_capture_the_same_with_pass_through(name):
    if name == "smolvlm":
        pytest.importorskip("num2words")
    vlm = FAMILIES[name]()
    fam = family_for(vlm.model.config.model_type, getattr(vlm.model.config, "architectures", None) or ())
    text, vision, _ = resolve_family_blocks(vlm.model, fam)
    batches = []
    for i, prompt in enumerate(["What is shown?", "Describe it in detail, please.", "Colors?"]):
        inputs = vlm.inputs([prompt], images=[make_image(vlm.image_size, seed=i)])
        batches.append(dict(inputs))
    for path in [text] + [v for v in vision if len(vlm.model.get_submodule(v)) > 1]:
        _compare(vlm.model, path, batches)


def test_instance_level_forward_wrappers_are_kept():
    """accelerate's dispatch hooks replace ``block.forward`` on the instance; capture must put them back."""
    model = tiny_llama(layers=3)
    blocks = list(model.model.layers)
    calls = []
    for b in blocks:
        original = b.forward

        def wrapped(*args, _orig=original, **kwargs):
            calls.append(1)
            return _orig(*args, **kwargs)

        b.forward = wrapped
    wrappers = [b.__dict__["forward"] for b in blocks]
    batches = [{"input_ids": torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    capture_block_inputs(model, blocks, batches, CPU)
    assert [b.__dict__.get("forward") for b in blocks] == wrappers
    calls.clear()
    model(input_ids=batches[0]["input_ids"])
    assert len(calls) == 3  # the wrappers run again after the capture
