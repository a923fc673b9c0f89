"""Arithmetic precision of the neural networks (``main.py --precision``): choice, capability, region.

* ``fp32`` (default): IEEE float32 everywhere, the faithful computation. On CUDA the region
  also turns off TF32 for convolutions (cuDNN allows it by default), so float32 means float32.
* ``bf16``: the networks run in bfloat16 (autocast on CPU or CUDA) where the hardware has
  bfloat16 matrix units: a CPU with AVX512-BF16 or AMX (and oneDNN not capped below them by
  ``ONEDNN_MAX_CPU_ISA``), a CUDA device that supports bfloat16.
  Elsewhere bfloat16 would be emulated, slower than float32: one warning says so and float32
  runs instead.
* ``tf32``: CUDA only; float32 tensors with TF32 matrix products and convolutions (Ampere or
  newer; older devices warn and run float32). Refused on a CPU (:class:`utils.errors.ConfigError`).

:meth:`Precision.region` is entered around the network calls only (encoder, decoder, RGB
backbone); everything else (distances, sparse coding, maps, statistics) stays outside it, in
the dtypes it always had.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from utils.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "tf32")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionWarning(UserWarning):
    """A requested reduced precision that this device cannot run fast; float32 runs instead."""


def cpu_bf16_units() -> list[str]:
    """The bfloat16 matrix-unit flags of this CPU (subset of ``avx512_bf16``, ``amx_bf16``)."""
    checks = {"avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    if all(check is not None for check in checks.values()):
        return [flag for flag, check in checks.items() if check()]
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in _CPU_BF16_FLAGS if flag in flags]


# oneDNN's ISA names below the first with bfloat16 dot products (its ONEDNN_MAX_CPU_ISA values, in order)
_ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_bf16_unavailable() -> str:
    """Why torch's CPU kernels cannot use bfloat16 matrix units here ("" when they can).

    Either the CPU has none (:func:`cpu_bf16_units`), or oneDNN, which runs torch's bfloat16
    matrix products, is capped below them by ``ONEDNN_MAX_CPU_ISA`` (or its older name
    ``DNNL_MAX_CPU_ISA``), as when other CPUs' kernels are emulated.
    """
    if not cpu_bf16_units():
        return "this CPU has no bfloat16 matrix units (neither avx512_bf16 nor amx_bf16)"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(name, "").strip().upper()
        if cap in _ONEDNN_BELOW_BF16:
            return f"{name}={cap} keeps oneDNN below its bfloat16 kernels (AVX512_CORE_BF16)"
    return ""


def cuda_bf16_supported(device: torch.device) -> bool:
    """Native (not emulated) bfloat16 on the CUDA ``device``."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:   # older signature without the emulation switch
            return bool(torch.cuda.is_bf16_supported())


def cuda_tf32_supported(device: torch.device) -> bool:
    """TF32 tensor cores (compute capability 8.0 or newer) on the CUDA ``device``."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class Precision:
    """What was asked for, what runs, and why they differ (empty when they do not)."""

    requested: str = "fp32"
    effective: str = "fp32"
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the networks' activations: bfloat16 for ``bf16``, else float32."""
        return torch.bfloat16 if self.effective == "bf16" else torch.float32

    @property
    def faithful(self) -> bool:
        return self.effective == "fp32"

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``bf16 (reduced precision, not the faithful fp32)``."""
        text = "fp32 (faithful float32)" if self.faithful else \
            f"{self.effective} (reduced precision: not the faithful fp32 computation)"
        if self.requested != self.effective:
            text += f"; {self.requested} was requested: {self.reason}"
        return text

    def record(self) -> dict:
        """The fields written into configuration files and ``results.json``."""
        return {"precision": self.effective, "precision_requested": self.requested,
                **({"precision_note": self.reason} if self.reason else {})}

    @contextlib.contextmanager
    def region(self, device: torch.device) -> Iterator[None]:
        """Run the enclosed network calls in this precision on ``device`` (module docstring)."""
        device = torch.device(device)
        if self.effective == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        elif device.type == "cuda":
            with tf32_allowed(self.effective == "tf32"):
                yield
        else:
            yield


FP32 = Precision()


@contextlib.contextmanager
def tf32_allowed(allow: bool) -> Iterator[None]:
    """Set whether CUDA float32 matrix products and cuDNN convolutions may use TF32; restore afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_precision(requested: str, device: torch.device, option: str = "--precision") -> Precision:
    """The :class:`Precision` that runs for ``requested`` on ``device``.

    Raises :class:`ConfigError` for an unknown name and for ``tf32`` on a CPU; warns once
    (:class:`PrecisionWarning`) and falls back to fp32 where the device lacks the units.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ConfigError(f"{option} {requested!r} is not a precision; choose one of {', '.join(PRECISIONS)}")
    reason = ""
    if requested == "tf32":
        if device.type != "cuda":
            raise ConfigError(f"{option} tf32 needs a CUDA device (TF32 is a GPU tensor-core format) but the "
                              f"device is {device}; use {option} fp32, or {option} bf16 on a CPU with "
                              "bfloat16 units")
        if not cuda_tf32_supported(device):
            reason = (f"{torch.cuda.get_device_name(device)} has no TF32 tensor cores "
                      "(compute capability < 8.0); fp32 runs instead")
    elif requested == "bf16":
        if device.type == "cuda" and not cuda_bf16_supported(device):
            reason = f"{torch.cuda.get_device_name(device)} has no native bfloat16; fp32 runs instead"
        elif device.type == "cpu" and (why := cpu_bf16_unavailable()):
            reason = f"{why}, so bfloat16 would be emulated and slower than float32; fp32 runs instead"
    if reason:
        warnings.warn(f"{option} {requested}: {reason}", PrecisionWarning, stacklevel=2)
        return Precision(requested, "fp32", reason)
    return Precision(requested, requested)
