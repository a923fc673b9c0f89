"""Tests for utils/metrics.py (SPEC 9, Appendix C.4).

The vectorised AU-PRO is compared with a straightforward transcription of the SPEC 9
procedure written here (per-image labelling, per-threshold and per-component loops,
explicit trapezoids), with hand-computed cases, and with the reference's own numbers
on the parity fixture. :class:`GroundTruthSet` (native resolution, SPEC 9.2) is compared with
a loop-based transcription of the official MVTec 3D-AD evaluation (``tests/official_evaluation.py``)
on hand-made cases of images of different sizes.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from tests import official_evaluation as official
from utils.metrics import GroundTruthSet, PRO_LIMITS, au_pro, evaluate_method, image_auroc, pixel_auroc, pro_curve

METHOD_KEYS = {
    "RGB": ("rgb_map", "rgb_image_score"),
    "SDF": ("sdf_map", "sdf_image_score"),
    "RGB_SDF": ("pixel_map", "image_score"),
}


# ----------------------------------------------------------------------------- plain reference
def plain_pro_curve(masks, maps, num_thresholds=100):
    ok_scores, components = [], []
    for mask, amap in zip(masks, maps):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        ok_scores.extend(amap[labeled == 0].tolist())
        for k in range(1, n + 1):
            components.append(amap[labeled == k].tolist())
    ok_scores.sort()
    n = len(ok_scores)
    points = [(1.0, 1.0)]
    for v in np.linspace(0, n - 1, num_thresholds):
        pos = int(math.floor(v))
        threshold = ok_scores[pos]
        fpr = 1.0 - (pos + 1) / n
        overlaps = [sum(1 for s in comp if s > threshold) / len(comp) for comp in components]
        points.append((fpr, sum(overlaps) / len(overlaps)))
    points.sort(key=lambda p: p[0])
    return points


def plain_area(points, limit):
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def plain_au_pro(masks, maps, limits):
    points = plain_pro_curve(masks, maps)
    return {limit: plain_area(points, limit) for limit in limits}


def random_case(rng, n_images=8, size=48, levels=12):
    """Quantised maps (many ties), several blobs and thin lines per defect image, good images."""
    maps = np.floor(rng.random((n_images, size, size)) * levels) / levels
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    for i in range(n_images // 2):  # the other half stays anomaly-free
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 8, 2)
            h, w = rng.integers(1, 8, 2)
            masks[i, r : r + h, c : c + w] = 1
        r, c = rng.integers(0, size - 10, 2)
        masks[i, np.arange(r, r + 10), np.arange(c, c + 10)] = 1  # diagonal: one 8-connected component
    maps = maps + 0.3 * masks * rng.random(masks.shape)
    return masks, np.floor(maps * levels) / levels


# ----------------------------------------------------------------------------- AU-PRO
def test_hand_computed_au_pro():
    """Two 2x2 images; every number below is derived by hand.

    Image 1: gt [[1,0],[0,1]] is ONE component C1 under 8-connectivity (two pixels, scores
    0.2 and 0.45); its OK pixels score 0.1 and 0.3. Image 2: gt [[0,0],[0,1]] is C2 (score
    0.35); OK pixels 0.2, 0.4, 0.5. OK sorted: [.1 .2 .3 .4 .5], n = 5; floor(linspace(0, 4, 100))
    hits every position 0..4, FPR = 1 - (pos+1)/5.
      pos 4, t=.5, FPR 0:  C1 0/2, C2 0   -> PRO 0
      pos 3, t=.4, FPR .2: C1 1/2, C2 0   -> .25
      pos 2, t=.3, FPR .4: C1 1/2, C2 1   -> .75
      pos 1, t=.2, FPR .6: C1 1/2 (0.2 is not > 0.2), C2 1 -> .75
      pos 0, t=.1, FPR .8: C1 1, C2 1     -> 1;   plus (1, 1).
    Areas: [0,.2] = .5*.25*.2 = .025; [.2,.4] = .5*(.25+.75)*.2 = .1; [.4,.6] = .15; [.6,.8] = .175.
      limit .1: y(.1) = .125, area .5*.125*.1 = .00625        -> .0625
      limit .3: .025 + .5*(.25+.5)*.1 = .0625                 -> .208333...
      limit .4 (a curve point, 1 - .6 == .4 exactly): .125    -> .3125
      limit .5: .125 + .75*.1 = .2                            -> .4
      limit .7: .275 + .5*(.75+.875)*.1 = .35625              -> .508928...
    With 4-connectivity C1 would split and PRO(.4) would be 1/3; with ">=" PRO(.2) would be 1.
    """
    masks = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 1]]], dtype=np.uint8)
    maps = np.array([[[0.2, 0.1], [0.3, 0.45]], [[0.2, 0.4], [0.5, 0.35]]])
    fprs, pros = pro_curve(masks, maps)
    assert len(fprs) == 101 and fprs[0] == 0.0 and fprs[-1] == 1.0 and np.all(np.diff(fprs) >= 0)
    distinct = sorted(set(zip(fprs.round(12), pros.round(12))))
    assert distinct == [(0.0, 0.0), (0.2, 0.25), (0.4, 0.75), (0.6, 0.75), (0.8, 1.0), (1.0, 1.0)]
    result = au_pro(masks, maps, limits=(0.1, 0.3, 0.4, 0.5, 0.7))
    expected = {0.1: 0.0625, 0.3: 0.0625 / 0.3, 0.4: 0.3125, 0.5: 0.4, 0.7: 0.35625 / 0.7}
    for limit, value in expected.items():
        assert result[limit] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_au_pro_equals_plain_implementation(seed):
    rng = np.random.default_rng(seed)
    masks, maps = random_case(rng)
    limits = PRO_LIMITS + (0.123456, 0.5)
    got = au_pro(masks, maps, limits=limits)
    want = plain_au_pro(masks, maps, limits)
    for limit in limits:
        assert got[limit] == pytest.approx(want[limit], abs=1e-12), limit


def test_au_pro_with_fewer_ok_pixels_than_thresholds_and_float32():
    """Repeated threshold positions (n < 100) and float32 maps compared with float64 thresholds."""
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 6, 6), dtype=np.uint8)
    masks[0, 1:5, 1:5] = 1
    masks[1, :, 2:] = 1
    maps = rng.random((2, 6, 6)).astype(np.float32)
    got = au_pro(masks, maps, limits=(0.3, 0.05))
    want = plain_au_pro(masks, maps, (0.3, 0.05))
    assert got == pytest.approx(want, abs=1e-12)


def test_limit_exactly_on_a_curve_point():
    rng = np.random.default_rng(11)
    masks, maps = random_case(rng)
    fprs, _ = pro_curve(masks, maps)
    limit = float(fprs[40])  # a point of the curve: no partial trapezoid
    want = plain_au_pro(masks, maps, (limit,))[limit]
    assert au_pro(masks, maps, limits=(limit,))[limit] == pytest.approx(want, abs=1e-12)


def test_perfect_and_inverted_maps():
    masks = np.zeros((3, 16, 16), dtype=np.uint8)
    masks[0, 4:8, 4:8] = 1
    masks[1, 10:12, 0:16] = 1
    perfect = masks.astype(np.float64) + 0.01 * np.arange(16)[None, None, :] / 16
    assert all(v == pytest.approx(1.0) for v in au_pro(masks, perfect).values())
    assert all(v == pytest.approx(0.0) for v in au_pro(masks, 1.0 - perfect).values())


def test_undefined_au_pro_is_nan_with_a_warning():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match="AU-PRO"):
        result = au_pro(masks, np.random.default_rng(0).random((2, 8, 8)))
    assert set(result) == set(PRO_LIMITS) and all(math.isnan(v) for v in result.values())


# ----------------------------------------------------------------------------- AUROCs
def test_pixel_auroc_hand_cases():
    # four pairs (positive, negative): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert pixel_auroc(np.array([[0, 0, 1, 1]]), np.array([[0.1, 0.4, 0.35, 0.8]])) == 0.75
    # a tie between a positive and a negative counts 1/2: (1 + 0.5 + 1 + 1) / 4
    assert pixel_auroc(np.array([[0, 0, 1, 1]]), np.array([[0.1, 0.4, 0.4, 0.8]])) == 0.875


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_equals_sklearn(dtype):
    rng = np.random.default_rng(5)
    masks, maps = random_case(rng, n_images=10, size=40, levels=7)
    maps = maps.astype(dtype)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-14)


def test_image_auroc_and_undefined_cases():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    with pytest.warns(RuntimeWarning):
        assert math.isnan(image_auroc([1, 1], [0.2, 0.3]))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(pixel_auroc(np.zeros((1, 3, 3)), np.ones((1, 3, 3))))
    with pytest.raises(ValueError):
        pixel_auroc(np.zeros((1, 3, 3)), np.ones((1, 3, 4)))


def test_evaluate_method_layout():
    rng = np.random.default_rng(3)
    masks, maps = random_case(rng)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    r = evaluate_method(labels, scores, masks, maps)
    assert set(r) == {"image_auroc", "pixel_auroc", "au_pro"}
    assert r["image_auroc"] == roc_auc_score(labels, scores)
    assert list(r["au_pro"]) == list(PRO_LIMITS)


# ----------------------------------------------------------------------------- parity
def parse_results(text):
    """{(table, row): value} from the reference's results.txt (single-class column)."""
    values, table = {}, None
    for line in text.splitlines():
        if line.endswith("Results "):
            table = line.strip()
        m = re.match(r"\|\s*([A-Z_0-9.]+)\s*\|\s*([0-9.]+)\s*\|", line)
        if m and table:
            values[(table, m.group(1))] = float(m.group(2))
    return values


def test_parity_metrics_reproduce_reference_results(parity_dir):
    pred = np.load(parity_dir / "expected" / "torus" / "predictions.npz")
    expected = parse_results((parity_dir / "expected" / "results.txt").read_text())
    assert len(expected) == 3 + 3 + 21
    for method, (map_key, score_key) in METHOD_KEYS.items():
        r = evaluate_method(pred["labels"], pred[score_key], pred["gt"], pred[map_key])
        assert round(r["image_auroc"], 3) == expected[("Image ROCAUC Results", method)]
        assert round(r["pixel_auroc"], 3) == expected[("Pixel ROCAUC Results", method)]
        for limit in PRO_LIMITS:
            assert round(r["au_pro"][limit], 3) == expected[("AU PRO Results", f"{method}_{limit}")]
        # and the vectorised curve equals the plain one on the real maps
        plain = plain_au_pro(pred["gt"], pred[map_key], (0.3, 0.01))
        assert r["au_pro"][0.3] == pytest.approx(plain[0.3], abs=1e-12)
        assert r["au_pro"][0.01] == pytest.approx(plain[0.01], abs=1e-12)


def test_per_defect_type_uses_good_plus_one_type():
    from utils.metrics import per_defect_type

    defects = ["good", "good", "dent", "dent", "stain"]
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.5, 0.3, 0.05])   # dent: pairs (0.5>0.1,0.5>0.4,0.3>0.1,0.3<0.4) -> 3/4
    masks = np.zeros((5, 2, 2), np.float32)
    masks[2:, 0, 0] = 1
    maps = np.zeros((5, 2, 2))
    maps[2, 0, 0] = maps[3, 0, 0] = 1.0              # dent pixels perfectly ranked, stain pixel missed
    out = per_defect_type(defects, labels, scores, masks, maps)
    assert sorted(out) == ["dent", "stain"]
    assert out["dent"]["n"] == 2 and out["dent"]["image_auroc"] == 0.75 and out["dent"]["pixel_auroc"] == 1.0
    assert out["stain"]["image_auroc"] == 0.0
    assert out["stain"]["pixel_auroc"] == 0.5    # its only defect pixel ties with the 11 zero background pixels


# ----------------------------------------------------------------------------- native resolution (SPEC 9.2)
HAND_MASKS = [np.array([[1, 0], [0, 1]], np.uint8), np.array([[0, 0], [0, 1]], np.uint8)]
HAND_MAPS = [np.array([[0.2, 0.1], [0.3, 0.45]]), np.array([[0.2, 0.4], [0.5, 0.35]])]
HAND_AU_PRO = {0.1: 0.0625, 0.3: 0.0625 / 0.3, 0.4: 0.3125, 0.5: 0.4, 0.7: 0.35625 / 0.7}  # test_hand_computed_au_pro


def test_official_transcription_gives_the_hand_computed_values():
    """The test's own official-evaluation transcription reproduces the hand derivation above."""
    got = official.au_pro(HAND_MASKS, HAND_MAPS, limits=tuple(HAND_AU_PRO))
    for limit, value in HAND_AU_PRO.items():
        assert got[limit] == pytest.approx(value, abs=1e-12)


def test_ground_truth_set_hand_case_and_a_good_image_of_another_size():
    truth = GroundTruthSet(HAND_MASKS)
    with pytest.warns(RuntimeWarning, match="image AUROC"):   # both images are anomalous
        r = truth.evaluate(HAND_MAPS, limits=tuple(HAND_AU_PRO))
    for limit, value in HAND_AU_PRO.items():
        assert r["au_pro"][limit] == pytest.approx(value, abs=1e-12)
    # A 1x3 good image adds OK pixels .05, .25, .6: OK sorted [.05 .1 .2 .25 .3 .4 .5 .6], n = 8,
    # every position 0..7 a threshold, FPR = 1 - (pos+1)/8. C1 = {.2, .45}, C2 = {.35}:
    #   t=.6 FPR 0: 0;  t=.5 FPR 1/8: 0;  t=.4 FPR 2/8: (1/2 + 0)/2 = .25;  t=.3 FPR 3/8: .75; ...
    # AU-PRO(1/8) = 0 (a curve point); at 0.2, y = .25 * (.2 - .125) / .125 = .15 and the
    # partial trapezoid .5 * .15 * .075 = .005625 -> AU-PRO(.2) = .028125.
    # Image maxima .45 and .5 (defects) are below .6 (good): image AUROC 0.
    masks = HAND_MASKS + [np.zeros((1, 3), np.uint8)]
    maps = HAND_MAPS + [np.array([[0.05, 0.25, 0.6]])]
    r = GroundTruthSet(masks).evaluate(maps, limits=(0.125, 0.2))
    assert r["au_pro"][0.125] == 0.0
    assert r["au_pro"][0.2] == pytest.approx(0.028125, abs=1e-12)
    assert r["image_auroc"] == 0.0
    want = official.evaluate(masks, maps, limits=(0.125, 0.2))
    assert want["au_pro"][0.2] == pytest.approx(0.028125, abs=1e-12) and want["image_auroc"] == 0.0
    assert r["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-14)


def native_case(rng, n_images=7, levels=9):
    """Images of different sizes: several blobs, a diagonal line, good images, quantised scores (ties)."""
    masks, maps = [], []
    for i in range(n_images):
        h, w = rng.integers(20, 45, 2)
        mask = np.zeros((h, w), np.uint8)
        if i % 3:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, h - 6), rng.integers(0, w - 6)
                mask[r:r + rng.integers(1, 6), c:c + rng.integers(1, 6)] = 255
            mask[np.arange(5, 15), np.arange(3, 13)] = 7        # any non-zero value is anomalous
        amap = np.floor((rng.random((h, w)) + 0.4 * (mask > 0) * rng.random((h, w))) * levels) / levels
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


@pytest.mark.parametrize("seed", range(5))
def test_ground_truth_set_equals_the_official_evaluation(seed):
    masks, maps = native_case(np.random.default_rng(seed))
    limits = PRO_LIMITS + (0.123456, 0.5)
    got = GroundTruthSet(masks).evaluate(iter(maps), limits=limits)   # any iterable, consumed once
    want = official.evaluate(masks, maps, limits)
    for limit in limits:
        assert got["au_pro"][limit] == pytest.approx(want["au_pro"][limit], abs=1e-12), limit
    assert got["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-14)
    assert got["image_auroc"] == want["image_auroc"]


def test_ground_truth_set_equals_the_stacked_metrics_on_equal_sizes():
    """Same-size images: the native path gives the paper path's numbers exactly."""
    masks, maps = random_case(np.random.default_rng(4))
    got = GroundTruthSet(list(masks)).evaluate(list(maps))
    assert got["au_pro"] == au_pro(masks, maps)
    assert got["pixel_auroc"] == pixel_auroc(masks, maps)


def test_ground_truth_set_refuses_mismatched_maps():
    truth = GroundTruthSet(HAND_MASKS)
    with pytest.raises(ValueError, match="map 1 has shape"):
        truth.evaluate([HAND_MAPS[0], np.zeros((3, 2))])
    with pytest.raises(ValueError):
        truth.evaluate(HAND_MAPS[:1])
    with pytest.raises(ValueError, match="non-finite"):
        truth.evaluate([HAND_MAPS[0], np.full((2, 2), np.nan)])
