"""The patch-file formats (SPEC 3.3, 3.4, 3.5): what cut_patches.py writes and later stages read.

* Grid files ``<grid>/<cls>/<split>/<type>/npz/<stem>.npz`` (SPEC 3.3): ``points_gt``
  (G, K, 3) float32 in the cloud's globally normalised frame and ``points_idx`` (G, K)
  int64 flat pixel indices in the 224x224 grid. :func:`load_grid` reads and checks one;
  :func:`normalize_patches` is the per-patch normalisation applied at load time (SPEC 3.4).
* Pretraining files ``<grid>/PRETRAIN_DATA/<cls>/<stem>.npz`` (SPEC 3.5): ``samples_all``
  and ``points_all`` (G, S*K, 3) float32, ``origins_all`` (G, K, 3).

* Source records (SPEC 3.3): ``<grid>/.patch_manifest.jsonl`` (:func:`open_patch_manifest`, the
  commit log of :mod:`utils.manifest`) holds, for every file the cutter wrote, the xyz TIFF it
  was cut from (path, size, mtime, sha256). A rerun recuts a file whose source changed (e.g.
  preprocessed in place since) and ``main.py`` refuses it (:func:`source_changed`). Files
  without a record (cut elsewhere, e.g. the authors' grids) are accepted as they are.

This is all that memory building and inference need of the patch cutter.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.errors import DataError
from utils.io import load_npz
from utils.manifest import Manifest, sha256_file

POINT_NUM = 500
GRID_KEYS = ("points_gt", "points_idx")
PRETRAIN_DIR = "PRETRAIN_DATA"
PRETRAIN_KEYS = ("samples_all", "points_all", "origins_all")
PATCH_MANIFEST = ".patch_manifest.jsonl"
STAGING_SUFFIX = ".cut-tmp"


# ----------------------------------------------------------------------------- source records
def open_patch_manifest(grid_root: str | os.PathLike, repair: bool = True) -> Manifest:
    """The source records of a grid folder (module docstring); ``repair=False`` never writes."""
    return Manifest(grid_root, PATCH_MANIFEST, STAGING_SUFFIX, repair=repair)


def source_record(source: str | os.PathLike) -> dict:
    """What a patch file records of the TIFF it was cut from."""
    st = os.stat(source)
    return dict(path=str(Path(source).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns,
                sha256=sha256_file(source))


def source_changed(record: dict, source: str | os.PathLike) -> bool:
    """Whether ``source`` differs from what ``record`` (:func:`source_record`) describes: a different
    size, or a different mtime and a different sha256 (a copy with a new mtime is unchanged)."""
    st = os.stat(source)
    if st.st_size != record["size"]:
        return True
    return st.st_mtime_ns != record["mtime_ns"] and sha256_file(source) != record["sha256"]


def stale_patch_file(manifest: Manifest, patch_file: Path, source: Path) -> Optional[str]:
    """Why ``patch_file`` must not be used with ``source`` (its record says it was cut from other data,
    or its writing was interrupted), or None (it matches, or it has no record)."""
    record = manifest.records.get(patch_file.relative_to(manifest.root).as_posix())
    if record is None or "source" not in record:
        return None
    if record["state"] != "done":
        return f"{patch_file}: its writing was interrupted"
    if source_changed(record["source"], source):
        return f"{patch_file}: cut from {record['source']['path']} before it changed (now {source})"
    return None


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


def patch_frame(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (G,) and centre (G, 3) of the per-patch normalisation (SPEC 3.4), float32.

    The normalised patch is ``points * scale - centre``: ``scale = 10 / (10 e)`` with ``e``
    the largest per-axis extent (x/y compared first, y on ties, then z), ``centre`` the mean
    of the scaled points. On CPU both are bit-identical to the reference's NumPy code: a
    true float32 division (torch's ``10.0 / t`` is ``10 * (1/t)``, 1 ulp off for a quarter
    of the values) and NumPy's float32 mean, which adds the points in order (torch's mean
    sums in another order).
    """
    points = points.to(torch.float32)
    extent = points.amax(dim=1) - points.amin(dim=1)           # (G, 3)
    e = torch.where(extent[:, 0] > extent[:, 1], extent[:, 0], extent[:, 1])
    e = torch.where(extent[:, 2] > e, extent[:, 2], e)
    scale = torch.full_like(e, 10.0) / (10.0 * e)
    scaled = points * scale[:, None, None]
    if scaled.device.type == "cpu":
        return scale, torch.from_numpy(np.ascontiguousarray(scaled.numpy()).mean(axis=1))
    return scale, scaled.mean(dim=1)


def normalize_patches(points: torch.Tensor) -> torch.Tensor:
    """Per-patch normalisation used at load time (SPEC 3.4): (G, K, 3) -> (G, K, 3).

    Each patch is scaled by ``1/e`` (``e`` = its largest per-axis extent, computed as
    ``10 / (10 e)`` in float32 like the reference) and then centred on its mean.
    """
    points = points.to(torch.float32)
    scale, centre = patch_frame(points)
    return points * scale[:, None, None] - centre[:, None, :]


def load_pretrain(path: str | os.PathLike, point_num: int = POINT_NUM) -> tuple[np.ndarray, np.ndarray]:
    """Read a pretraining file: ``samples_all`` and ``points_all``, both (G, S*K, 3) float32 (SPEC 3.5)."""
    data = load_npz(path, PRETRAIN_KEYS[:2])
    samples, points = data["samples_all"], data["points_all"]
    if samples.ndim != 3 or samples.shape[2] != 3 or points.shape != samples.shape or samples.shape[0] == 0 \
            or samples.shape[1] % point_num:
        raise DataError(f"{path}: expected samples_all and points_all of the same shape (G, S*{point_num}, 3) "
                        f"with G > 0, got {samples.shape} and {points.shape}")
    return samples.astype(np.float32, copy=False), points.astype(np.float32, copy=False)
