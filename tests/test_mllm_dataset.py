"""Tests of image-text calibration samples (auto_round.mllm.dataset) and the shipped image set.

All offline: the Hugging Face Hub download is monkeypatched wherever a LLaVA name is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from auto_round.mllm import dataset as mllm_dataset
from auto_round.mllm.dataset import (
    DATA_DIR,
    LLAVA_DATASETS,
    OFFLINE_IMAGE_TEXT,
    ImageTextSample,
    load_image_text_samples,
    parse_extra_data_dir,
)

REPO = Path(__file__).resolve().parents[1]
LOGGER = "auto_round.mllm.dataset"


def entry(entry_id: str, image: str | None = "a.jpg", question: str = "What is this?") -> dict:
    """One LLaVA-Instruct entry; ``image=None`` gives a text-only entry."""
    record = {
        "id": entry_id,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": f"An answer for {entry_id}."},
        ],
    }
    if image is not None:
        record["image"] = image
    return record


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """Write a small JPEG at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --- the shipped set -------------------------------------------------------------------------


def test_builtin_set_loads_and_is_well_formed():
    samples, description = load_image_text_samples(OFFLINE_IMAGE_TEXT)
    assert description == OFFLINE_IMAGE_TEXT
    assert len(samples) >= 30
    assert len({s.id for s in samples}) == len(samples), "ids must be unique"
    per_image: dict[str, int] = {}
    for sample in samples:
        assert sample.image is not None and sample.image.parent == DATA_DIR
        per_image[sample.image.name] = per_image.get(sample.image.name, 0) + 1
        roles = [role for role, _ in sample.turns]
        assert "user" in roles and "assistant" in roles
        assert roles[0] == "user"
        for _, text in sample.turns:
            assert text and "<image>" not in text and text == text.strip()
    assert 8 <= len(per_image) <= 12
    assert all(3 <= n <= 5 for n in per_image.values()), per_image


def test_builtin_images_open_small_and_documented():
    shipped = sorted(DATA_DIR.glob("*.jpg"))
    readme = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    records = json.loads((DATA_DIR / "offline_image_text.json").read_text(encoding="utf-8"))
    assert {r["image"] for r in records} == {p.name for p in shipped}, "every image used, none unused"
    for path in shipped:
        assert path.stat().st_size <= 40_000, path
        assert f"`{path.name}`" in readme, f"{path.name} has no license row in the README"
        image = ImageTextSample(path.stem, path, (("user", "q"), ("assistant", "a"))).load_image()
        assert image.mode == "RGB" and max(image.size) <= 336


def test_builtin_ignores_extra_data_dir_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        samples, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, extra_data_dir=tmp_path, nsamples=2)
    assert len(samples) == 2 and samples[0].image.parent == DATA_DIR
    assert "ignored" in caplog.text


def test_load_image_converts_gray_to_rgb_and_rejects_text_only():
    gray = ImageTextSample("cam", DATA_DIR / "camera.jpg", (("user", "q"),))
    assert Image.open(gray.image).mode == "L"
    assert gray.load_image().mode == "RGB"
    with pytest.raises(ValueError, match="text-only"):
        ImageTextSample("t", None, (("user", "q"),)).load_image()


# --- local files -----------------------------------------------------------------------------


def test_local_json_with_images_beside_it(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "sub" / "b.png")
    data = write_json(
        tmp_path / "data.json",
        [entry("1"), entry("2", "sub/b.png", "Describe it."), entry("3", image=None)],
    )
    samples, description = load_image_text_samples(str(data))
    assert description == str(data)
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert samples[0].image == (tmp_path / "a.jpg").absolute()
    assert samples[1].turns == (("user", "Describe it."), ("assistant", "An answer for 2."))
    assert samples[2].image is None
    assert samples[1].load_image().size == (16, 12)


def test_local_jsonl_with_extra_data_dir_plain_and_image_syntax(tmp_path):
    images = tmp_path / "coco"
    write_image(images / "a.jpg")
    lines = [json.dumps(entry("x")), "", json.dumps(entry("y", "a.jpg", "<image> Other?"))]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for extra in (images, str(images), f"image={images}"):
        samples, _ = load_image_text_samples(data, extra_data_dir=extra)
        assert [s.id for s in samples] == ["x", "y"]
        assert samples[1].turns[0] == ("user", "Other?")
        assert samples[0].image == (images / "a.jpg").absolute()


def test_parse_extra_data_dir_forms(tmp_path):
    assert parse_extra_data_dir(None) is None
    assert parse_extra_data_dir("image=/x/y") == Path("/x/y")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_extra_data_dir(str(odd)) == odd
    with pytest.raises(ValueError, match="'video'"):
        parse_extra_data_dir("image=/x,video=/v")


def test_entries_without_id_get_file_based_ids(tmp_path):
    write_image(tmp_path / "a.jpg")
    record = entry("unused")
    del record["id"]
    data = write_json(tmp_path / "d.json", [record])
    samples, _ = load_image_text_samples(data)
    assert samples[0].id == "d.json#0"


# --- missing images --------------------------------------------------------------------------


def test_missing_images_are_skipped_with_warning(tmp_path, caplog):
    write_image(tmp_path / "a.jpg")
    data = write_json(
        tmp_path / "d.json",
        [entry("ok"), entry("gone1", "nope1.jpg"), entry("gone2", "nope2.jpg"), entry("txt", None)],
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        samples, _ = load_image_text_samples(data)
    assert [s.id for s in samples] == ["ok", "txt"]
    assert "skipping 2 of 3" in caplog.text
    assert "nope1.jpg" in caplog.text


def test_all_images_missing_is_an_error_naming_the_folder(tmp_path):
    data = write_json(tmp_path / "d.json", [entry("1", "x.jpg"), entry("2", "y.jpg"), entry("t", None)])
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(FileNotFoundError, match="extra_data_dir") as info:
        load_image_text_samples(data, extra_data_dir=images)
    assert str(images) in str(info.value) and "x.jpg" in str(info.value)


# --- security and malformed input ------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../outside.jpg", "sub/../../outside.jpg", "/etc/passwd"])
def test_image_path_escaping_the_folder_is_rejected(tmp_path, bad):
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    write_image(tmp_path / "outside.jpg")
    data = write_json(tmp_path / "d.json", [entry("ok"), entry("evil", bad)])
    with pytest.raises(ValueError, match="'evil'") as info:
        load_image_text_samples(data, extra_data_dir=images)
    assert bad in str(info.value)


def test_absolute_image_path_inside_the_folder_is_accepted(tmp_path):
    path = write_image(tmp_path / "a.jpg")
    data = write_json(tmp_path / "d.json", [entry("abs", str(path))])
    samples, _ = load_image_text_samples(data)
    assert samples[0].image == path


def test_malformed_json_names_the_file(tmp_path):
    data = tmp_path / "bad.json"
    data.write_text('[{"id": "1", "conversations": [}', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        load_image_text_samples(data)
    not_a_list = write_json(tmp_path / "obj.json", {"id": "1"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list"):
        load_image_text_samples(not_a_list)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(entry("1")) + "\n{not json}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        load_image_text_samples(data)


def test_missing_conversations_and_unknown_role_name_the_entry(tmp_path):
    data = write_json(tmp_path / "d.json", [{"id": "no-conv", "image": "a.jpg"}])
    with pytest.raises(ValueError, match="'no-conv'.*conversations"):
        load_image_text_samples(data)
    record = entry("bad-role")
    record["conversations"][1]["from"] = "robot"
    data = write_json(tmp_path / "d2.json", [record])
    with pytest.raises(ValueError, match="'bad-role'.*'robot'"):
        load_image_text_samples(data)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not an image-text data set"):
        load_image_text_samples("NeelNanda/pile-10k")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_image_text_samples(str(tmp_path / "nothere.json"))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nsamples"):
            load_image_text_samples(OFFLINE_IMAGE_TEXT, nsamples=bad)


# --- LLaVA hub names -------------------------------------------------------------------------


def test_llava_name_offline_gives_clear_error(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for name in LLAVA_DATASETS:
        with pytest.raises(RuntimeError) as info:
            load_image_text_samples(name, extra_data_dir=tmp_path)
        message = str(info.value)
        assert "dataset=" in message and "extra_data_dir" in message and "train2017" in message
        assert "no network" in message


def test_llava_name_needs_image_folder_before_download(monkeypatch):
    calls = []
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw))
    with pytest.raises(ValueError, match="extra_data_dir"):
        load_image_text_samples(LLAVA_DATASETS[0])
    assert calls == []


def test_llava_name_with_downloaded_file(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    images = tmp_path / "train2017"
    write_image(images / "000000000009.jpg")
    data = write_json(tmp_path / "llava_instruct_80k.json", [entry("9", "000000000009.jpg")])
    seen = {}

    def fake_download(**kwargs):
        seen.update(kwargs)
        return str(data)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    samples, description = load_image_text_samples("liuhaotian/llava_instruct_80k", extra_data_dir=images)
    assert description == "liuhaotian/llava_instruct_80k"
    assert seen == {
        "repo_id": "liuhaotian/LLaVA-Instruct-150K",
        "repo_type": "dataset",
        "filename": "llava_instruct_80k.json",
    }
    assert samples[0].image == (images / "000000000009.jpg").absolute()


# --- nsamples --------------------------------------------------------------------------------


def test_nsamples_subset_is_seeded_and_deterministic():
    first, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, nsamples=7, seed=3)
    again, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, nsamples=7, seed=3)
    other, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT, nsamples=7, seed=4)
    assert len(first) == 7 and first == again
    assert [s.id for s in first] != [s.id for s in other]
    everything = {s.id for s in load_image_text_samples(OFFLINE_IMAGE_TEXT)[0]}
    assert {s.id for s in first} <= everything


def test_nsamples_subset_skips_missing_images(tmp_path):
    write_image(tmp_path / "a.jpg")
    records = [entry(f"ok{i}") for i in range(5)] + [entry(f"gone{i}", f"g{i}.jpg") for i in range(5)]
    data = write_json(tmp_path / "d.json", records)
    samples, _ = load_image_text_samples(data, nsamples=4, seed=0)
    assert len(samples) == 4 and all(s.id.startswith("ok") for s in samples)


def test_nsamples_larger_than_available_warns(tmp_path, caplog):
    write_image(tmp_path / "a.jpg")
    data = write_json(tmp_path / "d.json", [entry("1"), entry("2")])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        samples, _ = load_image_text_samples(data, nsamples=10)
    assert len(samples) == 2
    assert "fewer than nsamples=10" in caplog.text


def test_module_docstring_counts_match_the_shipped_set():
    samples, _ = load_image_text_samples(OFFLINE_IMAGE_TEXT)
    images = {s.image for s in samples}
    assert f"{len(samples)} conversations about {len(images)} small" in " ".join(mllm_dataset.__doc__.split())
