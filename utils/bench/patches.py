"""Benchmark of patch cutting (SPEC section 3) against the authors' way of computing it.

The authors' way, re-implemented here (not imported): FPS as a torch loop over the
(1, N, 3) cloud; kNN from the full (G, N, 3) difference tensor and a full argsort of every
(G, N) distance row; pretraining data in Python loops over patches and copies, building
a KD-tree per patch and recomputing the 51-NN sigma for every one of the 20 copies (in 100
blocks, as the reference does), drawing the noise copy by copy, normalising each patch in
NumPy and searching the nearest surface point with a fresh KD-tree per patch. (Ours: kNN
by ``topk``, sigma once per patch, noise and normalisation batched over patches.) Both ways load the cloud with
:func:`core.patches.load_cloud`, use the same FPS start and (pretraining) the same noise
stream, so their outputs must agree; the agreement is reported.
"""
from __future__ import annotations

import numpy as np
import torch

from core.dataset import list_samples
from core.patches import (GROUP_MUL, POINT_NUM, PRETRAIN_GROUP_MUL, SAMPLE_NUM, CutOptions, PatchJob, copy_scales,
                          cut_arrays, cut_patches, fps_start, load_cloud, patch_count)
from utils.bench import Timer, row

STAGE = "patches"


# ----------------------------------------------------------------------------- the authors' way
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
    from scipy.spatial import cKDTree

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


# ----------------------------------------------------------------------------- benchmark
def _compare(ours: list[dict], authors: list[dict], exact_keys: tuple[str, ...], close_keys: tuple[str, ...]) -> str:
    same = sum(all(np.array_equal(o[k], a[k]) for k in exact_keys) for o, a in zip(ours, authors))
    text = f"{'/'.join(exact_keys)} identical on {same}/{len(ours)} samples"
    if close_keys:
        worst = max(float(np.abs(o[k].astype(np.float64) - a[k]).max()) for o, a in zip(ours, authors)
                    for k in close_keys)
        text += f"; {'/'.join(close_keys)} max |d| {worst:.1e}"
    return text


def _subset_rows(ctx, samples, pretrain: bool) -> dict:
    """Time ours (:func:`cut_arrays`) and the authors' way on the same clouds, in-process."""
    group_mul = PRETRAIN_GROUP_MUL if pretrain else GROUP_MUL
    options = CutOptions(pretrain=pretrain, group_mul=group_mul, seed=ctx.seed, device=str(ctx.device))
    ours, authors, t_ours, t_authors = [], [], 0.0, 0.0
    cut_arrays(PatchJob(samples[0].xyz, ctx.work / "unused.npz", 0), options)   # untimed warm-up (CUDA start-up)
    for draw, sample in enumerate(samples):
        job = PatchJob(sample.xyz, ctx.work / "unused.npz", draw)
        with Timer(ctx.device) as t:
            arrays, _ = cut_arrays(job, options)
        t_ours += t.seconds
        with Timer() as t:
            points, pixel_idx, _ = load_cloud(sample.xyz)
            count = patch_count(len(points), group_mul, POINT_NUM)
            gt, idx = authors_group(points, pixel_idx, count, fps_start(ctx.seed, draw, len(points)))
            ref = authors_pretrain(gt, np.random.default_rng([ctx.seed, draw])) if pretrain else \
                {"points_gt": gt, "points_idx": idx}
        t_authors += t.seconds
        ours.append(arrays)
        authors.append(ref)
    n = len(samples)
    if pretrain:
        agree = _compare(ours, authors, ("origins_all",), ("samples_all", "points_all"))
    else:
        agree = _compare(ours, authors, ("points_gt", "points_idx"), ())
    return dict(ours=t_ours / n, authors=t_authors / n, agree=agree)


def benchmark(ctx) -> list[dict]:
    """Seconds per cloud, default mode and ``--pretrain``: ours vs the authors' way on
    ``ctx.subset`` training clouds (one process), then ours on the whole data set with
    ``ctx.workers`` workers (files written). Sets ``ctx.grids`` and ``ctx.pretrain_grids``."""
    data = ctx.preprocessed or ctx.raw
    subset = list_samples(data, ctx.classes[0], "train")[:1 if ctx.quick else max(1, ctx.subset)]
    rows = []
    for pretrain, name in ((False, "default"), (True, "pretrain")):
        r = _subset_rows(ctx, subset, pretrain)
        rows.append(row(STAGE, f"{name}: cut one cloud (1 process)", r["ours"], r["authors"], agree=r["agree"],
                        note=f"{len(subset)} training clouds of {ctx.classes[0]}; load + FPS + kNN"
                             + (" + sigma + queries + targets" if pretrain else "")))
        out = ctx.work / ("pretrain_grids" if pretrain else "grids")
        with Timer(ctx.device) as t:
            report = cut_patches(data, out, pretrain=pretrain, classes=ctx.classes, seed=ctx.seed,
                                 workers=ctx.workers, overwrite=True, device=str(ctx.device), progress=False)
        rows.append(row(STAGE, f"{name}: whole data set, {ctx.workers} workers", t.seconds / max(1, report.written),
                        note=f"{report.written} files written, wall time per file incl. worker start-up"))
        if pretrain:
            ctx.pretrain_grids = out
        else:
            ctx.grids = out
    if ctx.preprocessed is None:
        rows[-1]["note"] += "; ctx.preprocessed unset: ran on the raw data"
    return rows
