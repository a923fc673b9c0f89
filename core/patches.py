"""Local 3D patches (SPEC section 3): loading clouds, FPS + kNN grouping, patch files.

(The lead wrote the patch-file loader and the per-patch normalisation first because the
inference code needs them; the cutting itself is added below them.)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from utils.io import DataError, load_npz

POINT_NUM = 500
GRID_KEYS = ("points_gt", "points_idx")


def load_grid(path: str | os.PathLike, point_num: int = POINT_NUM) -> tuple[np.ndarray, np.ndarray]:
    """Read a patch file: ``points_gt`` (G, K, 3) float32 and ``points_idx`` (G, K) int64 (SPEC 3.3)."""
    data = load_npz(path, GRID_KEYS)
    pts, idx = data["points_gt"], data["points_idx"]
    if pts.ndim != 3 or pts.shape[2] != 3 or idx.shape != pts.shape[:2] or pts.shape[0] == 0:
        raise DataError(f"{path}: expected points_gt (G, K, 3) and points_idx (G, K) with G > 0, "
                        f"got {pts.shape} and {idx.shape}")
    if pts.shape[1] != point_num:
        raise DataError(f"{path}: patches hold {pts.shape[1]} points, expected {point_num} (--point_num)")
    return pts.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)


def normalize_patches(points: torch.Tensor) -> torch.Tensor:
    """Per-patch normalisation used at load time (SPEC 3.4): (G, K, 3) -> (G, K, 3).

    Each patch is scaled by ``1/e`` (``e`` = its largest per-axis extent, computed as
    ``10 / (10 e)`` in float32 like the reference) and then centred on its mean.
    """
    points = points.to(torch.float32)
    extent = points.amax(dim=1) - points.amin(dim=1)           # (G, 3)
    e = torch.where(extent[:, 0] > extent[:, 1], extent[:, 0], extent[:, 1])
    e = torch.where(extent[:, 2] > e, extent[:, 2], e)
    scale = 10.0 / (10.0 * e)
    scaled = points * scale[:, None, None]
    return scaled - scaled.mean(dim=1, keepdim=True)
