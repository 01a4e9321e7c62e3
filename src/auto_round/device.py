"""Device resolution and peak-memory readings."""

from __future__ import annotations

import resource
import sys
from typing import Optional, Union

import torch


def resolve_device(device: Optional[Union[str, int, torch.device]]) -> torch.device:
    """``None``/"auto" -> cuda if present else cpu; "0" or 0 -> cuda:0; "cpu", "cuda:1" as given."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip()
    if "," in text:
        raise ValueError(f"device={device!r} names several devices: one process tunes on one device; launch one "
                         "process per device with torchrun --nproc-per-node N -m auto_round ... (data-parallel, "
                         "auto_round.tuning.parallel), or pass one, e.g. '0'")
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device name; use cpu, cuda, cuda:N or N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA but no CUDA device is available; use device='cpu'")
    return dev


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_gpu_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``); True when it ran.

    A streamed run frees one block's weights and packing temporaries after each block; glibc keeps
    freed memory in its arenas, so without a trim the resident size creeps up block after block
    (about 10 MB a block measured on a random Llama), though nothing leaks. A no-op (False) where
    the C library has no ``malloc_trim`` (macOS, musl, Windows)."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
