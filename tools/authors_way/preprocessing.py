"""The authors' way of preprocessing one sample (SPEC 2.1), as an oracle for tests and the benchmark.

The reference clusters all valid points left after the plane removal with Open3D's
``cluster_dbscan``; :func:`core.clustering.dbscan_labels` must give the same labels many
times faster. :func:`preprocess_file` runs one sample the reference's way (same reading,
plane step and writing, Open3D DBSCAN) and times it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.preprocessing import preprocess_arrays
from utils.device import Timer
from utils.io import read_gray, read_rgb, read_xyz, write_png, write_xyz


def open3d_dbscan_labels(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """Labels from Open3D ``cluster_dbscan`` (the authors' way; slow, used for checks and benchmarks)."""
    import open3d as o3d  # optional heavy dependency (see core.clustering.fit_plane)

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    return np.asarray(cloud.cluster_dbscan(eps=eps, min_points=min_points, print_progress=False), dtype=np.int32)


def preprocess_file(xyz_path: Path, scratch: Path, seed: int):
    """One sample the reference's way; returns (seconds, outputs)."""
    rgb_path = xyz_path.parent.parent / "rgb" / f"{xyz_path.stem}.png"
    gt_path = xyz_path.parent.parent / "gt" / f"{xyz_path.stem}.png"
    with Timer() as t:
        gt = read_gray(gt_path) if gt_path.exists() else None
        result = preprocess_arrays(read_xyz(xyz_path), read_rgb(rgb_path), gt, seed=seed,
                                   labels_fn=open3d_dbscan_labels)
        write_xyz(scratch / "xyz.tiff", result.xyz)
        write_png(scratch / "rgb.png", result.rgb)
        if gt is not None:
            write_png(scratch / "gt.png", result.gt)
    return t.seconds, result
