"""Tests for utils/reporting.py (SPEC 9, 9.1): exact file contents."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from utils.metrics import PRO_LIMITS, evaluate_method
from utils import reporting
from utils.reporting import METHODS, alignment_line, results_json, results_tables

METHOD_KEYS = {
    "RGB": ("rgb_map", "rgb_image_score"),
    "SDF": ("sdf_map", "sdf_image_score"),
    "RGB_SDF": ("pixel_map", "image_score"),
}


@pytest.fixture(scope="module")
def parity_results(parity_dir):
    pred = np.load(parity_dir / "expected" / "torus" / "predictions.npz")
    results = {
        "torus": {
            m: evaluate_method(pred["labels"], pred[s], pred["gt"], pred[k]) for m, (k, s) in METHOD_KEYS.items()
        }
    }
    return results, pred


def fake_results(value_of, classes=("bagel", "cable_gland")):
    """results[cls][method] with every metric set by value_of(cls, method, metric)."""
    return {
        cls: {
            m: {
                "image_auroc": value_of(cls, m, "image"),
                "pixel_auroc": value_of(cls, m, "pixel"),
                "au_pro": {limit: value_of(cls, m, limit) for limit in PRO_LIMITS},
            }
            for m in METHODS
        }
        for cls in classes
    }


def test_results_txt_is_byte_identical(parity_dir, parity_results):
    results, _ = parity_results
    expected = (parity_dir / "expected" / "results.txt").read_bytes()
    assert results_tables(results, ["torus"]).encode("utf-8") == expected


def test_testing_state_is_identical(parity_dir, parity_results):
    results, _ = parity_results
    expected = (parity_dir / "expected" / "torus" / "testing_state.txt").read_text()
    assert reporting.testing_state_text("torus", results["torus"]) == expected


def test_testing_state_with_thresholds(parity_results):
    results, _ = parity_results
    text = reporting.testing_state_text("torus", results["torus"], det_threshold=0.30449, seg_threshold=1.2)
    lines = text.split("\n")
    assert lines[:2] == ["Optimal DET Threshold: 0.30", "Optimal SEG Threshold: 1.20"]
    head = "Class: torus, RGB Image ROCAUC: 0.750, RGB Pixel ROCAUC: 0.973, RGB"
    assert lines[2] == head + " " * 17 + "AU-PRO 0.3: 0.892"
    assert lines[3] == " " * 17 + "AU-PRO 0.2: 0.838"


def test_alignment_line_is_identical(parity_dir, parity_results):
    _, pred = parity_results
    expected = (parity_dir / "expected" / "alignment.txt").read_text()
    assert alignment_line("torus", pred["align_weight"], pred["align_bias"]) == expected
    assert alignment_line("bagel", 1.5, -0.25) == "'bagel'\t:[1.5000000000000000, -0.2500000000000000],\n"


def test_mean_column_averages_the_rounded_values():
    """Bagel 0.0004 -> 0.0, Cable_Gland 0.0014 -> 0.001: mean of rounded = 0.0005 -> 0.0 (round half
    to even); the mean of the unrounded values (0.0009) would give 0.001."""
    results = fake_results(lambda cls, m, metric: 0.0004 if cls == "bagel" else 0.0014)
    text = results_tables(results, ["bagel", "cable_gland"])
    assert "| Method   |   Bagel |   Cable_Gland |   Mean |" in text
    assert "| RGB      |       0 |         0.001 |      0 |" in text
    assert "| RGB_SDF_0.01 |       0 |         0.001 |      0 |" in text
    assert text.startswith("Image ROCAUC Results \n\n| Method ")
    assert "\n\nPixel ROCAUC Results \n\n" in text and "\n\nAU PRO Results \n\n" in text
    assert not text.endswith("\n")


def test_table_values_and_rows():
    base = {"RGB": 0.91234, "SDF": 0.5, "RGB_SDF": 0.98765}
    results = fake_results(lambda cls, m, metric: base[m] - (0.1 if cls == "bagel" else 0))
    text = results_tables(results, ["bagel", "cable_gland"])
    rows = [line.split("|")[1].strip() for line in text.split("AU PRO Results")[1].splitlines() if line.startswith("|")]
    assert rows[2:] == [f"{m}_{limit}" for m in METHODS for limit in PRO_LIMITS]
    assert "| RGB_SDF  |   0.888 |         0.988 |  0.938 |" in text  # (0.888 + 0.988) / 2


def test_eyecandies_titles_are_kept_as_written():
    """``str.title()`` would write ``Candycane`` and ``Chocolatecookie``; the release's names stay."""
    classes = ["CandyCane", "ChocolateCookie", "cable_gland"]
    text = results_tables(fake_results(lambda cls, m, metric: 0.5, classes), classes)
    assert "| Method   |   CandyCane |   ChocolateCookie |   Cable_Gland |   Mean |" in text
    assert "Candycane" not in text


def test_results_json(parity_results):
    results, pred = parity_results
    results = {**results, "empty": {m: {"image_auroc": float("nan"), "pixel_auroc": 0.5,
                                         "au_pro": {limit: float("nan") for limit in PRO_LIMITS}} for m in METHODS}}
    data = results_json(results, ["torus", "empty"], alignment={"torus": (pred["align_weight"], pred["align_bias"])},
                        thresholds={"torus": (0.3, 1.2)})
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    back = json.loads(text)
    torus = back["classes"]["torus"]
    assert torus["metrics"]["RGB_SDF"]["pixel_auroc"] == results["torus"]["RGB_SDF"]["pixel_auroc"]
    assert torus["metrics"]["SDF"]["au_pro"]["0.07"] == results["torus"]["SDF"]["au_pro"][0.07]
    assert torus["alignment"] == {"weight": float(pred["align_weight"]), "bias": float(pred["align_bias"])}
    assert torus["optimal_thresholds"] == {"detection": 0.3, "segmentation": 1.2}
    assert back["classes"]["empty"]["metrics"]["RGB"]["image_auroc"] is None
    assert back["mean"]["RGB"]["pixel_auroc"] == pytest.approx((results["torus"]["RGB"]["pixel_auroc"] + 0.5) / 2)
    assert back["mean"]["RGB"]["image_auroc"] is None  # NaN propagates into the mean
    assert back["pro_limits"] == list(PRO_LIMITS) and back["methods"] == list(METHODS)
    assert not math.isnan(back["mean"]["SDF"]["pixel_auroc"])


def test_native_table_titles_name_the_frame():
    native = fake_results(lambda cls, m, metric: 0.5 if metric in ("image", "pixel") else metric)
    native = {c: {m: {"pixel_auroc": r["pixel_auroc"], "au_pro": r["au_pro"], "image_auroc": 0.5}
                  for m, r in per.items()} for c, per in native.items()}
    classes = ["bagel", "cable_gland"]
    raw = reporting.native_table(native, {"bagel": "raw", "cable_gland": "raw"}, classes)
    assert raw.startswith(f"{reporting.NATIVE_TITLE}, maps and gt at each raw sample's size \n\n| Method ")
    assert "| RGB_AU_PRO_0.07      |    0.07 |          0.07 |   0.07 |" in raw
    pre = reporting.native_table(native, {"bagel": "preprocessed", "cable_gland": "preprocessed"}, classes)
    assert pre.splitlines()[0].endswith("maps and gt in the preprocessed, padded frame: raw sizes unknown ")
    mixed = reporting.native_frame_text({"bagel": "raw", "cable_gland": "preprocessed"}, classes)
    assert mixed == "frame per class: Bagel raw, Cable_Gland preprocessed"
