"""What main.py writes (core/outputs.py)."""
from __future__ import annotations

import json

import numpy as np
import torch

from core.outputs import ClassSummary, upsample_map, write_alignment, write_results
from utils.metrics import PRO_LIMITS
from utils.reporting import METHODS


def test_upsample_map_bilinear_half_pixel():
    m = np.zeros((224, 224), np.float32)
    m[100:124, 50:60] = 1.0
    up = upsample_map(m, (400, 448))
    assert up.shape == (400, 448) and up.dtype == np.float32
    expected = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(400, 448), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_array_equal(up, expected)
    assert up[:, 400].max() == 0 and up.max() == 1.0  # far from the box / inside it


def summary(cls: str, value: float, rank: int) -> ClassSummary:
    metrics = {m: {"image_auroc": value, "pixel_auroc": value / 2, "au_pro": {p: value / 3 for p in PRO_LIMITS}}
               for m in METHODS}
    return ClassSummary(cls, np.float32(1.5 * value), np.float32(-value), metrics,
                        per_defect_type={m: {"bump": {"image_auroc": value}} for m in METHODS},
                        thresholds=(0.25, 0.5), times={"sdf_decoder": 3.0 + rank}, rank=rank)


def test_shared_files_in_class_order_whatever_order_the_summaries_came_in(tmp_path):
    """What rank 0 writes from gathered summaries: the class order of the run, timings in their own file."""
    classes = ["bagel", "cookie"]
    done = [summary("bagel", 0.75, 0), summary("cookie", 0.5, 1)]
    for name, order in (("a", done), ("b", done[::-1])):
        (tmp_path / name).mkdir()
        tables = write_results(tmp_path / name, order, classes)
        write_alignment(tmp_path / name, [next(s for s in order if s.cls == c) for c in classes])
        assert (tmp_path / name / "results.txt").read_text() == tables
    for f in ("results.txt", "results.json", "timing.json", "alignment.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(report["classes"]) == classes and "timing_seconds" not in report
    assert report["classes"]["cookie"]["metrics"]["SDF"]["image_auroc"] == 0.5
    assert report["classes"]["bagel"]["per_defect_type"]["RGB"] == {"bump": {"image_auroc": 0.75}}
    assert report["classes"]["bagel"]["alignment"] == {"weight": 1.125, "bias": -0.75}
    assert json.loads((tmp_path / "a" / "timing.json").read_text()) == {
        "classes": {"bagel": {"rank": 0, "seconds": {"sdf_decoder": 3.0}},
                    "cookie": {"rank": 1, "seconds": {"sdf_decoder": 4.0}}}}
    assert (tmp_path / "a" / "alignment.txt").read_text().splitlines()[1].startswith("'cookie'\t:[")
    assert tables.index("Bagel") < tables.index("Cookie")
