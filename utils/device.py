"""Device selection shared by every script (``--device auto|cpu|cuda``)."""
from __future__ import annotations

import torch


class DeviceUnavailableError(ValueError):
    """A CUDA device was requested but none is usable."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {device} was requested but no CUDA device is available; "
                                     "use --device cpu or auto")
    return device
