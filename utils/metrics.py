"""Image AUROC, pixel AUROC and AU-PRO exactly as the reference evaluates them (SPEC 9).

AU-PRO follows the reference's adaptation of the official MVTec 3D-AD code (SPEC 9,
SPEC 11 #32 KEEP): ground-truth regions are 8-connected components; the 100 thresholds
are the anomaly-free ("OK") scores at positions ``floor(linspace(0, n-1, 100))`` of their
ascending order; FPR is position-based, ``1 - (pos+1)/n``; a component's overlap is the
fraction of its pixels scoring strictly above the threshold; the curve (with the point
(1, 1)) is integrated with the trapezoid rule up to each limit (interpolating at the
limit) and divided by the limit.

The official MVTec 3D-AD evaluation script computes AU-PRO with this same algorithm (SPEC
9.2), at the native resolution of the maps it reads: :class:`GroundTruthSet` evaluates maps
of any sizes that way, image by image, with bounded memory, and scores images by their
maps' maxima, as that script does.

The computation is vectorised: one labelling call for the whole stack, one sort of
the OK scores, every component pixel binned once against the sorted thresholds, and
the curve computed once and integrated for all limits.
"""
from __future__ import annotations

import warnings
from bisect import bisect_right
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

PRO_LIMITS = (0.3, 0.2, 0.1, 0.07, 0.05, 0.03, 0.01)
NUM_THRESHOLDS = 100

# 8-connectivity inside each image and no connectivity between the stacked images.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True
_IMAGE_STRUCTURE = np.ones((3, 3), dtype=bool)


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
    exactly in integer arithmetic (:func:`_auroc_of_sorted`) instead of a stable argsort
    of millions of pixels. NaN (with a warning) when all pixels share one label.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"pixel_auroc: masks {masks.shape} and maps {maps.shape} differ in shape")
    scores = maps.ravel()
    _check_finite(scores, "pixel_auroc")
    positive = masks.ravel() != 0
    return _auroc_of_sorted(np.sort(scores[~positive]), np.sort(scores[positive]))


def _check_finite(scores: np.ndarray, what: str) -> None:
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: score maps contain non-finite values")


def _auroc_of_sorted(neg_sorted: np.ndarray, pos_sorted: np.ndarray) -> float:
    """AUROC of ascending negative and positive scores: the Mann-Whitney statistic, exact.

    Each positive scores 1 per negative strictly below it and 1/2 per tied negative, so
    2U = sum(#negatives < p) + sum(#negatives <= p), an integer. NaN (with a warning)
    when either side is empty.
    """
    n_neg, n_pos = neg_sorted.size, pos_sorted.size
    if n_pos == 0 or n_neg == 0:
        return _undefined("pixel AUROC", "all pixels have the same ground-truth label")
    neg_lt = np.searchsorted(neg_sorted, pos_sorted, "left")
    neg_le = np.searchsorted(neg_sorted, pos_sorted, "right")
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
    ok_scores.sort()
    return _pro_curve_of(ok_scores, labeled[~ok] - 1, scores[~ok], n_comp, num_thresholds)


def _pro_curve_of(ok_sorted: np.ndarray, comp_ids: np.ndarray, comp_scores: np.ndarray, n_comp: int,
                  num_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve from the ascending OK scores and each component pixel's (component, score).

    Components are numbered 0 ... n_comp - 1 in image order, then raster order of their
    first pixel (``scipy.ndimage.label``'s order), as the reference and the official code
    visit them.
    """
    n = ok_sorted.size
    if n == 0 or n_comp == 0:
        raise UndefinedMetricError("PRO curve needs at least one anomaly-free pixel and one ground-truth region")

    # Thresholds: the OK scores at the given positions of their ascending order.
    positions = np.linspace(0, n - 1, num=num_thresholds, dtype=np.int64)
    thresholds = ok_sorted[positions]
    fprs = 1.0 - (positions + 1) / n

    # Per component, count pixels with score <= threshold_k for every k at once: pixel i
    # is counted for all k >= first_k(i) = searchsorted(thresholds, s_i, 'left').
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
    return _au_pro_of(lambda: pro_curve(masks, maps, num_thresholds), limits)


def _au_pro_of(curve, limits: Sequence[float]) -> dict[float, float]:
    """``{limit: area / limit}`` of the curve ``curve()`` returns; NaN for all if it is undefined."""
    try:
        fprs, pros = curve()
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


class GroundTruthSet:
    """Ground-truth masks of images of any sizes, for metrics at native resolution (SPEC 9.2).

    Kept compactly: per image its shape, the flat indices of its anomalous (non-zero)
    pixels and their 8-connected component ids (numbered across images in order).
    :meth:`evaluate` then takes one method's maps, one image at a time, and holds only
    the anomaly-free scores (one array, sorted in place) and the anomalous ones, so a
    class of 160 samples of 800 x 800 costs about 0.4 GB in float32, not the stack of maps.
    """

    def __init__(self, masks: Iterable[np.ndarray]):
        self.shapes: list[tuple[int, ...]] = []
        self._positive: list[np.ndarray] = []
        self._comp_ids: list[np.ndarray] = []
        self.n_comp = 0
        self.n_ok = 0
        for mask in masks:
            mask = np.asarray(mask)
            if mask.ndim != 2:
                raise ValueError(f"GroundTruthSet: masks must be 2-D, got shape {mask.shape}")
            labeled, n = ndimage.label(mask != 0, structure=_IMAGE_STRUCTURE)
            flat = labeled.ravel()
            positive = np.flatnonzero(flat)
            self.shapes.append(mask.shape)
            self._positive.append(positive)
            self._comp_ids.append(flat[positive].astype(np.int64) - 1 + self.n_comp)
            self.n_comp += n
            self.n_ok += flat.size - positive.size

    @property
    def labels(self) -> np.ndarray:
        """1 for images with an anomalous pixel, else 0."""
        return np.array([p.size > 0 for p in self._positive], dtype=np.int64)

    def evaluate(self, maps: Iterable[np.ndarray], limits: Sequence[float] = PRO_LIMITS,
                 num_thresholds: int = NUM_THRESHOLDS) -> dict:
        """Metrics of one method's ``maps`` (one per image, each of its mask's shape; any iterable).

        Returns ``{'image_auroc': ..., 'pixel_auroc': ..., 'au_pro': {limit: ...}}`` where the
        image AUROC scores each map by its maximum (the official evaluation's rule), the pixel
        AUROC is over every pixel of every image and AU-PRO is that of SPEC 9 (the same curve
        and integration as :func:`au_pro`, at the maps' own resolution).
        """
        ok = None
        at = 0
        anomalous, maxima = [], []
        for i, (shape, positive, m) in enumerate(zip(self.shapes, self._positive, maps, strict=True)):
            flat = np.asarray(m).ravel()
            if np.shape(m) != shape:
                raise ValueError(f"GroundTruthSet.evaluate: map {i} has shape {np.shape(m)}, its mask {shape}")
            _check_finite(flat, "GroundTruthSet.evaluate")
            if ok is None:
                ok = np.empty(self.n_ok, dtype=flat.dtype)
            keep = np.ones(flat.size, dtype=bool)
            keep[positive] = False
            ok[at:at + flat.size - positive.size] = flat[keep]
            at += flat.size - positive.size
            anomalous.append(flat[positive])
            maxima.append(flat.max())
        if ok is None:
            raise ValueError("GroundTruthSet.evaluate: no images")
        ok.sort()
        anomalous = np.concatenate(anomalous)
        comp_ids = np.concatenate(self._comp_ids)
        return {
            "image_auroc": image_auroc(self.labels, np.array(maxima)),
            "pixel_auroc": _auroc_of_sorted(ok, np.sort(anomalous)),
            "au_pro": _au_pro_of(lambda: _pro_curve_of(ok, comp_ids, anomalous, self.n_comp, num_thresholds),
                                 limits),
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
