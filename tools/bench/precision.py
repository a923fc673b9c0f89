"""Reduced precision against the faithful fp32 run (SPEC 12.4): runs, fidelity, the machine's GEMM rate.

:func:`run_precisions` runs ``main.py``'s per-class loop (:class:`core.pipeline.Pipeline`) in fp32
and in each other precision, one after the other with the same models and data.

:func:`fidelity` compares two runs of the same classes (``core.pipeline.Pipeline.run_class``
results) by the three measures the README reports: the largest absolute difference of any cell
of the ``results.txt`` tables (as printed, 3 decimals), the largest relative difference of an
image score, and the largest difference of a blurred map in levels of 1/255 of the fp32 blurred
map's maximum (and the 99th percentile over pixels). The blur quantises in 1/255 of the unblurred
map's maximum (SPEC 8.5), which is larger: these levels are the stricter measure.

:func:`gemm_gflops` measures the float32 (or bfloat16) matrix-product rate the encoder is
compared with.
"""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import torch

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.dataset import list_samples, resolve_classes
from core.inference import STAGE_NAMES
from core.native import resolve_frames
from core.patch_files import POINT_NUM
from core.pipeline import Pipeline, RunConfig
from core.rgb_features import build_rgb_extractor
from core.sdf_model import load_sdf_checkpoint
from utils.allocator import keep_freed_memory
from utils.device import resolve_device
from utils.precision import Precision, resolve_precision
from utils.reporting import METHODS, results_tables

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def run_precisions(cfg: RunConfig, modes: list[str], sdf_model, rgb, device: torch.device,
                   classes: list[str]) -> dict[str, tuple[Precision, dict]]:
    """``{mode: (precision that ran, {cls: ClassResult})}`` for fp32 (first, always) and ``modes``."""
    tests = {cls: list_samples(cfg.datasets_path, cls, "test") for cls in classes}
    frames = {cls: resolve_frames(tests[cls], cfg.raw_datasets_path) for cls in classes}
    out = {}
    for mode in ["fp32"] + [m for m in modes if m != "fp32"]:
        precision = resolve_precision(mode, device)
        pipe = Pipeline(dataclasses.replace(cfg, precision=mode), sdf_model, rgb, device, precision)
        out[mode] = precision, {cls: pipe.run_class(cls, tests[cls], frames[cls]) for cls in classes}
    return out


def table_cells(text: str) -> list[float]:
    """Every numeric cell of the Markdown tables in ``text`` (``results.txt``), in reading order."""
    cells = []
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells += [float(c) for c in (c.strip() for c in line.strip("|").split("|")) if _NUMBER.match(c)]
    return cells


def fidelity(reference: dict, other: dict, classes: list[str]) -> dict:
    """Largest differences of ``other`` against ``reference`` (both ``{cls: ClassResult}``, same samples):
    overall and per method (``image_score_rel`` and ``map_levels`` of RGB, SDF, RGB_SDF)."""
    ref_cells = table_cells(results_tables({c: reference[c].metrics for c in classes}, classes))
    other_cells = table_cells(results_tables({c: other[c].metrics for c in classes}, classes))
    if len(ref_cells) != len(other_cells):
        raise ValueError("the two runs' tables differ in shape")
    per_method = {m: {"image_score_rel": 0.0, "map_levels": 0.0, "map_levels_p99": 0.0} for m in METHODS}
    for cls in classes:
        a, b = reference[cls], other[cls]
        if [s.name for s in a.samples] != [s.name for s in b.samples]:
            raise ValueError(f"class {cls}: the two runs scored different samples")
        for method, worst in per_method.items():
            sa, sb = a.scores[method].astype(np.float64), b.scores[method].astype(np.float64)
            rel = np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-30)
            ma, mb = a.maps[method].astype(np.float64), b.maps[method].astype(np.float64)
            peak = ma.reshape(len(ma), -1).max(axis=1)
            levels = np.abs(ma - mb) / np.where(peak > 0, peak / 255, 1.0)[:, None, None]
            worst["image_score_rel"] = max(worst["image_score_rel"], float(rel.max()))
            worst["map_levels"] = max(worst["map_levels"], float(levels.max()))
            worst["map_levels_p99"] = max(worst["map_levels_p99"], float(np.percentile(levels, 99)))
    cell = max((abs(x - y) for x, y in zip(ref_cells, other_cells)), default=0.0)
    return dict(table_cell_abs=round(cell, 6), cells=len(ref_cells),
                image_score_rel=max(w["image_score_rel"] for w in per_method.values()),
                map_levels=max(w["map_levels"] for w in per_method.values()),
                map_levels_p99=max(w["map_levels_p99"] for w in per_method.values()), per_method=per_method)


def encoder_flops(encoder, patches: int, points: int) -> float:
    """Multiply-add operations (x 2) of the PointNet encoder on ``patches`` patches of ``points`` points:
    the three point-wise layers per point, the two fully connected layers per patch."""
    per_point = sum(2 * conv.weight.shape[0] * conv.weight.shape[1]
                    for conv in (encoder.conv1, encoder.conv2, encoder.conv3))
    per_patch = sum(2 * fc.weight.numel() for fc in (encoder.fc1, encoder.fc2))
    return float(patches * (points * per_point + per_patch))


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                repeats: int = 10) -> float:
    """Best-of-``repeats`` rate of an (m x k) @ (k x n) product in GFLOPS (2 m k n operations)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(repeats + 2):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:                      # two warm-up products
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


@dataclass
class FidelityConfig:
    """Options of ``tools/precision_fidelity.py`` (``main.py``'s inputs, and the precisions to compare)."""

    datasets_path: Path
    grid_path: Path
    ckpt_path: Path
    precision: list[str] = field(default_factory=lambda: ["bf16"])
    classes: Optional[list[str]] = None
    device: str = "auto"
    seed: int = 0
    rgb_backbone: str = "wide_resnet50_2"
    rgb_weights: Optional[str] = None
    point_num: int = POINT_NUM


def compare_precisions(cfg: FidelityConfig) -> dict:
    """Run every class in fp32 and in each of ``cfg.precision``; :func:`precision_report` of the runs."""
    device = resolve_device(cfg.device)
    for mode in cfg.precision:
        resolve_precision(mode, device)          # a refused mode stops before any work
    keep_freed_memory()                          # as main.py
    classes = resolve_classes(cfg.datasets_path, cfg.classes)
    sdf_model, _ = load_sdf_checkpoint(cfg.ckpt_path, map_location=device)
    rgb = build_rgb_extractor(cfg.rgb_backbone, cfg.rgb_weights, device, seed=cfg.seed)
    run_cfg = RunConfig(cfg.datasets_path, cfg.grid_path, cfg.ckpt_path, classes=classes, device=str(device),
                        seed=cfg.seed, rgb_backbone=cfg.rgb_backbone, rgb_weights=cfg.rgb_weights,
                        point_num=cfg.point_num)
    return precision_report(run_precisions(run_cfg, cfg.precision, sdf_model, rgb, device, classes), classes, device)


def precision_report(runs: dict[str, tuple[Precision, dict]], classes: list[str], device) -> dict:
    """What :func:`run_precisions` measured: per mode, the test seconds per sample by stage, the ratio
    of fp32's time to the mode's (per stage and in total), and :func:`fidelity` against fp32."""
    base = runs["fp32"][1]
    n_test = sum(len(r.samples) for r in base.values())

    def per_sample(results: dict) -> dict:
        return {s: sum(r.times["test"].get(s, 0.0) for r in results.values()) / n_test for s in STAGE_NAMES}

    base_times = per_sample(base)
    report = {"classes": classes, "device": str(device), "test_samples": n_test, "modes": {}}
    for mode, (precision, results) in runs.items():
        times = per_sample(results)
        report["modes"][mode] = {
            **precision.record(),
            "test_seconds_per_sample": times,
            "speed_vs_fp32": {s: base_times[s] / t for s, t in times.items() if t > 0},
            "total_speed_vs_fp32": sum(base_times.values()) / sum(times.values()),
            "fidelity_vs_fp32": fidelity(base, results, classes),
        }
    return report
