"""Preprocessing benchmark (SPEC 2): seconds per sample, ours vs the authors' way.

Ours: :func:`core.preprocessing.preprocess_dataset` into a fresh output folder (reading,
plane fit, exact fast DBSCAN, writing, manifest), with 1 and ``ctx.workers`` processes.
Authors' way (:func:`tools.authors_way.preprocessing.preprocess_file`): the same reading,
plane step and writing, sequentially, with Open3D ``cluster_dbscan`` on all valid points
left after the plane removal, on ``ctx.subset`` samples. Agreement: the authors'-way
outputs are compared with ours array for array (equal xyz and rgb means identical kept points).
Sizes: 400x400 and 800x800 (``ctx.raw`` is used for its own size, a few samples are
generated for the other); ``ctx.quick`` runs only ``ctx.raw``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from core.preprocessing import preprocess_dataset
from tools.authors_way.preprocessing import preprocess_file
from tools.bench import row
from tools.synthetic.mvtec import generate_dataset
from utils.device import Timer
from utils.io import read_rgb, read_xyz

SIZES = (400, 800)
EXTRA_SAMPLES = 4  # generated samples for a size that ctx.raw does not have


def _xyz_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tiff") if p.parent.name == "xyz" and not p.name.startswith("."))


def _same_as_ours(result, xyz_path: Path, root: Path, ours: Path) -> bool:
    rel = xyz_path.relative_to(root)
    rgb_rel = rel.parent.parent / "rgb" / f"{rel.stem}.png"
    return (np.array_equal(read_xyz(ours / rel), result.xyz)
            and np.array_equal(read_rgb(ours / rgb_rel), result.rgb))


def _raw_for_size(ctx, size: int, raw_size: int) -> Path:
    if raw_size == size:
        return ctx.raw
    raw = ctx.work / f"preprocessing_raw_{size}"
    if not raw.exists():
        generate_dataset(raw, classes=ctx.classes[:1], n_train=EXTRA_SAMPLES, n_val=0, n_test_good=0,
                         n_test_defect=0, size=size, seed=ctx.seed, progress=False)
    return raw


def benchmark(ctx) -> list[dict]:
    raw_size = read_xyz(_xyz_files(ctx.raw)[0]).shape[0]
    rows = []
    for size in (raw_size,) if ctx.quick else SIZES:
        raw = _raw_for_size(ctx, size, raw_size)
        files = _xyz_files(raw)
        outputs = {}
        for workers in dict.fromkeys((1, ctx.workers)):
            out = ctx.work / f"preprocessed_{size}_w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            with Timer() as t:
                summary = preprocess_dataset(raw, out, workers=workers, seed=ctx.seed, progress=False)
            if not summary.ok:
                raise RuntimeError(summary.report())
            outputs[workers] = (out, t.seconds / len(files))
        if raw == ctx.raw:
            ctx.preprocessed = outputs[1][0]

        subset = files[:max(1, ctx.subset)]
        times, same = [], 0
        with tempfile.TemporaryDirectory(dir=ctx.work) as scratch:
            for xyz_path in subset:
                seconds, result = preprocess_file(xyz_path, Path(scratch), ctx.seed)
                times.append(seconds)
                same += _same_as_ours(result, xyz_path, raw, outputs[1][0])
        authors = float(np.mean(times))
        agree = f"outputs identical on {same}/{len(subset)} samples"
        rows.append(row("preprocessing", f"{size}x{size}, 1 worker", outputs[1][1], authors, agree=agree,
                        note=f"{len(files)} samples; authors' way on {len(subset)}"))
        if ctx.workers > 1:
            identical = _trees_identical(outputs[1][0], outputs[ctx.workers][0])
            rows.append(row("preprocessing", f"{size}x{size}, {ctx.workers} workers", outputs[ctx.workers][1],
                            authors, agree=agree + ("; bytes identical to 1 worker" if identical
                                                    else "; DIFFERENT bytes from 1 worker"),
                            note="authors' way is sequential (the reference has no workers)"))
    return rows


def _trees_identical(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
