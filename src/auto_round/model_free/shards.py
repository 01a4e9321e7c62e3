"""Streaming safetensors I/O: read one tensor (or a range of its rows) from a shard, write a shard
tensor by tensor, so neither side ever holds a whole shard in memory.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}`` (padded with spaces to a multiple of 8), then the tensors' bytes, contiguous,
offsets relative to the end of the header.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor is copied from
stays resident in the process (counted in its RSS) until the file is closed, so reading a 5 GB shard
tensor by tensor still shows a 5 GB peak. Plain reads into a fresh buffer hold only the tensor read.
The files written here are read back by ``safe_open`` in the tests and by transformers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPES.update({k: getattr(torch, name) for k, name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                                          ("C64", "complex64")) if hasattr(torch, name)})
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CorruptShardError(ValueError):
    """A ``.safetensors`` file whose header or size is not what the format says."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file (``begin``/``end``: absolute byte offsets)."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _bad(path: Path, why: str) -> CorruptShardError:
    return CorruptShardError(f"{str(path)!r} is not a valid .safetensors file ({why}); it is truncated or corrupt: "
                             "download or re-export it")


def _offsets(item: Tuple[str, Any]) -> Tuple[int, ...]:
    entry = item[1]
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return tuple(offsets) if isinstance(offsets, list) and all(isinstance(o, int) for o in offsets) else (0, 0)


def read_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """The tensors of ``path`` (name -> :class:`TensorInfo`, in file order) and its ``__metadata__``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _bad(path, f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _bad(path, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    tensors: Dict[str, TensorInfo] = {}
    start = 8 + n
    for name, entry in sorted(header.items(), key=_offsets):
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            b, e = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(path, f"entry {name!r} is malformed or has an unknown dtype: {entry!r}") from err
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize or start + e > size:
            raise _bad(path, f"tensor {name!r} {entry['dtype']}{list(shape)} has data_offsets {[b, e]} (file data "
                             f"is {size - start} bytes)")
        tensors[name] = TensorInfo(dtype, shape, start + b, start + e)
    return tensors, dict(meta)


class ShardReader:
    """Reads tensors of one ``.safetensors`` file with plain reads (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._f: Optional[BinaryIO] = None

    def _file(self) -> BinaryIO:
        if self._f is None:
            self._f = open(self.path, "rb")
        return self._f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _read(self, begin: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        f = self._file()
        f.seek(begin)
        got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise _bad(self.path, f"read {got} of {nbytes} bytes at offset {begin}")
        return buf

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (a fresh tensor, not a view of the file)."""
        info = self.tensors[name]
        return self._read(info.begin, info.nbytes).view(info.dtype).reshape(info.shape)

    def iter_rows(self, name: str, max_bytes: int) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as consecutive chunks of whole rows of at most ``max_bytes`` (at least one row);
        a 0-d or empty tensor comes whole."""
        info = self.tensors[name]
        if not info.shape or info.shape[0] == 0 or info.nbytes == 0:
            yield self.get(name)
            return
        rows = max(1, max_bytes // (info.nbytes // info.shape[0]))
        for r0 in range(0, info.shape[0], rows):
            yield self.get_rows(name, r0, min(info.shape[0], r0 + rows))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the first dimension of tensor ``name``."""
        info = self.tensors[name]
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        data = self._read(info.begin + start * row, (stop - start) * row)
        return data.view(info.dtype).reshape((stop - start, *info.shape[1:]))


@dataclass(frozen=True)
class OutSpec:
    """One tensor of an output shard: known before its data is computed."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard_order(specs: Iterable[OutSpec]) -> List[OutSpec]:
    """The order tensors are laid out in a shard: larger items first, then by name (as ``safetensors``
    orders them), so that every tensor starts at a multiple of its own item size."""
    return sorted(specs, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.name))


class ShardWriter:
    """An output shard whose tensors are all known before any is computed: the header (every tensor's
    place, in :func:`shard_order`) is written and the file sized at once, then each tensor is written at
    its place when it is ready, in any order (a streamed run produces a block's tensors when the block
    is tuned). :meth:`close` checks that every tensor was written exactly once."""

    def __init__(self, path: Path, specs: Iterable[OutSpec], metadata: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.specs = shard_order(specs)
        header: Dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        self.size = start + offset
        self._place = {s.name: (s, start + header[s.name]["data_offsets"][0]) for s in self.specs}
        self._written: set = set()
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(self.size)

    def write(self, name: str, data: Union[torch.Tensor, Iterator[torch.Tensor]]) -> None:
        """Write tensor ``name``: the tensor, or an iterator of consecutive row chunks of it. Data whose
        dtype, shape or size differs from its spec, or a tensor written twice, is an error."""
        if name not in self._place:
            raise KeyError(f"tensor {name!r} is not planned in {self.path.name}")
        if name in self._written:
            raise RuntimeError(f"tensor {name!r} of {self.path.name} is written twice")
        s, begin = self._place[name]
        if isinstance(data, torch.Tensor):
            if data.dtype != s.dtype or tuple(data.shape) != s.shape:
                raise RuntimeError(f"tensor {s.name!r} came out {data.dtype}{list(data.shape)}, planned "
                                   f"{s.dtype}{list(s.shape)}")
            data = iter((data,))
        with open(self.path, "r+b") as f:
            f.seek(begin)
            for chunk in data:
                if chunk.dtype != s.dtype or tuple(chunk.shape[1:]) != s.shape[1:]:
                    raise RuntimeError(f"a chunk of {s.name!r} is {chunk.dtype}{list(chunk.shape)}, planned "
                                       f"{s.dtype}{list(s.shape)}")
                f.write(memoryview(chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            if f.tell() - begin != s.nbytes:
                raise RuntimeError(f"tensor {s.name!r}: wrote {f.tell() - begin} bytes, planned {s.nbytes}")
        self._written.add(name)

    @property
    def missing(self) -> List[str]:
        """The planned tensors not written yet, in file order."""
        return [s.name for s in self.specs if s.name not in self._written]

    def close(self) -> int:
        """Check that every tensor was written and the file has its planned size; returns the size."""
        if self.missing:
            raise RuntimeError(f"{self.path.name}: {len(self.missing)} planned tensor(s) never written: "
                               f"{self.missing[:4]}")
        size = self.path.stat().st_size
        if size != self.size:
            raise RuntimeError(f"{self.path}: {size} bytes, expected {self.size}")
        return size


def write_shard(path: Path, specs: List[OutSpec], produce: Callable[[str], Union[torch.Tensor, Iterator[torch.Tensor]]],
                metadata: Mapping[str, str]) -> int:
    """Write a shard of ``specs`` (in :func:`shard_order`) to ``path``, asking ``produce(name)`` for each
    tensor's data just before it is written: the tensor, or an iterator of consecutive row chunks of it;
    returns the file's size. Data whose dtype, shape or size differs from its spec is an error (the
    header is already written)."""
    writer = ShardWriter(path, specs, metadata)
    for s in writer.specs:
        writer.write(s.name, produce(s.name))
    return writer.close()
