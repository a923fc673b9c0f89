"""A plain transcription of the official MVTec 3D-AD evaluation (SPEC 9.2), for the tests.

Independent of ``utils/metrics.py`` and written with loops, to be read against the official
description:

* files (:func:`evaluate_object`): for every test type folder of an object, good included,
  every ``<dataset>/<obj>/test/<type>/gt/*.png`` and its map
  ``<maps>/<obj>/test/<type>/<stem>.tiff``, which must have the gt's size (nothing resizes);
* AU-PRO (:func:`pro_curve`, :func:`trapezoid`): per image, the 8-connected components of the
  non-zero gt pixels, each keeping its sorted scores and an index that only moves forward;
  the scores of all other pixels, of all images, in one float64 list, sorted; thresholds at
  positions ``int(linspace(0, n - 1, 100))`` of that list; FPR ``1 - (pos + 1) / n``; PRO the
  mean over components of the fraction of their pixels scoring above the threshold; the
  curve starts at (1, 1) and is reversed to ascending FPR; trapezoids up to the limit, the
  last one to a linearly interpolated point at the limit; divided by the limit;
* image AUROC from each map's maximum, image label 1 when its gt has a non-zero pixel;
  pixel AUROC (not in the official script) is scikit-learn's over all pixels.
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

LIMITS = (0.3, 0.2, 0.1, 0.07, 0.05, 0.03, 0.01)


class Component:
    """One ground-truth region: its sorted scores and how many of them are at or below the last threshold."""

    def __init__(self, scores):
        self.scores = sorted(scores)
        self.index = 0

    def overlap(self, threshold: float) -> float:
        while self.index < len(self.scores) and self.scores[self.index] <= threshold:
            self.index += 1
        return 1.0 - self.index / len(self.scores)


def pro_curve(gt_maps, maps, num_thresholds: int = 100) -> tuple[list[float], list[float]]:
    components, ok_scores = [], []
    for gt, amap in zip(gt_maps, maps):
        assert gt.shape == amap.shape, f"map {amap.shape} and gt {gt.shape} differ"
        labeled, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=int))
        ok_scores.extend(float(v) for v in amap[labeled == 0])
        for k in range(1, n + 1):
            components.append(Component(amap[labeled == k].tolist()))
    ok_scores.sort()
    n = len(ok_scores)
    fprs, pros = [1.0], [1.0]
    for pos in np.linspace(0, n - 1, num=num_thresholds).astype(int):
        threshold = ok_scores[pos]
        fprs.append(1.0 - (pos + 1) / n)
        pro = 0.0
        for component in components:
            pro += component.overlap(threshold)
        pros.append(pro / len(components))
    return fprs[::-1], pros[::-1]


def trapezoid(x: list[float], y: list[float], x_max: float) -> float:
    correction = 0.0
    if x_max not in x:
        i = bisect.bisect(x, x_max)
        assert 0 < i < len(x)
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
    area = 0.0
    for k in range(1, len(x)):
        if x[k] <= x_max:
            area += 0.5 * (y[k] + y[k - 1]) * (x[k] - x[k - 1])
    return area + correction


def au_pro(gt_maps, maps, limits=LIMITS) -> dict[float, float]:
    fprs, pros = pro_curve(gt_maps, maps)
    return {limit: trapezoid(fprs, pros, limit) / limit for limit in limits}


def evaluate(gt_maps, maps, limits=LIMITS) -> dict:
    """The official metrics of one object from its gt arrays and maps (lists, any sizes)."""
    labels = [int(np.any(gt != 0)) for gt in gt_maps]
    return {
        "image_auroc": roc_auc_score(labels, [float(np.max(m)) for m in maps]),
        "pixel_auroc": roc_auc_score(np.concatenate([(gt != 0).ravel() for gt in gt_maps]),
                                     np.concatenate([m.ravel() for m in maps])),
        "au_pro": au_pro(gt_maps, maps, limits),
    }


def read_object(dataset_dir: Path, maps_dir: Path, obj: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The gt arrays and maps of one object, listed as the official script lists them."""
    gt_maps, maps = [], []
    test_dir = Path(dataset_dir, obj, "test")
    for defect in os.listdir(test_dir):
        for gt_file in sorted(os.listdir(test_dir / defect / "gt")):
            if not gt_file.endswith(".png"):
                continue
            gt = np.asarray(Image.open(test_dir / defect / "gt" / gt_file))
            amap = tifffile.imread(Path(maps_dir, obj, "test", defect, Path(gt_file).stem + ".tiff"))
            if amap.shape != gt.shape:
                raise ValueError(f"{defect}/{gt_file}: map {amap.shape} and gt {gt.shape} differ in size")
            gt_maps.append(gt)
            maps.append(amap)
    return gt_maps, maps


def evaluate_object(dataset_dir: Path, maps_dir: Path, obj: str, limits=LIMITS) -> dict:
    return evaluate(*read_object(dataset_dir, maps_dir, obj), limits)
