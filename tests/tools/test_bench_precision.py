"""tools/bench/precision.py: the fidelity measures, the FLOP count and the GEMM rate (SPEC 12.4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.dataset import Sample
from core.outputs import ClassResult
from core.sdf_model import PointNetEncoder
from tools.bench.precision import encoder_flops, fidelity, gemm_gflops, table_cells
from utils.metrics import PRO_LIMITS
from utils.reporting import METHODS, results_tables


def _metrics(image: float) -> dict:
    return {m: {"image_auroc": image, "pixel_auroc": 0.9, "au_pro": {lim: 0.5 for lim in PRO_LIMITS}} for m in METHODS}


def _result(image: float, scores: np.ndarray, maps: np.ndarray) -> ClassResult:
    samples = [Sample(Path("."), "c", "test", "good", f"{i:03d}", Path(f"{i}.png"), Path(f"{i}.tiff"))
               for i in range(len(scores))]
    return ClassResult("c", None, samples, np.zeros(len(scores), dtype=np.int64),
                       scores={m: scores for m in METHODS}, maps={m: maps for m in METHODS},
                       masks=np.zeros_like(maps), metrics=_metrics(image))


def test_table_cells_reads_every_number_of_results_txt():
    text = results_tables({"c": _metrics(0.875)}, ["c"])
    cells = table_cells(text)
    # image and pixel tables: 3 methods x (class, mean); AU-PRO: 3 x len(limits) rows x 2
    assert len(cells) == 3 * 2 + 3 * 2 + 3 * len(PRO_LIMITS) * 2
    assert cells[:6] == [0.875] * 6 and set(cells[12:]) == {0.5}


def test_fidelity_reports_the_largest_differences():
    scores = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    maps = np.zeros((3, 224, 224), dtype=np.float32)
    maps[:, 0, 0] = 2.55                               # each map's maximum: one level is 0.01
    other_maps = maps.copy()
    other_maps[1, 5, 5] = 0.03                         # 3 levels of map 1
    a = _result(0.875, scores, maps)
    b = _result(0.75, scores * np.float32([1.0, 1.0, 1.1]), other_maps)
    f = fidelity({"c": a}, {"c": b}, ["c"])
    assert f["table_cell_abs"] == 0.125 and f["cells"] == 12 + 6 * len(PRO_LIMITS)
    assert f["image_score_rel"] == pytest.approx(0.1, rel=1e-6)
    assert f["map_levels"] == pytest.approx(3.0, rel=1e-5) and f["map_levels_p99"] == 0.0   # one pixel
    assert f["per_method"]["SDF"]["map_levels"] == pytest.approx(3.0, rel=1e-5)
    assert fidelity({"c": a}, {"c": a}, ["c"])["map_levels"] == 0.0
    with pytest.raises(ValueError, match="different samples"):
        fidelity({"c": a}, {"c": _result(0.875, scores[:2], maps[:2])}, ["c"])


def test_encoder_flops_count_the_layers():
    per_patch = 2 * 500 * (3 * 64 + 64 * 128 + 128 * 1024) + 2 * (1024 * 512 + 512 * 128)
    assert encoder_flops(PointNetEncoder(), 270, 500) == 270 * per_patch == 270 * 140_635_648


def test_gemm_rate_is_a_rate():
    rate = gemm_gflops(256, 256, 256, repeats=3)
    assert 0.1 < rate < 1e6
    assert gemm_gflops(64, 64, 64, torch.bfloat16, repeats=2) > 0
