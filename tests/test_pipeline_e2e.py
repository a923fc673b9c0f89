"""End-to-end: the four scripts, run as a user runs them, on a tiny synthetic data set (issue 7)."""
import math
import re

import pytest
import tifffile

from tools.runner.pipeline import DemoConfig, run_pipeline
from utils.reporting import METHODS


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    cfg = DemoConfig(classes=("bagel",), n_train=4, n_val=0, n_test_good=3, n_test_defect=2,
                     defects=("stain", "crack"), size=200, pretrain_clouds=2, epochs=0, batch_size=8,
                     workers=2, seed=0)
    return run_pipeline(tmp_path_factory.mktemp("e2e"), cfg, quiet=True)


def test_outputs_exist(e2e):
    d = e2e.result_dir
    for name in ("results.txt", "results.json", "alignment.txt", "bagel/testing_state.txt"):
        assert (d / name).is_file(), name
    heatmaps = sorted((d / "bagel" / "Visualization" / "images").glob("*.png"))
    assert len(heatmaps) == 3 + 2 * 2
    maps = sorted((d / "anomaly_maps" / "bagel" / "test").glob("*/*.tiff"))
    assert len(maps) == 7
    m = tifffile.imread(maps[0])
    assert m.shape == (200, 200) and m.dtype.name == "float32"


def test_tables_parse_and_metrics_in_range(e2e):
    text = e2e.results_txt
    for title in ("Image ROCAUC Results", "Pixel ROCAUC Results", "AU PRO Results"):
        assert title in text
    rows = re.findall(r"^\| (RGB_SDF|RGB|SDF)(?:_[0-9.]+)?\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*$", text, re.M)
    assert len(rows) == 3 + 3 + 21
    for _, cls_value, mean in rows:
        assert 0.0 <= float(cls_value) <= 1.0 and cls_value == mean   # one class: mean == class value
    metrics = e2e.results["classes"]["bagel"]["metrics"]
    for m in METHODS:
        values = [metrics[m]["image_auroc"], metrics[m]["pixel_auroc"], *metrics[m]["au_pro"].values()]
        assert len(values) == 9 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (m, values)


def test_detection_well_above_chance(e2e):
    """3 good vs 4 colour-defect test samples (12 pairs): a broken pipeline does not rank them."""
    table = e2e.results_txt.split("Image ROCAUC Results")[1].split("Pixel ROCAUC Results")[0]
    score = {m: float(v) for m, v in re.findall(r"^\| (RGB_SDF|RGB|SDF)\s*\|\s*([0-9.]+)", table, re.M)}
    assert set(score) == set(METHODS)
    assert score["RGB_SDF"] >= 0.8, e2e.results_txt
