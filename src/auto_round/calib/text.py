"""Text calibration data: turn a data set description into fixed-length token samples.

Phase "build calibration data" of the lifecycle. ``get_text_calibration`` reads texts from one or
more sources, tokenizes them and returns a ``CalibrationSet`` of ``[n, seqlen]`` token ids.

Sources (``dataset``, a comma list of items ``name[:num=N][:split=S][:text_column=C]``):

- a Hugging Face Hub data set name (default ``NeelNanda/pile-10k``), read with
  ``datasets.load_dataset(name, split=S)`` (``S`` defaults to ``"train"``; slices such as
  ``train[:1000]`` work); text column ``C``, else ``"text"``, else the first string column. When
  the default set cannot be loaded (no network, ``datasets`` missing) the shipped offline corpus is
  used instead, with a WARNING; any other hub name that cannot be loaded is an error;
- ``auto_round:offline_corpus``: the small PSF-licensed corpus in ``calib/data`` (see its README);
- a local ``.txt`` file: one text per paragraph, paragraphs being separated by blank lines (lines
  inside a paragraph are kept with their newlines). A file with one sample per line must put blank
  lines between samples, otherwise it is one long text that gives a single window;
- a local ``.jsonl`` file (one JSON object per line, field ``C`` or ``"text"``; a line may also be a
  bare JSON string), ``.json`` file (a list of strings or of objects; or an object holding such a
  list), ``.parquet`` file (needs ``pyarrow``), or a directory (all ``*.txt`` files below it,
  sorted by path, each read with the ``.txt`` rule).

Samples per source (``nsamples`` split across items, in order): an item with ``num=N`` takes up to
``N`` samples; items without ``num`` share what is left evenly (rounded up, earliest first), and
a source that yields fewer than its share leaves the rest to the items after it. The total never
exceeds ``nsamples``; with several sources the final samples are shuffled (seeded).

Sample building, per source: texts are visited in a seeded random order and tokenized without
special tokens. Each sample starts with the tokenizer's BOS token if (and only if) the tokenizer
adds one itself when encoding; the rest (``body = seqlen - len(BOS)`` tokens) comes from either a
random window of a text of at least ``body`` tokens, or from shorter texts joined in visiting order
with the EOS token (or ``"\\n\\n"`` when there is no EOS) between them. A joined stream is cut into
``body``-long pieces and the tail that is left over is carried into the next piece, so no short
text is dropped. The same inputs and seed give the same samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

import torch

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "NeelNanda/pile-10k"
OFFLINE_CORPUS = "auto_round:offline_corpus"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
OPTION_KEYS = ("num", "split", "text_column", "concat")
DEFAULT_TEXT_COLUMN = "text"
_TOKENIZE_BATCH = 64
# Options are split off at ":key=" only, so names and split slices may contain ":" ("train[:100]").
_OPTION_SPLIT = re.compile(r":(?=(?:%s)=)" % "|".join(OPTION_KEYS))


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Token samples for calibration.

    Attributes:
        input_ids: ``torch.long`` tensor ``[n, seqlen]``, ``1 <= n <= nsamples``.
        attention_mask: all ones, same shape and dtype as ``input_ids``.
        sources: the sources that really gave samples, e.g. ``("NeelNanda/pile-10k",)``,
            ``("auto_round:offline_corpus",)`` or local paths as given.
        description: short string for the saved quantization config's ``dataset`` field.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    sources: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class SourceSpec:
    """One parsed item of the ``dataset`` comma list (``label`` is the item as written)."""

    name: str
    label: str
    num: int | None = None
    split: str | None = None
    text_column: str | None = None


def parse_dataset_spec(dataset: str) -> list[SourceSpec]:
    """Parse ``"a.txt,org/set:num=16:split=validation"`` into one ``SourceSpec`` per item."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"dataset={dataset!r} is empty; pass a hub name or a local file path")
    specs = []
    for item in (part.strip() for part in dataset.split(",")):
        if not item:
            continue
        name, *options = _OPTION_SPLIT.split(item)
        values: dict[str, Any] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key in values:
                raise ValueError(f"option {key!r} is given twice in dataset item {item!r}")
            values[key] = value.strip()
        specs.append(_make_spec(name.strip(), item, values))
    if not specs:
        raise ValueError(f"dataset={dataset!r} names no source; pass a hub name or a local file")
    return specs


def _make_spec(name: str, item: str, values: dict[str, str]) -> SourceSpec:
    """Validate the options of one dataset item and build its ``SourceSpec``."""
    if not name:
        raise ValueError(f"dataset item {item!r} has options but no name before them")
    unknown = [part for part in name.split(":")[1:] if "=" in part]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} in dataset item {item!r}; valid: {OPTION_KEYS}")
    num = values.get("num")
    if num is not None and not num.isdigit():
        raise ValueError(f"num={num!r} in dataset item {item!r} must be a non-negative integer")
    if "concat" in values:
        logger.info("dataset item %r: 'concat' is ignored; short texts are always joined", item)
    num_value = int(num) if num is not None else None
    return SourceSpec(name, item, num_value, values.get("split") or None, values.get("text_column") or None)


def get_text_calibration(
    tokenizer: Any,
    dataset: str = DEFAULT_DATASET,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 42,
    allow_offline_fallback: bool = True,
) -> CalibrationSet:
    """Build ``nsamples`` token samples of length ``seqlen`` from ``dataset`` (see the module docstring).

    Args:
        tokenizer: a ``transformers`` tokenizer (callable, with ``bos_token_id``/``eos_token_id``).
        dataset: comma list of sources with optional ``:num=N``, ``:split=S``, ``:text_column=C``.
        nsamples: samples wanted; fewer are returned (with a WARNING) if the data is too small.
        seqlen: tokens per sample.
        seed: seed of the text order and window positions.
        allow_offline_fallback: use the shipped offline corpus when the default hub set is unreachable.

    Returns:
        A ``CalibrationSet`` with ``input_ids``/``attention_mask`` of shape ``[n, seqlen]``.

    Raises:
        ValueError: bad arguments, malformed or empty files, or no sample of ``seqlen`` tokens.
        FileNotFoundError: a local path that does not exist.
        RuntimeError: a non-default hub data set that cannot be loaded.
    """
    _check_positive_int("nsamples", nsamples, 1)
    _check_positive_int("seqlen", seqlen, 2)
    specs = parse_dataset_spec(dataset)
    bos, separator = _special_token_plan(tokenizer)

    samples: list[list[int]] = []
    used: list[tuple[SourceSpec, str]] = []
    stats = {"texts": 0, "tokens": 0}
    for index, spec in enumerate(specs):
        quota = _quota(specs, index, len(samples), nsamples)
        if quota == 0:
            logger.warning("calibration source %r unused: nsamples=%d already filled", spec.label, nsamples)
            continue
        texts, source_name = load_texts(spec, allow_offline_fallback)
        rng = random.Random(seed + index)
        rng.shuffle(texts)
        found = build_samples(_iter_token_ids(tokenizer, texts, stats), quota, seqlen, bos, separator, rng)
        logger.debug("calibration source %r: %d of %d samples", spec.label, len(found), quota)
        if found:
            samples.extend(found)
            used.append((spec, source_name))

    if not samples:
        raise ValueError(
            f"no calibration sample of seqlen={seqlen} tokens could be built from dataset={dataset!r}: "
            f"{stats['texts']} texts with {stats['tokens']} tokens in all. Lower seqlen or add more text."
        )
    if len(samples) < nsamples:
        logger.warning(
            "only %d calibration samples of %d tokens could be built from %r (nsamples=%d asked); "
            "continuing with %d. Add more text or lower seqlen to get all of them.",
            len(samples), seqlen, dataset, nsamples, len(samples),
        )
    if len(used) > 1:
        random.Random(seed).shuffle(samples)
    input_ids = torch.tensor(samples, dtype=torch.long)
    sources = tuple(name for _, name in used)
    logger.info("calibration data: %d samples of %d tokens from %s", len(samples), seqlen, sources)
    return CalibrationSet(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        sources=sources,
        description=",".join(_describe(spec, name) for spec, name in used),
    )


def _check_positive_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _describe(spec: SourceSpec, source_name: str) -> str:
    """Label of a used source for the saved config: the item as written, or the fallback's name."""
    return spec.label if source_name == spec.name else spec.label.replace(spec.name, source_name, 1)


def _quota(specs: list[SourceSpec], index: int, collected: int, nsamples: int) -> int:
    """Samples source ``index`` may give, after ``collected`` were taken (see module docstring)."""
    spec, later = specs[index], specs[index + 1 :]
    left = nsamples - collected
    if spec.num is not None:
        return max(0, min(spec.num, left))
    reserved = sum(s.num for s in later if s.num is not None)
    sharers = 1 + sum(1 for s in later if s.num is None)
    return max(0, math.ceil((left - reserved) / sharers))


def _special_token_plan(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Return ``(bos_prefix, separator)``: BOS only if the tokenizer adds it itself; EOS or "\\n\\n"."""
    probe = "calibration text"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None:
        separator = [int(eos_id)]
    else:
        separator = list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    return ([int(bos_id)] if adds_bos else []), separator


def _iter_token_ids(tokenizer: Any, texts: list[str], stats: dict[str, int]) -> Iterator[list[int]]:
    """Tokenize ``texts`` lazily in batches (no special tokens), counting texts and tokens in ``stats``."""
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start : start + _TOKENIZE_BATCH]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stats["texts"] += 1
            stats["tokens"] += len(ids)
            yield list(ids)


def build_samples(
    token_lists: Iterable[list[int]],
    quota: int,
    seqlen: int,
    bos: list[int],
    separator: list[int],
    rng: random.Random,
) -> list[list[int]]:
    """Make up to ``quota`` samples of exactly ``seqlen`` ids from tokenized texts.

    A text of at least ``seqlen - len(bos)`` ids gives one random window; shorter texts are joined
    with ``separator`` and cut into pieces, the remainder carried over. Each sample is
    ``bos + piece``. Stops reading ``token_lists`` as soon as ``quota`` samples exist.
    """
    body = seqlen - len(bos)
    if body < 1:
        raise ValueError(f"seqlen={seqlen} leaves no room for text after the BOS token; use seqlen >= 2")
    samples: list[list[int]] = []
    stream: list[int] = []
    for ids in token_lists:
        if len(samples) >= quota:
            break
        if not ids:
            continue
        if len(ids) >= body:
            start = rng.randrange(len(ids) - body + 1)
            samples.append(bos + ids[start : start + body])
            continue
        if stream:
            stream.extend(separator)
        stream.extend(ids)
        while len(stream) >= body and len(samples) < quota:
            samples.append(bos + stream[:body])
            stream = stream[body:]
    return samples[:quota]


def load_texts(spec: SourceSpec, allow_offline_fallback: bool = True) -> tuple[list[str], str]:
    """Read the non-empty texts of one source; return ``(texts, name of what was really read)``."""
    if spec.name == OFFLINE_CORPUS:
        return offline_corpus_texts(), OFFLINE_CORPUS
    path = _local_path(spec.name)
    if path is not None:
        if spec.split is not None:
            raise ValueError(f"split={spec.split!r} in {spec.label!r} is for hub data sets, not local files")
        return read_local_texts(path, spec.text_column), spec.name
    try:
        if spec.name == DEFAULT_DATASET and allow_offline_fallback:
            _check_hub_reachable()
        return _load_hub_texts(spec.name, spec.split or "train", spec.text_column), spec.name
    except (OSError, ImportError) as exc:
        if spec.name == DEFAULT_DATASET and allow_offline_fallback:
            logger.warning(
                "could not load the default calibration data set %r from the Hugging Face Hub (%s: %s); "
                "falling back to the small offline corpus %r shipped with auto_round, which gives fewer "
                "and less varied samples. For real quantization offline pass your own text, e.g. "
                "dataset='/path/to/calib.txt' (or .jsonl, .json, .parquet, a directory of .txt files).",
                spec.name, type(exc).__name__, exc, OFFLINE_CORPUS,
            )
            return offline_corpus_texts(), OFFLINE_CORPUS
        raise RuntimeError(
            f"could not load calibration data set {spec.name!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). No local file of that name exists either. Offline, pass a "
            f"local .txt/.jsonl/.json/.parquet file or a directory of .txt files, or {OFFLINE_CORPUS!r}."
        ) from exc


HUB_PROBE_TIMEOUT_S = 3.0


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_hub_reachable() -> None:
    """Raise ``OSError`` at once when the Hub endpoint does not accept a connection.

    Without it an offline machine spends about 23 s in ``datasets``' retries before the fallback.
    Skipped when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set (``datasets`` then reads its
    local cache directly) and when a proxy is configured (a direct connection may be refused where
    the proxy would get through).
    """
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if _offline_env() or any(os.environ.get(k) for k in proxies):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise OSError(f"the Hub ({host}:{port}) is unreachable ({type(exc).__name__}: {exc}); if the data set "
                      "is in your local datasets cache, set HF_HUB_OFFLINE=1 to use it") from exc


def offline_corpus_texts() -> list[str]:
    """Paragraphs of the offline corpus shipped in ``auto_round/calib/data/offline_corpus.txt``."""
    resource = resources.files("auto_round.calib").joinpath("data/offline_corpus.txt")
    return _split_paragraphs(resource.read_text(encoding="utf-8"))


def _local_path(name: str) -> Path | None:
    """Return the local path ``name`` points to, None for a hub name; raise if a path is missing."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_like_path = name.startswith(("/", "./", "../", "~")) or path.suffix.lower() in LOCAL_SUFFIXES
    if looks_like_path:
        raise FileNotFoundError(f"calibration file {name!r} does not exist (resolved: {path.absolute()})")
    return None


def _load_hub_texts(name: str, split: str, text_column: str | None) -> list[str]:
    """Load ``split`` of hub data set ``name`` with ``datasets`` and return its non-empty texts."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading hub data set {name!r} needs the 'datasets' package: pip install 'auto-round[data]', "
            "or pass a local file"
        ) from exc
    data = datasets.load_dataset(name, split=split)
    string_columns = [
        column for column, feature in data.features.items()
        if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    column = _pick_column(text_column, string_columns, list(data.column_names), f"hub data set {name!r}")
    return _non_empty(data[column])


def _pick_column(wanted: str | None, string_columns: list[str], all_columns: list[str], where: str) -> str:
    """Choose the text column: ``wanted``, else "text", else the first string column."""
    if wanted is not None:
        if wanted not in all_columns:
            raise ValueError(f"text_column={wanted!r} is not a column of {where}; columns: {all_columns}")
        return wanted
    if DEFAULT_TEXT_COLUMN in all_columns:
        return DEFAULT_TEXT_COLUMN
    if not string_columns:
        raise ValueError(f"{where} has no string column (columns: {all_columns}); pass :text_column=NAME")
    return string_columns[0]


def _non_empty(texts: Iterable[Any]) -> list[str]:
    """Keep the strings of ``texts`` that are not blank."""
    return [text for text in texts if isinstance(text, str) and text.strip()]


def _split_paragraphs(text: str) -> list[str]:
    """Split text at blank (whitespace-only) lines; strip each paragraph, drop empty ones."""
    return [part.strip() for part in re.split(r"\n[ \t\r\f\v]*\n", text) if part.strip()]


def read_local_texts(path: Path, text_column: str | None = None) -> list[str]:
    """Read the texts of a local ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file or a directory."""
    suffix = path.suffix.lower()
    if text_column is not None and (path.is_dir() or suffix == ".txt"):
        raise ValueError(f"text_column={text_column!r} does not apply to plain text {path}; remove it")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            found = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
            raise ValueError(f"directory {path} has no .txt files (found: {found or 'nothing'})")
        texts = [text for file in files for text in _read_txt(file)]
        if not texts:
            raise ValueError(f"directory {path}: all its .txt files are empty")
        return texts
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix == ".txt":
        texts = _read_txt(path)
    elif suffix in readers:
        texts = readers[suffix](path, text_column)
    else:
        raise ValueError(f"calibration file {path} has an unsupported type {suffix!r}; use {LOCAL_SUFFIXES}")
    if not texts:
        raise ValueError(f"calibration file {path} is empty: it holds no non-blank text")
    return texts


def _read_text_file(path: Path) -> str:
    """Read a UTF-8 file, naming the file when it is not valid UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at {exc.start}); convert it to UTF-8") from exc


def _read_txt(path: Path) -> list[str]:
    """Texts of a ``.txt`` file: its blank-line-separated paragraphs (warns when there is only one)."""
    paragraphs = _split_paragraphs(_read_text_file(path))
    if len(paragraphs) == 1 and paragraphs[0].count("\n") > 0:
        logger.warning(
            "%r has no blank lines, so it is read as one text and gives at most one window; "
            "separate samples with blank lines to use all of it", str(path),
        )
    return paragraphs


def _text_of(item: Any, column: str, where: str) -> str | None:
    """The text of one JSON item: a string, or an object's ``column`` field (None when blank)."""
    if isinstance(item, dict):
        if column not in item:
            fields = sorted(item)
            hint = "pass :text_column=NAME"
            raise ValueError(f"{where}: no field {column!r} in the object (fields: {fields}); {hint}")
        item = item[column]
    if item is None:
        return None
    if not isinstance(item, str):
        kind = type(item).__name__
        raise ValueError(f"{where}: expected a string or an object with a string {column!r}, got {kind}")
    return item if item.strip() else None


def _read_jsonl(path: Path, text_column: str | None) -> list[str]:
    """Texts of a ``.jsonl`` file, one JSON object (or string) per non-blank line."""
    column = text_column or DEFAULT_TEXT_COLUMN
    texts = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
            raise ValueError(f"{where}: {problem}") from exc
        text = _text_of(item, column, where)
        if text is not None:
            texts.append(text)
    return texts


def _read_json(path: Path, text_column: str | None) -> list[str]:
    """Texts of a ``.json`` file: a list of strings/objects, or an object holding one such list."""
    column = text_column or DEFAULT_TEXT_COLUMN
    try:
        data = json.loads(_read_text_file(path))
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise ValueError(f"{path}, line {exc.lineno}: {problem}") from exc
    if isinstance(data, dict):
        data = _list_in_object(path, data, column)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of texts or objects, got {type(data).__name__}")
    texts = [_text_of(item, column, f"{path}, item {i}") for i, item in enumerate(data)]
    return [text for text in texts if text is not None]


def _list_in_object(path: Path, data: dict[str, Any], column: str) -> list[Any]:
    """The list inside a top-level JSON object: under ``column`` if present, else its only list."""
    if isinstance(data.get(column), list):
        return data[column]
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise ValueError(
            f"{path}: the top-level object must hold exactly one list of texts, found lists under {lists}; "
            "pass :text_column=KEY or store a plain list"
        )
    return data[lists[0]]


def _read_parquet(path: Path, text_column: str | None) -> list[str]:
    """Texts of a ``.parquet`` file's text column (needs ``pyarrow``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
    schema = pq.read_schema(path)
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    column = _pick_column(text_column, strings, list(schema.names), f"parquet file {path}")
    return _non_empty(pq.read_table(path, columns=[column]).column(column).to_pylist())
