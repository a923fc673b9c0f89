"""Device selection shared by every script (``--device auto|cpu|cuda``), and a device-aware timer."""
from __future__ import annotations

import time
from typing import Optional

import torch

from utils.errors import ShapeGuidedError


class DeviceUnavailableError(ShapeGuidedError, ValueError):
    """A CUDA device was requested but none is usable."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise DeviceUnavailableError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N"
                                     ) from exc
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailableError(f"--device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"--device {device} was requested but no CUDA device is available; "
                                         "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                                         "CUDA device(s), numbered from 0")
    return device


class Timer:
    """Context manager measuring wall time in seconds (CUDA-synchronised when ``device`` is CUDA)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
