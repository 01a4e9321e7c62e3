"""Image-text calibration samples in LLaVA-Instruct format, independent of any model.

Phase "build calibration data" of the lifecycle, for multimodal models. ``load_image_text_samples``
turns a data set description into a list of ``ImageTextSample`` (an image path and the
conversation turns); templates and processors turn those into model inputs later.

Accepted ``dataset`` values:

- ``auto_round:offline_image_text`` (``OFFLINE_IMAGE_TEXT``): 43 conversations about 11 small
  public-domain / CC0 images shipped in ``auto_round/mllm/data`` (see its README). Works offline.
- a local ``.json`` file holding a list of LLaVA-Instruct entries, or a ``.jsonl`` file with one
  entry per line. An entry looks like::

      {"id": "000000033471", "image": "000000033471.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                         {"from": "gpt", "value": "A bus."}]}

  Roles ``human``/``user`` become ``"user"`` and ``gpt``/``assistant`` become ``"assistant"``.
  The ``<image>`` placeholder is removed from the text (the template puts the model's own image
  token back). An entry without ``"image"`` is a text-only sample.
- one of ``LLAVA_DATASETS``: its JSON file is fetched from the Hugging Face Hub data set
  ``liuhaotian/LLaVA-Instruct-150K`` (needs ``huggingface_hub`` and network). Its images are
  COCO train2017 files and must already be on disk under ``extra_data_dir``; unlike the reference
  implementation nothing is downloaded image by image.

Images are looked up under ``extra_data_dir`` (a folder, or ``"image=<folder>"``), else beside the
data file. An image path in a data file must stay inside that folder: absolute paths elsewhere and
``..`` escapes are errors, so a data file cannot make the loader open arbitrary files.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

logger = logging.getLogger(__name__)

OFFLINE_IMAGE_TEXT = "auto_round:offline_image_text"
LLAVA_DATASETS = (
    "liuhaotian/llava_conv_58k",
    "liuhaotian/llava_instruct_80k",
    "liuhaotian/llava_instruct_150k",
)
LLAVA_HUB_REPO = "liuhaotian/LLaVA-Instruct-150K"
_LLAVA_FILES = {
    "liuhaotian/llava_conv_58k": "conv_58k.json",
    "liuhaotian/llava_instruct_80k": "llava_instruct_80k.json",
    "liuhaotian/llava_instruct_150k": "llava_instruct_150k.json",
}
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DATA_DIR = Path(__file__).resolve().parent / "data"
_OFFLINE_FILE = "offline_image_text.json"
_MISSING_SHOWN = 3  # how many missing image paths a warning lists

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ImageTextSample:
    """One calibration conversation.

    Attributes:
        id: the entry's ``"id"`` (or ``"<file name>#<index>"`` when the entry has none).
        image: absolute path of the image file, or None for a text-only sample.
        turns: ``(role, text)`` pairs in order, role ``"user"`` or ``"assistant"``; text has the
            ``<image>`` placeholder removed and surrounding white space stripped.
    """

    id: str
    image: Optional[Path]
    turns: tuple[tuple[str, str], ...]

    def load_image(self) -> Image.Image:
        """Open the image and return it as an RGB ``PIL.Image.Image``.

        Raises:
            ValueError: the sample is text-only.
        """
        if self.image is None:
            raise ValueError(f"sample {self.id!r} is text-only: it has no image to load")
        with Image.open(self.image) as image:
            return image.convert("RGB")


def load_image_text_samples(
    dataset: PathLike,
    extra_data_dir: Optional[PathLike] = None,
    nsamples: Optional[int] = None,
    seed: int = 42,
) -> tuple[list[ImageTextSample], str]:
    """Read image-text calibration samples.

    Args:
        dataset: ``OFFLINE_IMAGE_TEXT``, a path to a LLaVA-format ``.json``/``.jsonl`` file, or
            one of ``LLAVA_DATASETS`` (see the module docstring).
        extra_data_dir: folder holding the images, as a path or ``"image=<folder>"``. Defaults
            to the data file's folder. Not used for ``OFFLINE_IMAGE_TEXT``.
        nsamples: how many samples to return, chosen at random (seeded by ``seed``) among the
            entries whose image exists; None returns every entry in file order.
        seed: seed of the random choice; the same inputs and seed give the same samples.

    Returns:
        ``(samples, description)``; ``description`` names the data set for the saved config.

    Raises:
        ValueError: unknown dataset form, malformed file or entry, bad ``nsamples``, or an image
            path that leaves the image folder.
        FileNotFoundError: the data file, or every image it names, is missing.
        RuntimeError: a LLaVA data set that cannot be fetched from the Hugging Face Hub.
    """
    if nsamples is not None and (type(nsamples) is not int or nsamples < 1):
        raise ValueError(f"nsamples={nsamples!r} must be a positive integer, or None for all samples")
    image_dir = parse_extra_data_dir(extra_data_dir)
    data_file, image_dir, description = _resolve_source(dataset, image_dir)
    entries = [_parse_entry(*row) for row in _read_records(data_file)]
    if not entries:
        raise ValueError(f"{data_file} holds no entries; it needs at least one LLaVA conversation")
    samples = [
        ImageTextSample(entry_id, _resolve_image(image_dir, image, entry_id), turns)
        for entry_id, image, turns in entries
    ]
    order = list(range(len(samples)))
    if nsamples is not None:
        random.Random(seed).shuffle(order)
    chosen = _existing_samples([samples[i] for i in order], image_dir, nsamples)
    if nsamples is not None and len(chosen) < nsamples:
        logger.warning(
            "%s gives only %d usable image-text samples, fewer than nsamples=%d; using all %d",
            description, len(chosen), nsamples, len(chosen),
        )
    logger.info("loaded %d image-text calibration samples from %s", len(chosen), description)
    return chosen, description


def parse_extra_data_dir(extra_data_dir: Optional[PathLike]) -> Optional[Path]:
    """Return the image folder named by ``extra_data_dir``.

    Accepts a folder path or the reference syntax ``"image=<folder>"`` (a comma list of
    ``kind=folder`` items where only ``image`` is supported). An existing folder is always taken
    as a plain path, even when its name contains ``=``.
    """
    if extra_data_dir is None:
        return None
    text = os.fspath(extra_data_dir)
    if not isinstance(text, str) or "=" not in text or Path(text).is_dir():
        return Path(text)
    folders: dict[str, str] = {}
    for item in text.split(","):
        kind, sep, folder = item.partition("=")
        kind = kind.strip()
        if not sep or not folder.strip():
            raise ValueError(f"extra_data_dir item {item!r} must look like 'image=<folder>'")
        if kind != "image":
            raise ValueError(
                f"extra_data_dir={text!r}: kind {kind!r} is not supported; only image calibration "
                "data exists here, pass extra_data_dir='image=<folder>' or a plain folder"
            )
        folders[kind] = folder.strip()
    return Path(folders["image"])


def _resolve_source(dataset: PathLike, image_dir: Optional[Path]) -> tuple[Path, Path, str]:
    """Return ``(data file, image folder, description)`` for ``dataset``."""
    if not isinstance(dataset, (str, os.PathLike)) or not os.fspath(dataset):
        raise ValueError(f"dataset={dataset!r} must be a non-empty string or path")
    name = os.fspath(dataset)
    if name == OFFLINE_IMAGE_TEXT:
        if image_dir is not None:
            logger.warning(
                "extra_data_dir=%s is ignored: %s uses the images shipped in %s", image_dir, name, DATA_DIR
            )
        return DATA_DIR / _OFFLINE_FILE, DATA_DIR, name
    if name in LLAVA_DATASETS:
        if image_dir is None:
            raise ValueError(
                f"dataset={name!r} needs the COCO train2017 images: unpack "
                "http://images.cocodataset.org/zips/train2017.zip and pass its folder as "
                "extra_data_dir='/path/to/train2017'"
            )
        return _download_llava_json(name), image_dir, name
    path = Path(name)
    if path.suffix.lower() in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(
                f"image-text data file {name!r} does not exist (resolved: {path.absolute()})"
            )
        return path, image_dir if image_dir is not None else path.parent, name
    raise ValueError(
        f"dataset={name!r} is not an image-text data set; pass {OFFLINE_IMAGE_TEXT!r}, a local "
        f"LLaVA-format .json or .jsonl file, or one of {LLAVA_DATASETS}"
    )


def _download_llava_json(name: str) -> Path:
    """Fetch the JSON file of LLaVA data set ``name`` from the Hub; raise with offline advice."""
    filename = _LLAVA_FILES[name]
    advice = (
        f"To use it offline, download {filename} from https://huggingface.co/datasets/{LLAVA_HUB_REPO} "
        f"and pass its path as dataset='/path/to/{filename}', and pass the folder of the COCO "
        "train2017 images (http://images.cocodataset.org/zips/train2017.zip) as "
        f"extra_data_dir='/path/to/train2017'. Or use dataset={OFFLINE_IMAGE_TEXT!r}."
    )
    try:
        import huggingface_hub
    except ImportError as exc:
        raise RuntimeError(
            f"dataset={name!r} needs huggingface_hub (pip install huggingface_hub). {advice}"
        ) from exc
    try:
        path = huggingface_hub.hf_hub_download(repo_id=LLAVA_HUB_REPO, repo_type="dataset", filename=filename)
    # The hub raises OSError subclasses, its own EntryNotFoundError, ValueError and others by
    # version; every one means "not available here" and is re-raised with the offline advice.
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch {filename} of dataset={name!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). {advice}"
        ) from exc
    return Path(path)


def _read_records(path: Path) -> list[tuple[Any, str, str]]:
    """Return ``(raw JSON entry, location for error messages, id to use when it has none)``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at {exc.start}); convert it to UTF-8") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}, line {lineno}", f"{path.name}#{lineno}"))
            except json.JSONDecodeError as exc:
                problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
                raise ValueError(f"{path}, line {lineno}: {problem}") from exc
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"malformed JSON ({exc.msg} at column {exc.colno})"
        raise ValueError(f"{path}, line {exc.lineno}: {problem}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA entries, got {type(data).__name__}")
    return [(rec, f"{path}, entry {index}", f"{path.name}#{index}") for index, rec in enumerate(data)]


def _parse_entry(
    record: Any, where: str, default_id: str
) -> tuple[str, Optional[str], tuple[tuple[str, str], ...]]:
    """Validate one LLaVA entry; return ``(id, image path as written or None, turns)``."""
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise ValueError(f"{where}: expected a JSON object with 'conversations', got {kind}")
    entry_id = str(record["id"]) if "id" in record else default_id
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(
            f"entry id={entry_id!r} ({where}) needs a non-empty 'conversations' list of "
            "{'from': ..., 'value': ...} turns"
        )
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"entry id={entry_id!r} ({where}): turn {turn!r} needs a string 'value'")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise ValueError(
                f"entry id={entry_id!r} ({where}): unknown role from={turn.get('from')!r}; "
                f"valid roles: {sorted(ROLES)}"
            )
        turns.append((role, turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()))
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError(f"entry id={entry_id!r} ({where}): 'image' must be a file name, got {image!r}")
    return entry_id, image, tuple(turns)


def _resolve_image(image_dir: Path, image: Optional[str], entry_id: str) -> Optional[Path]:
    """Return the absolute path of ``image`` inside ``image_dir``; reject paths that leave it.

    The check is lexical (``..`` is collapsed, symlinks are not followed), so a user may link
    a COCO folder into ``image_dir`` while a data file still cannot point outside of it.
    """
    if image is None:
        return None
    root = os.path.abspath(image_dir)
    candidate = os.path.abspath(os.path.join(root, image))
    if os.path.commonpath([root, candidate]) != root:
        raise ValueError(
            f"entry id={entry_id!r}: image path {image!r} resolves to {candidate}, outside the image "
            f"folder {root}; image paths must be relative to extra_data_dir (or the data file's folder)"
        )
    return Path(candidate)


def _existing_samples(
    samples: list[ImageTextSample], image_dir: Path, nsamples: Optional[int]
) -> list[ImageTextSample]:
    """Keep samples whose image exists (text-only ones too), stopping at ``nsamples`` kept."""
    kept: list[ImageTextSample] = []
    missing: list[Path] = []
    with_image = 0
    for sample in samples:
        if nsamples is not None and len(kept) == nsamples:
            break
        if sample.image is not None:
            with_image += 1
            if not sample.image.is_file():
                missing.append(sample.image)
                continue
        kept.append(sample)
    else:  # every entry was looked at, so "no image found" means none exists
        if missing and len(missing) == with_image:
            _raise_all_missing(with_image, image_dir, missing[0])
    if missing:
        logger.warning(
            "skipping %d of %d checked image-text entries whose image file is missing under %s (first: %s)",
            len(missing), with_image, image_dir, ", ".join(str(p) for p in missing[:_MISSING_SHOWN]),
        )
    return kept


def _raise_all_missing(count: int, image_dir: Path, example: Path) -> None:
    """Raise FileNotFoundError: none of ``count`` image files exists under ``image_dir``."""
    raise FileNotFoundError(
        f"none of the {count} image files named by the data exists under the image folder "
        f"extra_data_dir={str(image_dir)!r} (looked for, e.g., {example}); pass the folder that "
        "holds them as extra_data_dir='/path/to/images' (or 'image=/path/to/images')"
    )
