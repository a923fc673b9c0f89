"""The authors' way of cutting patches (SPEC 3.2, 3.5), as an oracle for tests and the benchmark.

FPS as a torch loop over the (1, N, 3) cloud; kNN from the full (G, N, 3) difference tensor
and a full argsort of every (G, N) distance row; pretraining data in Python loops over
patches and copies, building a KD-tree per patch and recomputing the 51-NN sigma for every
one of the 20 copies (in 100 blocks, as the reference does), drawing the noise copy by
copy, normalising each patch in NumPy and searching the nearest surface point with a
fresh KD-tree per patch. Given the same cloud, FPS start and noise stream, the outputs
must equal :mod:`core.grouping`'s.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from core.grouping import SAMPLE_NUM, copy_scales
from core.patch_files import POINT_NUM


def authors_group(points: np.ndarray, pixel_idx: np.ndarray, count: int, start: int,
                  point_num: int = POINT_NUM) -> tuple[np.ndarray, np.ndarray]:
    """FPS loop + full argsort kNN, as the reference's ``sample_and_group`` (CPU)."""
    xyz = torch.from_numpy(points)[None]                                  # (1, N, 3)
    dist = torch.ones(1, xyz.shape[1]) * 1e10
    centres = torch.zeros(1, count, dtype=torch.long)
    far = torch.tensor([start])
    for t in range(count):
        centres[:, t] = far
        d = torch.sum((xyz - xyz[0, far].view(1, 1, 3)) ** 2, -1)
        mask = d < dist
        dist[mask] = d[mask]
        far = torch.max(dist, -1)[1]
    new_xyz = xyz[0, centres[0]][None]                                    # (1, G, 3)
    sq = torch.sum((new_xyz[:, :, None] - xyz[:, None]) ** 2, dim=-1)     # (1, G, N)
    nearest = sq.argsort()[0, :, :point_num].numpy()
    return points[nearest], pixel_idx[nearest]


def authors_pretrain(patches: np.ndarray, rng: np.random.Generator,
                     sample_num: int = SAMPLE_NUM) -> dict[str, np.ndarray]:
    """Per-patch, per-copy pretraining data, sigma recomputed for every copy (SPEC 3.5)."""
    samples, targets = [], []
    for patch in patches:
        tree = cKDTree(patch)
        copies = []
        for scale in copy_scales(sample_num):
            sigma = np.concatenate([tree.query(p, 51)[0][:, -1] for p in np.array_split(patch, 100)])
            copies.append(patch + scale * sigma[:, None] * rng.standard_normal(patch.shape))
        queries = np.concatenate(copies)
        extent = patch.max(axis=0) - patch.min(axis=0)
        e = extent[0] if extent[0] > extent[1] else extent[1]
        e = extent[2] if e < extent[2] else e
        s = 10 / (10 * e)
        surface, queries = patch * s, queries * s
        centre = surface.mean(axis=0)
        surface, queries = surface - centre, queries - centre
        _, ids = cKDTree(surface).query(queries, k=1)
        samples.append(queries)
        targets.append(surface[ids])
    return {"samples_all": np.asarray(samples, dtype=np.float32), "points_all": np.asarray(targets, dtype=np.float32),
            "origins_all": patches}
