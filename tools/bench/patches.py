"""Benchmark of patch cutting (SPEC section 3) against the authors' way of computing it.

Ours: :func:`core.cutting.cut_arrays` (kNN by ``topk``, sigma once per patch, noise and
normalisation batched over patches). The authors' way: :mod:`tools.authors_way.patches`.
Both load the cloud with :func:`core.grouping.load_cloud` and use the same FPS start and
(pretraining) the same noise stream, so their outputs must agree; the agreement is reported.
"""
from __future__ import annotations

import numpy as np

from core.cutting import PRETRAIN_GROUP_MUL, CutConfig, CutOptions, PatchJob, cut_arrays, cut_patches
from core.dataset import list_samples
from core.grouping import GROUP_MUL, fps_start, load_cloud, patch_count
from core.patch_files import POINT_NUM
from tools.authors_way.patches import authors_group, authors_pretrain
from tools.bench import row
from utils.device import Timer

STAGE = "patches"


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
    options = CutOptions(pretrain=pretrain, group_mul=group_mul, seed=ctx.seed, device=str(ctx.device),
                         allow_unpreprocessed=ctx.preprocessed is None)
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
            report = cut_patches(CutConfig(data, out, pretrain=pretrain, classes=ctx.classes, seed=ctx.seed,
                                           workers=ctx.workers, overwrite=True, device=str(ctx.device),
                                           allow_unpreprocessed=ctx.preprocessed is None),
                                 progress=False)
        rows.append(row(STAGE, f"{name}: whole data set, {ctx.workers} workers", t.seconds / max(1, report.written),
                        note=f"{report.written} files written, wall time per file incl. worker start-up"))
        if pretrain:
            ctx.pretrain_grids = out
        else:
            ctx.grids = out
    if ctx.preprocessed is None:
        rows[-1]["note"] += "; ctx.preprocessed unset: ran on the raw data"
    return rows
