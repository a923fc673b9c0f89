"""Image AUROC, pixel AUROC and AU-PRO exactly as the reference evaluates them (SPEC 9).

AU-PRO follows the reference's adaptation of the official MVTec 3D-AD code (SPEC 9,
SPEC 11 #32 KEEP): ground-truth regions are 8-connected components; the 100 thresholds
are the anomaly-free ("OK") scores at positions ``floor(linspace(0, n-1, 100))`` of their
ascending order; FPR is position-based, ``1 - (pos+1)/n``; a component's overlap is the
fraction of its pixels scoring strictly above the threshold; the curve (with the point
(1, 1)) is integrated with the trapezoid rule up to each limit (interpolating at the
limit) and divided by the limit.

The computation is vectorised: one labelling call for the whole stack, one sort of
the OK scores, every component pixel binned once against the sorted thresholds, and
the curve computed once and integrated for all limits.
"""
from __future__ import annotations

import warnings
from bisect import bisect_right
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

PRO_LIMITS = (0.3, 0.2, 0.1, 0.07, 0.05, 0.03, 0.01)
NUM_THRESHOLDS = 100

# 8-connectivity inside each image and no connectivity between the stacked images.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True


class UndefinedMetricError(ValueError):
    """A metric that the given labels cannot define (e.g. AU-PRO without any defect)."""


def _undefined(metric: str, why: str) -> float:
    warnings.warn(f"{metric} is undefined: {why}; reporting NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Image-level AUROC: scikit-learn ``roc_auc_score(labels, scores)`` (SPEC 9).

    NaN (with a warning) when only one class is present.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"image_auroc: {labels.size} labels but {scores.size} scores")
    if np.unique(labels).size < 2:
        return _undefined("image AUROC", "the test set holds only one label")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all maps, background included (SPEC 9).

    ``masks`` (T, H, W) with values {0, 1}; ``maps`` (T, H, W). Same value as
    scikit-learn's ``roc_auc_score(masks.ravel(), maps.ravel())`` (its trapezoid over
    distinct thresholds equals the tie-corrected Mann-Whitney statistic), computed
    exactly in integer arithmetic from one sort of the scores instead of a stable
    argsort of millions of pixels. NaN (with a warning) when all pixels share one label.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"pixel_auroc: masks {masks.shape} and maps {maps.shape} differ in shape")
    scores = maps.ravel()
    if not np.isfinite(scores).all():
        raise ValueError("pixel_auroc: score maps contain non-finite values")
    positive = masks.ravel() != 0
    pos_scores = np.sort(scores[positive])
    n_pos = pos_scores.size
    n_neg = scores.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return _undefined("pixel AUROC", "all pixels have the same ground-truth label")
    all_sorted = np.sort(scores)
    # Each positive scores 1 per negative strictly below it and 1/2 per tied negative,
    # so 2U = sum(#negatives < p) + sum(#negatives <= p).
    neg_lt = np.searchsorted(all_sorted, pos_scores, "left") - np.searchsorted(pos_scores, pos_scores, "left")
    neg_le = np.searchsorted(all_sorted, pos_scores, "right") - np.searchsorted(pos_scores, pos_scores, "right")
    twice_u = int(neg_lt.sum(dtype=np.int64) + neg_le.sum(dtype=np.int64))
    return twice_u / (2 * n_pos * n_neg)


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int = NUM_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """The reference PRO curve (SPEC 9 steps 1-4): ``(fprs, pros)`` by ascending FPR.

    ``masks`` (T, H, W) binary ground truth; ``maps`` (T, H, W) scores. Returns
    ``num_thresholds + 1`` points: one per threshold from the highest (FPR 0) to the
    lowest, then (1, 1). Raises :class:`UndefinedMetricError` when there is no OK pixel
    or no ground-truth component.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"pro_curve: masks {masks.shape} and maps {maps.shape} must share one (T, H, W) shape")

    labeled, n_comp = ndimage.label(masks != 0, structure=_STACK_STRUCTURE)
    labeled = labeled.ravel()
    scores = maps.ravel()
    ok = labeled == 0
    ok_scores = scores[ok]
    n = ok_scores.size
    if n == 0 or n_comp == 0:
        raise UndefinedMetricError("PRO curve needs at least one anomaly-free pixel and one ground-truth region")

    # Thresholds: the OK scores at the given positions of their ascending order.
    positions = np.linspace(0, n - 1, num=num_thresholds, dtype=np.int64)
    thresholds = np.sort(ok_scores)[positions]
    fprs = 1.0 - (positions + 1) / n

    # Per component, count pixels with score <= threshold_k for every k at once: pixel i
    # is counted for all k >= first_k(i) = searchsorted(thresholds, s_i, 'left').
    comp_ids = labeled[~ok] - 1
    comp_scores = scores[~ok]
    first_k = np.searchsorted(thresholds, comp_scores, side="left")
    counts = np.bincount(comp_ids * (num_thresholds + 1) + first_k, minlength=n_comp * (num_thresholds + 1))
    cumulative = np.cumsum(counts.reshape(n_comp, num_thresholds + 1), axis=1)
    overlaps = 1.0 - cumulative[:, :num_thresholds] / cumulative[:, -1:]
    # Reduction over axis 0 adds the components one by one, in the reference's order.
    pros = overlaps.sum(axis=0) / n_comp

    fprs = np.concatenate([[1.0], fprs])[::-1]
    pros = np.concatenate([[1.0], pros])[::-1]
    return fprs, pros


def trapezoid_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) (x ascending) from x[0] up to ``x_max`` (SPEC 9 step 5).

    Non-finite points are dropped with a warning. When ``x_max`` lies strictly between
    two points, ``y`` is interpolated linearly there and the partial trapezoid added.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        warnings.warn("PRO curve has non-finite points; integrating the finite ones", RuntimeWarning, stacklevel=2)
        x, y = x[finite], y[finite]
    correction = 0.0
    if not np.any(x == x_max):
        i = bisect_right(x.tolist(), x_max)
        if not 0 < i < len(x):
            raise ValueError(f"integration limit {x_max} outside the curve's range [{x[0]}, {x[-1]}]")
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(
    masks: np.ndarray,
    maps: np.ndarray,
    limits: Sequence[float] = PRO_LIMITS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> dict[float, float]:
    """AU-PRO for every integration limit: ``{limit: area / limit}`` (SPEC 9).

    The curve is computed once. NaN (with a warning) for every limit when the class has
    no ground-truth region or no anomaly-free pixel.
    """
    try:
        fprs, pros = pro_curve(masks, maps, num_thresholds)
    except UndefinedMetricError:
        nan = _undefined("AU-PRO", "no ground-truth region or no anomaly-free pixel")
        return {float(limit): nan for limit in limits}
    return {float(limit): trapezoid_area(fprs, pros, limit) / limit for limit in limits}


def evaluate_method(
    labels: Sequence[int] | np.ndarray,
    image_scores: Sequence[float] | np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    limits: Sequence[float] = PRO_LIMITS,
) -> dict:
    """All metrics of one method on one class (SPEC 9).

    Returns ``{'image_auroc': float, 'pixel_auroc': float, 'au_pro': {limit: float}}``.
    """
    return {
        "image_auroc": image_auroc(labels, image_scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "au_pro": au_pro(masks, maps, limits),
    }


def per_defect_type(defects: Sequence[str], labels: np.ndarray, image_scores: np.ndarray,
                    masks: np.ndarray, maps: np.ndarray, good: str = "good") -> dict[str, dict]:
    """Image and pixel AUROC of each defect type against the good samples alone.

    ``defects[i]`` is the defect-type folder of test sample ``i``. For every type other than
    ``good`` the metrics are computed on the good samples plus the samples of that type, which
    shows which kind of anomaly a method detects (e.g. SDF: geometric, RGB: colour).
    """
    defects = np.asarray(defects)
    out = {}
    for kind in sorted(set(defects.tolist()) - {good}):
        keep = (defects == good) | (defects == kind)
        out[kind] = {"n": int((defects == kind).sum()),
                     "image_auroc": image_auroc(np.asarray(labels)[keep], np.asarray(image_scores)[keep]),
                     "pixel_auroc": pixel_auroc(masks[keep], maps[keep])}
    return out
