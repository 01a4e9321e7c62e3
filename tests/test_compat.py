"""Known upstream breaks: a family is refused on exactly the broken releases, with the version and the fix."""

import pytest

from auto_round import AutoRoundMLLM, compat
from auto_round.compat import LLAMA4_IMAGE_OUTPUTS, UpstreamBreak, UpstreamBreakError, active_break
from auto_round.mllm.families import FAMILIES, family_for
from tiny_vlms import FAMILIES as TINY


def _versions(**pins):
    return lambda package: pins.get(package)


@pytest.mark.parametrize("version,broken", [("5.24.0", True), ("5.23.0", False), ("5.24.1", False),
                                            ("4.57.6", False), (None, False)])
def test_llama4_break_matches_only_5_24_0(version, broken):
    why = active_break("llama4", (LLAMA4_IMAGE_OUTPUTS,), _versions(transformers=version))
    assert (why is not None) == broken
    if broken:
        assert "transformers 5.24.0" in why and "pip install 'transformers<5.24'" in why and "image_outputs" in why


def test_llama4_family_carries_the_break_and_no_other_family_does():
    assert family_for("llama4").upstream_breaks == (LLAMA4_IMAGE_OUTPUTS,)
    assert [f.name for f in FAMILIES if f.upstream_breaks] == ["llama4"]


def test_autoround_mllm_refuses_llama4_on_the_broken_release(monkeypatch):
    vlm = TINY["llama4"]()
    monkeypatch.setattr(compat, "installed_version", _versions(transformers="5.24.0"))
    with pytest.raises(UpstreamBreakError, match=r"transformers 5\.24\.0.*pip install 'transformers<5\.24'"):
        AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, iters=0)
    monkeypatch.setattr(compat, "installed_version", _versions(transformers="5.23.0"))
    assert AutoRoundMLLM(vlm.model, vlm.tokenizer, vlm.processor, iters=0).family.name == "llama4"


def test_a_range_of_versions():
    brk = UpstreamBreak("torch", ">=2.20,<2.21", "symptom", "pip install 'torch<2.20'")
    assert brk.matches("2.20.0") and brk.matches("2.20.3") and not brk.matches("2.21.0")
    assert not brk.matches("2.19.9") and not brk.matches(None)
