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


# ----------------------------------------------------------------------------- Eyecandies (issue 15)
@pytest.fixture(scope="module")
def e2e_eyecandies(tmp_path_factory):
    """A synthetic Eyecandies release -> tools/prepare_eyecandies.py -> the four scripts, with two
    method flags given to main.py."""
    cfg = DemoConfig(dataset="eyecandies", classes=("CandyCane",), n_train=4, n_val=0, n_test_good=2,
                     n_test_defect=1, defects=("dent", "stain", "crack"), size=128, pretrain_clouds=1, epochs=0,
                     batch_size=8, workers=2, seed=0, extra_main_args=["--n_train", "3", "--k_sdf", "8"])
    return run_pipeline(tmp_path_factory.mktemp("e2e_eyecandies"), cfg, quiet=True)


def test_eyecandies_release_through_the_four_scripts(e2e_eyecandies):
    res = e2e_eyecandies
    assert "|   CandyCane |" in res.results_txt.split("Pixel ROCAUC")[0]   # the release's name, not Candycane
    assert set(res.seconds) == {"generate", "prepare_eyecandies", "preprocess", "cut_patches",
                                "cut_patches --pretrain", "train_3Dmodel", "main"}
    cls = res.results["classes"]["CandyCane"]
    assert res.results["method_params"]["n_train"] == 3 and res.results["method_params"]["k_sdf"] == 8
    assert cls["memory_samples"] == 3 and len(cls["train_subset"]) == 3
    assert set(cls["per_defect_type"]["RGB_SDF"]) == {"colors", "combined", "dents"}
    for m in METHODS:
        values = [cls["metrics"][m]["image_auroc"], cls["metrics"][m]["pixel_auroc"]]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (m, values)
    maps = sorted((res.result_dir / "anomaly_maps" / "CandyCane" / "test").glob("*/*.tiff"))
    assert [p.parent.name for p in maps] == ["colors", "combined", "dents", "good", "good"]
    assert res.results["classes"]["CandyCane"]["metrics"]["RGB_SDF"]["pixel_auroc"] >= 0.8, res.results_txt
