"""Output folders: nothing the user owns is deleted; every output-path problem is found before tuning."""

import json
import os

import pytest

from auto_round import AutoRound
from auto_round.export import folder as folder_mod
from auto_round.export.folder import MANIFEST, ForeignFilesError, OutputDirError
from tiny_models import tiny_llama
from tokenizer_fixture import make_tokenizer

RTN = dict(bits=4, group_size=32, iters=0, disable_opt_rtn=True)
TUNE = dict(bits=4, group_size=32, iters=1, nsamples=2, seqlen=16, batch_size=2, dataset="auto_round:offline_corpus")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    parent = tmp_path_factory.mktemp("p")
    d = parent / "m"
    tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def _quantized():
    return AutoRound(tiny_llama(), make_tokenizer(), **RTN).quantize()


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_rerun_into_an_earlier_checkpoint_keeps_the_users_files(tmp_path):
    out = tmp_path / "ckpt"
    _quantized().save_quantized(out, inplace=False)
    (out / "notes.txt").write_text("my evaluation notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append("model-00002-of-00002.safetensors")  # a file an earlier run of ours wrote
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    _quantized().save_quantized(out, inplace=False)
    assert (out / "notes.txt").read_text() == "my evaluation notes"
    assert (out / "eval" / "results.json").read_text() == "{}"
    assert not (out / "model-00002-of-00002.safetensors").exists()  # ours, not written again: replaced
    assert "notes.txt" not in json.loads((out / MANIFEST).read_text())["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_source_folder_and_its_surroundings_are_refused_before_tuning(model_dir, where):
    before = _tree(model_dir.parent)
    out = {"parent": model_dir.parent, "same": model_dir, "inside": model_dir / "q"}[where]
    ar = AutoRound(str(model_dir), **TUNE)
    with pytest.raises(OutputDirError, match="source model's folder"):
        ar.quantize_and_save(out, overwrite=True)
    assert not ar.quantized_layers  # refused before tuning
    assert _tree(model_dir.parent) == before


def test_source_folder_through_a_symlink_is_refused(model_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(model_dir.parent, target_is_directory=True)
    ar = AutoRound(str(model_dir), **TUNE)
    with pytest.raises(OutputDirError, match="contains the source model's folder"):
        ar.quantize_and_save(link, overwrite=True)


def test_folder_of_yours_is_refused_before_tuning_then_written_with_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text('{"mine": true}')
    ar = AutoRound(tiny_llama(), make_tokenizer(), **TUNE)
    with pytest.raises(ForeignFilesError, match="not written by auto_round.*notes.txt"):
        ar.quantize_and_save(mine, inplace=False)
    assert not ar.quantized_layers and (mine / "notes.txt").read_text() == "precious"
    ar.quantize_and_save(mine, inplace=False, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"  # kept
    assert "quantization_config" in json.loads((mine / "config.json").read_text())  # same name: replaced


@pytest.mark.parametrize("case", ["file", "parent_is_file"])
def test_a_file_in_the_way_is_refused_before_tuning(tmp_path, case):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if case == "file" else tmp_path / "f" / "q"
    ar = AutoRound(tiny_llama(), make_tokenizer(), **TUNE)
    with pytest.raises(OutputDirError, match="is a file"):
        ar.quantize_and_save(out)
    assert not ar.quantized_layers


def test_unwritable_parent_is_refused_before_tuning(tmp_path, monkeypatch):
    """As root every folder is writable, so the permission answer is simulated."""
    monkeypatch.setattr(folder_mod.os, "access", lambda path, mode: False)
    ar = AutoRound(tiny_llama(), make_tokenizer(), **TUNE)
    with pytest.raises(OutputDirError, match="no write permission"):
        ar.quantize_and_save(tmp_path / "q")
    assert not ar.quantized_layers


def test_too_little_free_space_is_refused_before_tuning(tmp_path, monkeypatch):
    usage = type("Usage", (), {"total": 10**9, "used": 10**9, "free": 1000})
    monkeypatch.setattr(folder_mod.shutil, "disk_usage", lambda path: usage)
    ar = AutoRound(tiny_llama(), make_tokenizer(), **TUNE)
    with pytest.raises(OutputDirError, match="0 MiB free, the checkpoint needs about"):
        ar.quantize_and_save(tmp_path / "q")
    assert not ar.quantized_layers


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".q.partial-999999999"
    alive = tmp_path / f".q.partial-{os.getppid()}"
    for d in (dead, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    _quantized().save_quantized(tmp_path / "q", inplace=False)
    assert not dead.exists() and alive.exists()


def test_failed_save_keeps_the_earlier_checkpoint_and_your_files(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    _quantized().save_quantized(out, inplace=False)
    (out / "notes.txt").write_text("keep me")
    before = _tree(out)
    ar = _quantized()
    monkeypatch.setattr(ar, "save_extra_files", lambda folder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ar.save_quantized(out, inplace=False)
    assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
