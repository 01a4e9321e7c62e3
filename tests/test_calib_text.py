"""Tests of text calibration data (auto_round.calib.text), the offline corpus and the test tokenizer.

All offline: the hub loader is monkeypatched wherever a hub name is used.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from auto_round.calib import text as calib_text
from auto_round.calib.text import (
    DEFAULT_DATASET,
    OFFLINE_CORPUS,
    build_samples,
    get_text_calibration,
    parse_dataset_spec,
)
from tokenizer_fixture import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src/auto_round/calib/data/offline_corpus.txt"
WORDS_A = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
WORDS_B = "red green blue cyan magenta yellow black white orange purple".split()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def prose(words: list[str], n_words: int, seed: int) -> str:
    """A deterministic pseudo-sentence of ``n_words`` words drawn from ``words``."""
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words)) + "."


def write_txt(path: Path, paragraphs: list[str]) -> Path:
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def fake_offline_hub(monkeypatch) -> list[tuple]:
    """Make datasets.load_dataset fail as it does offline; return the list of calls it got."""
    import datasets

    calls = []

    def offline(name, split=None, **kwargs):
        calls.append((name, split))
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    return calls


# ------------------------------------------------------------------------------------ local files


def test_txt_paragraphs_give_samples_with_bos_and_ones_mask(tok, tmp_path):
    path = write_txt(tmp_path / "a.txt", [prose(WORDS_A, 200, i) for i in range(6)])
    cs = get_text_calibration(tok, str(path), nsamples=4, seqlen=64)
    assert cs.input_ids.shape == (4, 64) and cs.input_ids.dtype == torch.long
    assert torch.equal(cs.attention_mask, torch.ones_like(cs.input_ids))
    # the fixture tokenizer adds BOS itself, so every sample starts with it
    assert (cs.input_ids[:, 0] == tok.bos_token_id).all()
    assert cs.sources == (str(path),) and cs.description == str(path)
    assert len(cs) == 4


def test_short_texts_are_joined_not_dropped(tok, tmp_path):
    paragraphs = [prose(WORDS_A, 5 + i % 7, i) for i in range(60)]
    path = write_txt(tmp_path / "short.txt", paragraphs)
    seqlen = 48
    lengths = [n_tokens(tok, p) for p in paragraphs]
    assert max(lengths) < seqlen - 1, "test needs every text shorter than one sample"
    stream = sum(lengths) + (len(paragraphs) - 1)  # one EOS between joined texts
    expected = stream // (seqlen - 1)  # one BOS per sample
    assert expected >= 3
    cs = get_text_calibration(tok, str(path), nsamples=1000, seqlen=seqlen)
    assert len(cs) == expected
    # every sample is longer than any text, so each one holds a join (EOS) of two texts
    assert (cs.input_ids[:, 1:] == tok.eos_token_id).any(dim=1).all()


def test_long_text_gives_a_seeded_window_of_it(tok, tmp_path):
    text = prose(WORDS_A, 400, 0)
    path = write_txt(tmp_path / "long.txt", [text])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seqlen = 32
    windows = set()
    for seed in range(5):
        row = get_text_calibration(tok, str(path), nsamples=1, seqlen=seqlen, seed=seed).input_ids[0].tolist()
        body = row[1:]
        starts = [s for s in range(len(ids) - len(body) + 1) if ids[s : s + len(body)] == body]
        assert starts, "a sample must be a contiguous window of the long text"
        windows.add(tuple(body))
    assert len(windows) > 1, "different seeds should move the window"


def test_same_seed_same_samples_other_seed_differs(tok, tmp_path):
    path = write_txt(tmp_path / "d.txt", [prose(WORDS_A, 10 + i, i) for i in range(80)])
    first = get_text_calibration(tok, str(path), nsamples=6, seqlen=40, seed=7).input_ids
    again = get_text_calibration(tok, str(path), nsamples=6, seqlen=40, seed=7).input_ids
    other = get_text_calibration(tok, str(path), nsamples=6, seqlen=40, seed=8).input_ids
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_jsonl_text_field_and_text_column_option(tok, tmp_path):
    rows = [{"text": prose(WORDS_A, 60, i), "body": prose(WORDS_B, 60, i)} for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    default = get_text_calibration(tok, str(path), nsamples=2, seqlen=32)
    assert "alpha" in tok.decode(default.input_ids[0]) or "beta" in tok.decode(default.input_ids[0])
    chosen = get_text_calibration(tok, f"{path}:text_column=body", nsamples=2, seqlen=32)
    decoded = tok.decode(chosen.input_ids.flatten())
    assert not any(word in decoded for word in WORDS_A)
    assert chosen.description == f"{path}:text_column=body"


@pytest.mark.parametrize(
    "payload",
    [
        [prose(WORDS_A, 40, i) for i in range(4)],
        [{"text": prose(WORDS_A, 40, i)} for i in range(4)],
        {"data": [{"text": prose(WORDS_A, 40, i)} for i in range(4)], "meta": "x"},
        {"text": [prose(WORDS_A, 40, i) for i in range(4)], "other": [1, 2]},
    ],
    ids=["list-of-strings", "list-of-objects", "object-with-one-list", "object-with-text-list"],
)
def test_json_shapes(tok, tmp_path, payload):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    cs = get_text_calibration(tok, str(path), nsamples=3, seqlen=24)
    assert cs.input_ids.shape == (3, 24)


def test_json_ambiguous_object_names_its_lists(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": ["x y z"], "b": ["u v w"]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.json.*\['a', 'b'\].*text_column"):
        get_text_calibration(tok, str(path), nsamples=1, seqlen=8)


def test_parquet_if_pyarrow(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(4)), "content": [prose(WORDS_A, 50, i) for i in range(4)]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    cs = get_text_calibration(tok, str(path), nsamples=3, seqlen=32)  # first string column: content
    assert cs.input_ids.shape == (3, 32)
    with pytest.raises(ValueError, match="text_column='nope'.*columns"):
        get_text_calibration(tok, f"{path}:text_column=nope", nsamples=1, seqlen=8)


def test_directory_of_txt_files(tok, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_txt(folder / "one.txt", [prose(WORDS_A, 40, i) for i in range(3)])
    write_txt(folder / "sub" / "two.txt", [prose(WORDS_B, 40, i) for i in range(3)])
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    cs = get_text_calibration(tok, str(folder), nsamples=100, seqlen=16)
    decoded = tok.decode(cs.input_ids.flatten())
    assert any(w in decoded for w in WORDS_A) and any(w in decoded for w in WORDS_B)
    assert cs.sources == (str(folder),)


def test_comma_list_with_num_option(tok, tmp_path):
    a = write_txt(tmp_path / "a.txt", [prose(WORDS_A, 300, i) for i in range(10)])
    b = write_txt(tmp_path / "b.txt", [prose(WORDS_B, 300, i) for i in range(10)])
    cs = get_text_calibration(tok, f"{a}:num=2,{b}", nsamples=5, seqlen=24)
    assert len(cs) == 5 and cs.sources == (str(a), str(b))
    from_a = sum(any(w in tok.decode(row) for w in WORDS_A) for row in cs.input_ids)
    assert from_a == 2
    assert cs.description == f"{a}:num=2,{b}"


def test_even_split_and_shortfall_moves_to_later_sources(tok, tmp_path):
    small = write_txt(tmp_path / "small.txt", [prose(WORDS_A, 40, 0)])  # one window only
    big = write_txt(tmp_path / "big.txt", [prose(WORDS_B, 300, i) for i in range(10)])
    even = get_text_calibration(tok, f"{big},{big}", nsamples=5, seqlen=24)
    assert len(even) == 5
    cs = get_text_calibration(tok, f"{small},{big}", nsamples=6, seqlen=24)
    assert len(cs) == 6
    from_small = sum(any(w in tok.decode(row) for w in WORDS_A) for row in cs.input_ids)
    assert from_small == 1


def test_too_few_samples_warns_with_counts(tok, tmp_path, caplog):
    path = write_txt(tmp_path / "few.txt", [prose(WORDS_A, 300, i) for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="auto_round.calib.text"):
        cs = get_text_calibration(tok, str(path), nsamples=10, seqlen=32)
    assert len(cs) == 3
    assert "only 3 calibration samples" in caplog.text and "nsamples=10" in caplog.text


def test_zero_samples_raises_with_counts_and_fix(tok, tmp_path):
    path = write_txt(tmp_path / "tiny.txt", ["one two three", "four five"])
    with pytest.raises(ValueError, match=r"2 texts with \d+ tokens.*Lower seqlen or add more text"):
        get_text_calibration(tok, str(path), nsamples=4, seqlen=2048)


# ------------------------------------------------------------------------------------ bad input


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine line"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: invalid JSON"):
        get_text_calibration(tok, str(path), nsamples=1, seqlen=8)


def test_jsonl_missing_field_names_line_and_field(tok, tmp_path):
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield\.jsonl, line 2: no field 'text'.*\['body'\]"):
        get_text_calibration(tok, str(path), nsamples=1, seqlen=8)


def test_missing_file_names_the_path(tok, tmp_path):
    missing = tmp_path / "nowhere" / "calib.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nowhere/calib\.jsonl"):
        get_text_calibration(tok, str(missing), nsamples=1, seqlen=8)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_empty_file_says_so(tok, tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("[]" if suffix == ".json" else "\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"empty{suffix} is empty"):
        get_text_calibration(tok, str(path), nsamples=1, seqlen=8)


def test_unsupported_suffix_and_bad_options(tok, tmp_path):
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported type '\.csv'"):
        get_text_calibration(tok, str(odd), nsamples=1, seqlen=8)
    with pytest.raises(ValueError, match=r"num='x'"):
        parse_dataset_spec("a.txt:num=x")
    with pytest.raises(ValueError, match="unknown option 'foo=1'"):
        parse_dataset_spec("a.txt:foo=1")
    with pytest.raises(ValueError, match="nsamples=0"):
        get_text_calibration(tok, OFFLINE_CORPUS, nsamples=0, seqlen=8)


def test_parse_keeps_colons_of_split_slices():
    (spec,) = parse_dataset_spec("org/set:split=train[:100]:num=3:text_column=body")
    assert (spec.name, spec.split, spec.num, spec.text_column) == ("org/set", "train[:100]", 3, "body")
    (corpus,) = parse_dataset_spec(OFFLINE_CORPUS)
    assert corpus.name == OFFLINE_CORPUS


# ------------------------------------------------------------------------------------ hub + fallback


def test_default_dataset_offline_falls_back_with_warning(tok, monkeypatch, caplog):
    calls = fake_offline_hub(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="auto_round.calib.text"):
        cs = get_text_calibration(tok, nsamples=4, seqlen=64)
    assert calls == [(DEFAULT_DATASET, "train")]
    assert cs.sources == (OFFLINE_CORPUS,) and cs.description == OFFLINE_CORPUS
    assert cs.input_ids.shape == (4, 64)
    assert "could not load the default calibration data set" in caplog.text
    assert "OfflineModeIsEnabled" in caplog.text and "dataset='/path/to/calib.txt'" in caplog.text


def test_default_dataset_offline_without_fallback_raises(tok, monkeypatch):
    fake_offline_hub(monkeypatch)
    with pytest.raises(RuntimeError, match="NeelNanda/pile-10k.*local .txt"):
        get_text_calibration(tok, nsamples=1, seqlen=8, allow_offline_fallback=False)


def test_other_hub_name_offline_is_a_clear_error(tok, monkeypatch):
    fake_offline_hub(monkeypatch)
    with pytest.raises(RuntimeError, match=r"'someone/their-set'.*ConnectionError.*local .txt/.jsonl"):
        get_text_calibration(tok, "someone/their-set", nsamples=1, seqlen=8)


def test_hub_set_uses_split_and_first_string_column(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None, **kwargs):
        calls.append((name, split))
        texts = [prose(WORDS_A, 80, i) for i in range(3)]
        return datasets.Dataset.from_dict({"id": [1, 2, 3], "content": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cs = get_text_calibration(tok, "org/set:split=validation[:3]", nsamples=2, seqlen=32)
    assert calls == [("org/set", "validation[:3]")]
    assert cs.sources == ("org/set",) and len(cs) == 2


def test_library_does_not_write_environment(tok, tmp_path):
    before = dict(os.environ)
    path = write_txt(tmp_path / "a.txt", [prose(WORDS_A, 100, 0)])
    get_text_calibration(tok, str(path), nsamples=1, seqlen=16)
    assert dict(os.environ) == before


# ------------------------------------------------------------------------------------ helpers


def test_build_samples_without_bos_counts_tokens():
    texts = [[1] * 3, [2] * 4, [3] * 2, [4] * 20]
    samples = build_samples(iter(texts), quota=10, seqlen=5, bos=[], separator=[9], rng=random.Random(0))
    # 3 + 1 + 4 + 1 + 2 = 11 joined tokens give two samples (the last "3" is left over);
    # the 20-token text gives one window
    assert samples == [[1, 1, 1, 9, 2], [2, 2, 2, 9, 3], [4] * 5]


# ------------------------------------------------------------------------------------ corpus + tokenizer


def test_offline_corpus_is_shipped_and_sized():
    size = CORPUS.stat().st_size
    assert 300_000 <= size <= 600_000
    paragraphs = calib_text.offline_corpus_texts()
    assert len(paragraphs) > 1000 and all("\n" not in p for p in paragraphs)


def test_offline_corpus_matches_its_generator():
    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip("offline_corpus.txt was generated from Python 3.11.7's pydoc_data")
    script = REPO / "scripts/build_offline_corpus.py"
    spec = importlib.util.spec_from_file_location("build_offline_corpus", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_corpus() == CORPUS.read_text(encoding="utf-8")


def test_tokenizer_fixture(tok):
    assert make_tokenizer() is tok
    assert len(tok) <= 512
    ids = tok("The class statement defines a class.")["input_ids"]
    assert ids[0] == tok.bos_token_id and max(ids) < 512
    assert {tok.eos_token_id, tok.unk_token_id, tok.pad_token_id} <= set(range(512))
    messages = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith(tok.bos_token) and chat.endswith("<|assistant|>\n")
    assert len(make_tokenizer(300)) <= 300


def test_unreachable_hub_falls_back_at_once_without_waiting_for_retries(tok, monkeypatch, caplog):
    import socket

    calls = fake_offline_hub(monkeypatch)  # (sets the offline variables: removed just below)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    probed = []

    def refuse(address, timeout=None):
        probed.append((address, timeout))
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with caplog.at_level(logging.WARNING, logger="auto_round.calib.text"):
        cs = get_text_calibration(tok, nsamples=2, seqlen=32)
    assert probed == [(("hub.example", 8443), calib_text.HUB_PROBE_TIMEOUT_S)]
    assert calls == []  # datasets was never asked: no retry loop
    assert cs.sources == (OFFLINE_CORPUS,)
    assert "unreachable" in caplog.text and "HF_HUB_OFFLINE=1" in caplog.text


def test_offline_env_skips_the_probe_and_uses_the_datasets_cache(tok, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the Hub while offline"))
    calls = fake_offline_hub(monkeypatch)
    get_text_calibration(tok, nsamples=2, seqlen=32)
    assert calls == [(DEFAULT_DATASET, "train")]


def test_no_probe_behind_a_proxy(tok, monkeypatch):
    import socket

    calls = fake_offline_hub(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed past the proxy"))
    get_text_calibration(tok, nsamples=2, seqlen=32)
    assert calls == [(DEFAULT_DATASET, "train")]  # datasets decides, through the proxy
