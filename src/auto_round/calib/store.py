"""Where cached block inputs and outputs live: on a device, or in files when memory is short.

Image-text calibration produces long sequences, and the block loop keeps two copies of every
block's activations (the FP chain and the quantized chain). :class:`TensorStore` puts them on a
device (the default) or, with a folder, in one file each; either way the loop reads them back with
``.to(device, dtype)``. A file lives as long as its :class:`DiskTensor`: deleted when the last reference goes.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch


class DiskTensor:
    """A tensor saved to a file; ``.to(...)`` loads it (the only access the tuning loop needs)."""

    def __init__(self, tensor: torch.Tensor, path: Path) -> None:
        t = tensor.detach().cpu()
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            # a view (a slice, one of a split's parts): torch.save writes its whole base storage, and every
            # read-back would load all of it; a compact copy keeps the file and the read to the view's own bytes
            t = t.clone(memory_format=torch.contiguous_format)
        torch.save(t, path)
        self.path, self.shape, self.dtype = path, tuple(tensor.shape), tensor.dtype

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.load(self.path, weights_only=True).to(*args, **kwargs)

    def __del__(self) -> None:
        # The loop drops a unit's inputs once the next unit's are computed: their files go with them, so the
        # folder holds about the cached copies in use (3-4), not one set per block of the list.
        try:
            self.path.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 - at interpreter exit, or the folder already removed by close()
            pass


class TensorStore:
    """Keeps tensors on ``device``, or in files under ``folder`` (a private sub-folder, removed by
    :meth:`close`)."""

    def __init__(self, device: torch.device, folder: Optional[Union[str, Path]] = None) -> None:
        self.device = device
        self.dir: Optional[Path] = None
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="auto_round_cache_", dir=str(folder)))
        self._ids = itertools.count()

    def put(self, tensor: torch.Tensor) -> Union[torch.Tensor, DiskTensor]:
        if isinstance(tensor, (list, tuple)):  # a unit whose input is one tensor per image (Kimi-VL projector)
            return type(tensor)(self.put(t) for t in tensor)
        if self.dir is None:
            return tensor.detach().to(self.device)
        return DiskTensor(tensor, self.dir / f"{next(self._ids)}.pt")

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
