"""utils/precision.py: the --precision choice, capability detection, the region it runs in."""
from __future__ import annotations

import warnings

import pytest
import torch

import utils.precision as P
from utils.errors import ConfigError

CPU = torch.device("cpu")


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        return set(next(line.split(":", 1)[1].split() for line in fh if line.startswith("flags")))


def test_cpu_bf16_units_are_the_cpuinfo_flags():
    try:
        flags = _cpuinfo_flags()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert P.cpu_bf16_units() == [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def test_fp32_is_the_default_and_changes_nothing():
    prec = P.resolve_precision("fp32", CPU)
    assert prec == P.FP32 and prec.faithful and prec.dtype == torch.float32
    assert prec.record() == {"precision": "fp32", "precision_requested": "fp32"}
    with prec.region(CPU):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_tf32_on_cpu_and_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"--precision tf32 needs a CUDA device .* use --precision fp32"):
        P.resolve_precision("tf32", CPU)
    with pytest.raises(ConfigError, match=r"--precision 'fp16' is not a precision; choose one of fp32, bf16, tf32"):
        P.resolve_precision("fp16", CPU)


def test_bf16_without_units_warns_and_runs_fp32(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: [])
    with pytest.warns(P.PrecisionWarning, match=r"no bfloat16 matrix units .* slower than float32; fp32 runs instead"):
        prec = P.resolve_precision("bf16", CPU)
    assert (prec.requested, prec.effective, prec.faithful, prec.dtype) == ("bf16", "fp32", True, torch.float32)
    assert prec.record()["precision_note"] == prec.reason and "avx512_bf16" in prec.reason
    assert prec.describe().startswith("fp32 (faithful float32); bf16 was requested: this CPU has no bfloat16")


def test_bf16_with_units_runs_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: ["avx512_bf16"])
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):   # set when other CPUs' kernels are emulated
        monkeypatch.delenv(cap, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no warning when the units exist
        prec = P.resolve_precision("bf16", CPU)
    assert (prec.effective, prec.faithful, prec.dtype) == ("bf16", False, torch.bfloat16)
    assert "reduced precision" in prec.describe()
    with prec.region(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_tf32_flags_are_set_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for allow in (True, False):
        with P.tf32_allowed(allow):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allow, allow)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError), P.tf32_allowed(True):
        raise RuntimeError("restored on errors too")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("cap, usable", [("SSE41", False), ("avx2", False), ("AVX512_CORE_VNNI", False),
                                         ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("", True)])
def test_a_onednn_cap_below_bf16_runs_fp32(monkeypatch, cap, usable):
    """Emulating another CPU with ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes bf16 emulated: fp32 runs."""
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: ["avx512_bf16"])
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    if usable:
        assert P.cpu_bf16_unavailable() == "" and P.resolve_precision("bf16", CPU).effective == "bf16"
        return
    with pytest.warns(P.PrecisionWarning, match=rf"ONEDNN_MAX_CPU_ISA={cap.upper()} keeps oneDNN below"):
        assert P.resolve_precision("bf16", CPU).effective == "fp32"
