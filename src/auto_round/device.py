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
        raise ValueError(f"device={device!r}: several devices are not supported yet; pass one, e.g. '0'")
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
