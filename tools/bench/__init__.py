"""Benchmark support: each stage module ``tools/bench/<stage>.py`` exposes ``benchmark(ctx) -> list[dict]``.

Every stage times this project's implementation against a faithful re-implementation of
how the authors' code computes the same thing, in the same run, and checks that the two
outputs agree. ``tools/benchmark.py`` runs the stages in pipeline order.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


def peak_rss_mib() -> float:
    """Peak resident set size of this process (and its reaped children) in MiB."""
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return max(self_kib, child_kib) * scale


@dataclass
class BenchContext:
    """State shared by the stage benchmarks; earlier stages fill in the paths later ones need."""

    raw: Path
    work: Path
    classes: list[str]
    device: torch.device
    workers: int = 2
    subset: int = 2
    seed: int = 0
    quick: bool = False
    precisions: list[str] = field(default_factory=lambda: ["fp32"])   # inference: main.py in each (SPEC 12.4)
    preprocessed: Optional[Path] = None
    grids: Optional[Path] = None
    pretrain_grids: Optional[Path] = None
    ckpt: Optional[Path] = None
    extra: dict = field(default_factory=dict)


def row(stage: str, measure: str, ours: float, authors: Optional[float] = None, unit: str = "s/sample",
        agree: Optional[str] = None, note: str = "") -> dict:
    """One benchmark result: our time, the authors'-way time (if measured) and their ratio."""
    speedup = authors / ours if authors is not None and ours > 0 else None
    return dict(stage=stage, measure=measure, unit=unit, ours=ours, authors=authors,
                speedup=speedup, agree=agree, note=note)
