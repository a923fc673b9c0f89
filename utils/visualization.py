"""``--viz`` output: optimal thresholds and three-panel heatmaps (SPEC 10).

Per class, for RGB_SDF only: the detection / segmentation thresholds that maximise F1
on the precision-recall curve, and one PNG per test sample with (1) the RGB input and
the ground-truth contour in red, (2) the RGB input with the fused map overlaid in
``jet``, (3) the RGB input with the contour of the thresholded fused map in red.

Morphology reproduces scikit-image (not a dependency) with SciPy: opening with a disk
of radius 2 and "thick" boundaries (dilation != erosion with the 4-neighbour cross),
both with reflected borders. FIXes (SPEC 10, 11 #35): de-normalisation clips before the
uint8 cast instead of wrapping around; thin ground-truth structures that the opening
would erase (cracks less than 5 px wide) are drawn unopened, so their contours stay
visible; figures are built without pyplot and written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy import ndimage
from tqdm import tqdm

from utils.io import atomic_path

CM = 4 / 2.54  # the reference's figure unit (inches)
DPI = 300
RED = np.array([255, 0, 0], dtype=np.uint8)

_DISK2 = np.add.outer(np.arange(-2, 3) ** 2, np.arange(-2, 3) ** 2) <= 4  # skimage.morphology.disk(2)
_CROSS = ndimage.generate_binary_structure(2, 1)
_EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- thresholds
def optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 (SPEC 10).

    Same result as the reference: ``precision_recall_curve(labels, scores)``,
    ``F1 = 2PR / (P + R)`` (0 where P + R = 0), threshold at the first argmax. The
    thresholds are the distinct scores in ascending order and a score >= t is predicted
    positive. Computed from one sort (the pixel-level call sees millions of scores).
    """
    labels = np.asarray(labels).ravel() != 0
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"optimal_threshold: {labels.size} labels but {scores.size} scores")
    if not labels.any():
        raise ValueError("optimal_threshold: no positive label, F1 is undefined")
    ordered = np.sort(scores)
    positives = np.sort(scores[labels])
    first = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    distinct = ordered[first]
    predicted = ordered.size - first  # number of scores >= t
    tp = (positives.size - np.searchsorted(positives, distinct, "left")).astype(np.float64)
    precision = tp / predicted
    recall = tp / positives.size
    num = 2 * precision * recall
    den = precision + recall
    f1 = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    return float(distinct[np.argmax(f1)])


# ----------------------------------------------------------------------------- images
def denormalize_rgb(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (..., 3, H, W) float images back to uint8 (..., H, W, 3), clipped (SPEC 10 FIX).

    ``mean`` / ``std`` are the backbone's input normalisation (ImageNet's for WRN50-2,
    see ``core.rgb_features``): ``(x * std + mean) * 255``, clipped to [0, 255], truncated.
    """
    x = np.moveaxis(np.asarray(x, dtype=np.float64), -3, -1)
    return np.clip((x * np.asarray(std) + np.asarray(mean)) * 255.0, 0, 255).astype(np.uint8)


def _opening(mask: np.ndarray) -> np.ndarray:
    """Binary opening with disk(2), reflected borders (``skimage.morphology.opening``)."""
    return ndimage.grey_opening(mask.astype(np.uint8), footprint=_DISK2, mode="reflect").astype(bool)


def _thick_boundary(mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.find_boundaries(mask, mode='thick')``: dilation != erosion (cross)."""
    m = mask.astype(np.uint8)
    dilated = ndimage.grey_dilation(m, footprint=_CROSS, mode="reflect")
    eroded = ndimage.grey_erosion(m, footprint=_CROSS, mode="reflect")
    return dilated != eroded


def gt_outline_mask(mask: np.ndarray) -> np.ndarray:
    """The ground-truth region whose contour is drawn: opened with disk(2), thin parts kept.

    The reference draws the opening of the mask, which erases structures narrower than
    the 5-px disk (thin cracks vanish). FIX: every connected piece that the opening
    removed and that reaches farther than the disk radius from the opened region (a
    whole thin component, or a thin protrusion such as a crack leaving a blob) is put
    back; the small corner and edge pixels that only smooth the outline stay removed.
    """
    mask = np.asarray(mask) != 0
    opened = _opening(mask)
    residual = mask & ~opened
    if not residual.any():
        return opened
    near = ndimage.grey_dilation(opened.astype(np.uint8), footprint=_DISK2, mode="reflect").astype(bool)
    pieces, n = ndimage.label(residual, structure=_EIGHT)
    restore = np.zeros(n + 1, dtype=bool)
    restore[pieces[residual & ~near]] = True
    return opened | restore[pieces]


def mark_boundary(rgb: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Copy of the uint8 (H, W, 3) image with the thick boundary of ``region`` in red."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[_thick_boundary(region)] = RED
    return out


def heatmap_panels(
    rgb: np.ndarray, mask: np.ndarray, fused: np.ndarray, seg_threshold: float, class_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three panel images of one sample (SPEC 10): gt contour image, uint8 heat map, prediction contour image."""
    gt_img = mark_boundary(rgb, gt_outline_mask(mask))
    scale = 255.0 / class_max if class_max > 0 else 0.0
    heat = np.clip(np.asarray(fused, dtype=np.float64) * scale, 0, 255).astype(np.uint8)
    pred_img = mark_boundary(rgb, _opening(np.asarray(fused) > seg_threshold))
    return gt_img, heat, pred_img


def _render(path: Path, rgb: np.ndarray, panels: tuple[np.ndarray, np.ndarray, np.ndarray], dpi: float) -> None:
    gt_img, heat, pred_img = panels
    fig = Figure(figsize=(2 * CM, 6 * CM))
    axes = fig.subplots(3, 1)
    fig.subplots_adjust(hspace=0.1, wspace=0.1)
    for ax in axes:
        ax.set_axis_off()
    # Nearest-neighbour display keeps one-pixel red contours crisp at any dpi.
    axes[0].imshow(gt_img, interpolation="nearest")
    axes[1].imshow(rgb, cmap="gray", interpolation="none")
    axes[1].imshow(heat, cmap="jet", norm=Normalize(vmin=0.0, vmax=255.0), alpha=0.5, interpolation="none")
    axes[2].imshow(pred_img, interpolation="nearest")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.0)


def save_heatmaps(
    out_dir: str | os.PathLike,
    rgb_images: np.ndarray,
    masks: np.ndarray,
    fused_maps: np.ndarray,
    seg_threshold: float,
    dpi: float = DPI,
) -> list[Path]:
    """Write ``{i:08d}.png`` for every test sample i into ``out_dir`` (SPEC 10).

    ``rgb_images`` (T, H, W, 3) uint8, already de-normalised (:func:`denormalize_rgb`);
    ``masks`` (T, H, W) ground truth; ``fused_maps`` (T, H, W) blurred RGB_SDF maps;
    ``seg_threshold`` from :func:`optimal_threshold`. The overlay scales every map by
    255 / (maximum over all maps of the class). Returns the written paths.
    """
    rgb_images = np.asarray(rgb_images)
    masks = np.asarray(masks)
    fused_maps = np.asarray(fused_maps)
    if rgb_images.dtype != np.uint8 or rgb_images.ndim != 4 or rgb_images.shape[-1] != 3:
        raise ValueError(f"save_heatmaps: images must be uint8 (T, H, W, 3), got {rgb_images.dtype} {rgb_images.shape}")
    if masks.shape != fused_maps.shape or masks.shape != rgb_images.shape[:3]:
        raise ValueError(
            f"save_heatmaps: shapes differ: images {rgb_images.shape}, masks {masks.shape}, maps {fused_maps.shape}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_max = float(fused_maps.max()) if fused_maps.size else 0.0
    paths = []
    for i in tqdm(range(len(rgb_images)), desc="heatmaps", unit="img"):
        path = out_dir / f"{i:08d}.png"
        panels = heatmap_panels(rgb_images[i], masks[i], fused_maps[i], seg_threshold, class_max)
        _render(path, rgb_images[i], panels, dpi)
        paths.append(path)
    return paths
