"""End-to-end: the four scripts, run as a user runs them, on a tiny synthetic data set (issues 7, 13).

The class is rope, whose samples are 330 x 370 (not square, no multiple of 100): preprocessing
pads them to 400 x 400, and main.py must give its maps, and its native-protocol numbers, at
the raw size, as the official MVTec 3D-AD evaluation reads them (SPEC 9.2).
"""
import math
import re

import pytest
import tifffile

from tests import official_evaluation as official
from tools.runner.pipeline import DemoConfig, run_pipeline
from utils.io import read_gray
from utils.reporting import METHODS, NATIVE_TITLE

CLS = "rope"
RAW_SHAPE = (330, 370)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    cfg = DemoConfig(classes=(CLS,), n_train=4, n_val=0, n_test_good=3, n_test_defect=2,
                     defects=("stain", "crack"), pretrain_clouds=2, epochs=0, batch_size=8, workers=2, seed=0)
    return run_pipeline(tmp_path_factory.mktemp("e2e"), cfg, quiet=True)


def test_outputs_exist_and_maps_have_the_raw_gt_size(e2e):
    d = e2e.result_dir
    for name in ("results.txt", "results.json", "alignment.txt", f"{CLS}/testing_state.txt"):
        assert (d / name).is_file(), name
    heatmaps = sorted((d / CLS / "Visualization" / "images").glob("*.png"))
    assert len(heatmaps) == 3 + 2 * 2
    maps = sorted((d / "anomaly_maps" / CLS / "test").glob("*/*.tiff"))
    assert len(maps) == 7
    for path in maps:
        m = tifffile.imread(path)
        gt = read_gray(e2e.out / "raw" / CLS / "test" / path.parent.name / "gt" / f"{path.stem}.png")
        assert m.shape == gt.shape == RAW_SHAPE and m.dtype.name == "float32"
    assert tifffile.imread(e2e.out / "preprocessed" / CLS / "test" / "good" / "xyz" / "000.tiff").shape[:2] == (400,
                                                                                                              400)


def test_tables_parse_and_metrics_in_range(e2e):
    paper, native = e2e.results_txt.split(NATIVE_TITLE)
    for title in ("Image ROCAUC Results", "Pixel ROCAUC Results", "AU PRO Results"):
        assert title in paper
    rows = re.findall(r"^\| (RGB_SDF|RGB|SDF)(?:_[0-9.]+)?\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*$", paper, re.M)
    assert len(rows) == 3 + 3 + 21
    native_rows = re.findall(r"^\| ((?:RGB_SDF|RGB|SDF)_(?:Pixel_ROCAUC|AU_PRO_[0-9.]+))\s*\|\s*([0-9.]+)\s*\|"
                             r"\s*([0-9.]+)\s*\|\s*$", native, re.M)
    assert native.startswith(", maps and gt at each raw sample's size \n\n") and len(native_rows) == 3 * 8
    for _, cls_value, mean in rows + native_rows:
        assert 0.0 <= float(cls_value) <= 1.0 and cls_value == mean   # one class: mean == class value
    metrics = e2e.results["classes"][CLS]["metrics"]
    for m in METHODS:
        values = [metrics[m]["image_auroc"], metrics[m]["pixel_auroc"], *metrics[m]["au_pro"].values()]
        assert len(values) == 9 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (m, values)


def test_official_evaluation_of_the_saved_maps_gives_the_reported_native_numbers(e2e):
    """The official MVTec 3D-AD evaluation's computation (tests/official_evaluation.py), pointed at the
    raw data set and the saved maps, reproduces results.json's native-protocol RGB_SDF numbers."""
    native = e2e.results["native_protocol"]
    entry = native["classes"][CLS]
    assert entry["frame"] == "raw" and entry["raw_sizes_from"] == ["preprocessing manifest"]
    got = official.evaluate_object(e2e.out / "raw", e2e.result_dir / "anomaly_maps", CLS)
    reported = entry["metrics"]["RGB_SDF"]
    for limit, value in got["au_pro"].items():
        assert reported["au_pro"][str(limit)] == pytest.approx(value, abs=1e-6), limit
    assert reported["pixel_auroc"] == pytest.approx(got["pixel_auroc"], abs=1e-6)
    assert reported["image_auroc_map_max"] == pytest.approx(got["image_auroc"], abs=1e-6)
    # the paper protocol (224 x 224 gt) and the native one are different computations
    assert reported["au_pro"]["0.3"] != e2e.results["classes"][CLS]["metrics"]["RGB_SDF"]["au_pro"]["0.3"]


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
                     n_test_defect=1, defects=("dent", "stain", "crack"), size=[128], pretrain_clouds=1, epochs=0,
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
