"""Tests for utils/visualization.py (SPEC 10)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve

from utils.visualization import (
    _opening,
    denormalize_rgb,
    gt_outline_mask,
    heatmap_panels,
    optimal_threshold,
    save_heatmaps,
)

GRAY = 120


def sklearn_threshold(labels, scores):
    """The reference's computation, verbatim in spirit: PR curve, F1 with 0 where P+R=0, argmax."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    a, b = 2 * precision * recall, precision + recall
    f1 = np.divide(a, b, out=np.zeros_like(a), where=b != 0)
    return thresholds[np.argmax(f1)]


def is_red(img):
    return (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)


def crack_and_blob():
    """Sample 0: a 2-px wide vertical crack (rows 40-179, cols 100-101). Sample 1: a 60x60 blob."""
    rgb = np.full((2, 224, 224, 3), GRAY, dtype=np.uint8)
    masks = np.zeros((2, 224, 224), dtype=np.uint8)
    masks[0, 40:180, 100:102] = 1
    masks[1, 60:120, 50:110] = 1
    fused = np.zeros((2, 224, 224), dtype=np.float32)
    fused[0, 40:180, 96:106] = 0.5  # a 10-px wide predicted band
    fused[0, 5:7, 5:7] = 0.9  # a 2x2 speck above the threshold: removed by the opening
    fused[1, 60:120, 50:110] = 1.0
    return rgb, masks, fused


# ----------------------------------------------------------------------------- thresholds
def test_optimal_threshold_hand_cases():
    # thresholds .1/.35/.4/.8 -> (P, R) = (1/2, 1), (2/3, 1), (1/2, 1/2), (1, 1/2); F1 = 2/3, 0.8, 1/2, 2/3
    assert optimal_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.35)
    # tied scores: .1 -> F1 2/3; .5 -> P 2/3, R 1, F1 0.8; .9 -> P 1/2, R 1/2, F1 1/2
    assert optimal_threshold([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == pytest.approx(0.5)
    # equal F1 maxima go to the first, i.e. the lowest threshold:
    # .1: P 1/2, R 1 -> 2/3; .2: P 1/3, R 1/2 -> .4; .3: P 1/2, R 1/2 -> .5; .4: P 1, R 1/2 -> 2/3
    assert optimal_threshold([1, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.1)
    assert sklearn_threshold([1, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        optimal_threshold([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(4))
def test_optimal_threshold_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(3000) < 0.1).astype(int)
    scores = (np.floor((rng.random(3000) + 0.4 * labels) * 20) / 20).astype(np.float32)
    assert optimal_threshold(labels, scores) == sklearn_threshold(labels, scores)


# ----------------------------------------------------------------------------- panels
def test_opening_erases_thin_crack_but_outline_keeps_it():
    _, masks, _ = crack_and_blob()
    assert not _opening(masks[0]).any()  # the reference would draw nothing
    np.testing.assert_array_equal(gt_outline_mask(masks[0]), masks[0].astype(bool))


def test_outline_of_a_blob_is_the_reference_opening():
    _, masks, _ = crack_and_blob()
    opened = _opening(masks[1])
    assert opened.sum() == 60 * 60 - 4 * 3  # three pixels cut from each corner by disk(2)
    np.testing.assert_array_equal(gt_outline_mask(masks[1]), opened)


def test_outline_keeps_a_crack_leaving_a_blob():
    mask = np.zeros((224, 224), dtype=np.uint8)
    mask[60:120, 50:110] = 1
    mask[119:200, 80:82] = 1  # 2-px crack running down from the blob
    keep = gt_outline_mask(mask)
    assert keep[130:200, 80:82].all()
    np.testing.assert_array_equal(keep[60:118], _opening(mask)[60:118])


def test_panels_pixels():
    rgb, masks, fused = crack_and_blob()
    gt0, heat0, pred0 = heatmap_panels(rgb[0], masks[0], fused[0], 0.3, class_max=1.0)
    red = is_red(gt0)
    # thick boundary of the crack: the crack pixels and their 4-neighbours
    assert red[100, 99:103].all() and red[40:180, 100].all() and red[39, 100]
    assert not red[100, 97] and not red[100, 104] and not red[20, 20]
    assert (gt0[~red] == GRAY).all()
    # heat map: fused * 255 / class max, truncated
    assert heat0[100, 100] == 127 and heat0[0, 0] == 0 and heat0[6, 6] == 229
    # prediction contour: the 10-px band survives the opening, the 2x2 speck does not
    pred_red = is_red(pred0)
    assert pred_red[100, 95] and pred_red[100, 96] and pred_red[100, 105] and pred_red[100, 106]
    assert not pred_red[100, 100] and not pred_red[:20, :20].any()

    gt1, _, pred1 = heatmap_panels(rgb[1], masks[1], fused[1], 0.3, class_max=1.0)
    for img in (gt1, pred1):
        r = is_red(img)
        assert r[90, 49] and r[90, 50] and r[59, 80] and r[60, 80] and r[90, 109] and r[119, 80]
        assert not r[90, 80] and not r[90, 47]


def test_denormalize_clips_instead_of_wrapping():
    x = np.zeros((1, 3, 2, 2))
    x[0, :, 0, 0] = 5.0  # far above white
    x[0, :, 0, 1] = -5.0  # far below black
    out = denormalize_rgb(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert out.shape == (1, 2, 2, 3) and out.dtype == np.uint8
    assert (out[0, 0, 0] == 255).all() and (out[0, 0, 1] == 0).all()
    np.testing.assert_array_equal(out[0, 1, 0], (np.array([0.485, 0.456, 0.406]) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------- files
def test_save_heatmaps_renders_visible_contours(tmp_path):
    rgb, masks, fused = crack_and_blob()
    out = tmp_path / "torus" / "Visualization" / "images"
    paths = save_heatmaps(out, rgb, masks, fused, seg_threshold=0.3, dpi=60)
    assert [p.name for p in paths] == ["00000000.png", "00000001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["00000000.png", "00000001.png"]  # no temporary left
    for i, path in enumerate(paths):
        img = np.asarray(Image.open(path).convert("RGB"))
        height, width, _ = img.shape
        assert 2.9 < height / width < 3.4  # three stacked square panels
        ys, xs = np.nonzero(is_red(img[:width]))  # top panel: pixel -> image coordinate = * 224 / width
        assert ys.size > 0
        xs_img, ys_img = xs * 224 / width, ys * 224 / width
        if i == 0:  # the crack: a vertical red line around column 100, rows 40-180
            assert 96 < xs_img.min() and xs_img.max() < 105
            assert ys_img.min() < 45 and ys_img.max() > 175
        else:  # the blob outline, columns 50-110
            assert 46 < xs_img.min() < 53 and 106 < xs_img.max() < 113
        middle = img[width : height - width]
        assert (middle[..., 2] > middle[..., 0]).any()  # jet overlay: blue where the map is 0


def test_save_heatmaps_rejects_bad_shapes(tmp_path):
    rgb, masks, fused = crack_and_blob()
    with pytest.raises(ValueError, match="uint8"):
        save_heatmaps(tmp_path, rgb.astype(np.float32), masks, fused, 0.3, dpi=30)
    with pytest.raises(ValueError, match="shapes"):
        save_heatmaps(tmp_path, rgb, masks[:1], fused, 0.3, dpi=30)
