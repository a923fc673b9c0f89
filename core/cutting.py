"""Cutting a preprocessed data set into patch files (SPEC 3.3, 3.5): jobs, their order, the pool.

Default mode writes ``<grid>/<cls>/<split>/<type>/npz/<stem>.npz`` (SPEC 3.3); ``--pretrain``
writes ``<grid>/PRETRAIN_DATA/<cls>/<stem>.npz`` (SPEC 3.5). The maths of one cloud is in
:mod:`core.grouping`, the file formats in :mod:`core.patch_files`.

Order of the FPS-start draws (:func:`core.grouping.fps_start`): clouds are visited class by
class, ``train`` (sorted), ``test`` (sorted by full path), ``validation`` (sorted), as the
reference does; validation clouds keep their places in the stream even when they are not
cut. So the same seed gives identical files for any number of workers and any subset of
files skipped as already done, and with ``--seed 0`` on CPU the files equal the
reference's. Pretraining noise comes from a NumPy generator per cloud seeded with
``(seed, i)`` (the reference's unseeded global NumPy stream cannot be replayed per cloud);
the pretraining clouds are chosen with ``random.Random(seed)``.

Writing (SPEC 3.3): a worker writes its file to a hidden staging file; the main process
commits it through the grid's source records (:func:`core.patch_files.open_patch_manifest`:
record, rename, done), so every patch file the cutter wrote names the TIFF it came from.
A rerun keeps a file whose source is unchanged, recuts one whose source changed and keeps
files without a record (cut elsewhere). Clouds that still hold their background plane are
refused (``allow_unpreprocessed`` turns that into a warning).
"""
from __future__ import annotations

import dataclasses
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from tqdm import tqdm

from core.dataset import IMAGE_SIZE, list_samples, resolve_classes
from core.grouping import (GROUP_MUL, SAMPLE_NUM, SIGMA_NEIGHBOUR, fps_start, group_patches, load_cloud,
                           looks_unpreprocessed, patch_count, pretrain_arrays)
from core.patch_files import (POINT_NUM, PRETRAIN_DIR, open_patch_manifest, source_changed, source_record)
from utils.device import resolve_device
from utils.errors import ConfigError, DataError
from utils.io import check_output_dir, read_xyz, remove_stale_temporaries, save_npz
from utils.manifest import Manifest, sha256_file
from utils.pool import ordered_map, start_method

PRETRAIN_GROUP_MUL = 5        # pretrain mode: forced (SPEC 3.5, KEEP #10)
PRETRAIN_CLOUDS = 20          # training clouds per class used for pretraining


@dataclass
class CutConfig:
    """Options of ``cut_patches.py`` (SPEC 3)."""

    datasets_path: Path
    save_grid_path: Path
    pretrain: bool = False
    group_mul: Optional[int] = None     # None: 10, or 5 with ``pretrain``
    point_num: int = POINT_NUM
    sample_num: int = SAMPLE_NUM
    pretrain_clouds: int = PRETRAIN_CLOUDS
    classes: Optional[list[str]] = None
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    validation: bool = False
    device: str = "auto"
    allow_unpreprocessed: bool = False  # cut clouds that still hold their background plane (warning only)


# ----------------------------------------------------------------------------- one cloud
@dataclass(frozen=True)
class PatchJob:
    """One cloud to cut: source tiff, destination npz and its place in the FPS-start stream."""

    source: Path
    target: Path
    draw: int


@dataclass(frozen=True)
class CutOptions:
    """What the maths of one cloud needs (resolved from :class:`CutConfig`)."""

    pretrain: bool = False
    group_mul: int = GROUP_MUL
    point_num: int = POINT_NUM
    sample_num: int = SAMPLE_NUM
    seed: int = 0
    device: str = "cpu"
    allow_unpreprocessed: bool = False


@dataclass(frozen=True)
class CutResult:
    target: Path
    n_points: int = 0
    n_patches: int = 0
    skipped: bool = False
    unpreprocessed: bool = False
    recut: bool = False                 # rewritten because its source changed since it was cut
    sha256: str = ""                    # of the written (staged) file
    source: Optional[dict] = None       # core.patch_files.source_record of the cloud


LOOKS_UNPREPROCESSED = ("the cloud still seems to contain its background plane (too many valid pixels, or "
                        "valid pixels along the border)")


def _refuse_unpreprocessed(source: Path) -> None:
    raise DataError(f"{source}: {LOOKS_UNPREPROCESSED}; run tools/preprocessing.py on the data set first and cut "
                    f"its output (or pass --allow_unpreprocessed to cut it anyway)")


def cut_arrays(job: PatchJob, options: CutOptions) -> tuple[dict[str, np.ndarray], CutResult]:
    """Arrays of one patch file (SPEC 3.3 or 3.5) and a summary of the cloud."""
    points, pixel_idx, unpreprocessed = load_cloud(job.source)
    if unpreprocessed and not options.allow_unpreprocessed:
        _refuse_unpreprocessed(job.source)
    n = len(points)
    if n < options.point_num:
        raise DataError(f"{job.source}: only {n} valid points after the {IMAGE_SIZE}x{IMAGE_SIZE} resize, "
                        f"fewer than the {options.point_num} points of one patch (--point_num)")
    count = patch_count(n, options.group_mul, options.point_num)
    start = fps_start(options.seed, job.draw, n)
    points_gt, points_idx = group_patches(points, pixel_idx, count, start, options.point_num, options.device)
    if options.pretrain:
        rng = np.random.default_rng([options.seed, job.draw])
        arrays = pretrain_arrays(points_gt, rng, options.sample_num)
    else:
        arrays = {"points_gt": points_gt, "points_idx": points_idx}
    return arrays, CutResult(job.target, n, count, unpreprocessed=unpreprocessed)


def cut_one(job: PatchJob, options: CutOptions, staging: Path) -> CutResult:
    """Cut one cloud and write its file to ``staging`` (uncompressed ``.npz`` like the reference:
    deflate would triple the time per cloud for a 1.6x smaller file); the caller commits it."""
    source = source_record(job.source)
    arrays, result = cut_arrays(job, options)
    save_npz(staging, compressed=False, **arrays)
    return dataclasses.replace(result, sha256=sha256_file(staging), source=source)


# ----------------------------------------------------------------------------- planning
def _xyz_count(folder: Path) -> int:
    return len(list(folder.glob("*/xyz/*.tiff"))) if folder.is_dir() else 0


def plan_grid_jobs(datasets_path: str | os.PathLike, save_grid_path: str | os.PathLike,
                   classes: Optional[Iterable[str]] = None, validation: bool = False) -> list[PatchJob]:
    """Default-mode jobs in the reference order (module docstring): per class train, test,
    validation, each sorted by full path. Validation clouds take their draws even when
    ``validation`` is False (they are then not cut)."""
    jobs, draw = [], 0
    for cls in resolve_classes(datasets_path, classes):
        val_count = _xyz_count(Path(datasets_path, cls, "validation"))
        cut_val = validation and val_count > 0
        for split in ("train", "test", "validation") if cut_val else ("train", "test"):
            for sample in sorted(list_samples(datasets_path, cls, split), key=lambda s: str(s.xyz)):
                jobs.append(PatchJob(sample.xyz, sample.grid_file(save_grid_path), draw))
                draw += 1
        if not cut_val:
            draw += val_count
    return jobs


def plan_pretrain_jobs(datasets_path: str | os.PathLike, save_grid_path: str | os.PathLike,
                       classes: Optional[Iterable[str]] = None, seed: int = 0,
                       clouds: int = PRETRAIN_CLOUDS) -> list[PatchJob]:
    """Pretraining jobs (SPEC 3.5): per class ``clouds`` training clouds chosen by
    ``random.Random(seed).sample`` from the sorted list (all of them when fewer),
    written to ``<grid>/PRETRAIN_DATA/<cls>/<stem>.npz``; draws in that order."""
    chooser, jobs = random.Random(seed), []
    for cls in resolve_classes(datasets_path, classes):
        train = sorted(list_samples(datasets_path, cls, "train"), key=lambda s: str(s.xyz))
        chosen = train if len(train) <= clouds else chooser.sample(train, clouds)
        folder = Path(save_grid_path, PRETRAIN_DIR, cls)
        jobs += [PatchJob(s.xyz, folder / f"{s.stem}.npz", len(jobs) + i) for i, s in enumerate(chosen)]
    return jobs


def _stale_pretrain_files(jobs: list[PatchJob]) -> list[Path]:
    """npz files in the PRETRAIN_DATA class folders that the current selection does not write."""
    wanted = {j.target for j in jobs}
    folders = sorted({j.target.parent for j in jobs})
    return [f for folder in folders if folder.is_dir() for f in sorted(folder.glob("*.npz"))
            if f not in wanted and not f.name.startswith(".")]


# ----------------------------------------------------------------------------- whole data set
@dataclass
class CutReport:
    written: int
    skipped: int
    unpreprocessed: list[Path]
    results: list[CutResult]
    recut: int = 0                      # of ``written``: sources changed since the files were cut
    unrecorded: int = 0                 # of ``skipped``: existing files without a source record


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class UnpreprocessedWarning(UserWarning):
    """Patch cutting was run on data that looks unpreprocessed (SPEC 2), with ``allow_unpreprocessed``."""


def _warn_unpreprocessed(source: Path) -> None:
    warnings.warn(f"{source}: {LOOKS_UNPREPROCESSED}; cut anyway (--allow_unpreprocessed)",
                  UnpreprocessedWarning, stacklevel=3)


def _check_first_clouds(jobs: list[PatchJob]) -> None:
    """Refuse an unpreprocessed data set before writing anything: the first cloud of each class is checked
    here, the others as they are cut."""
    firsts = {}
    for job in jobs:
        firsts.setdefault(job.source.parents[3], job.source)     # <root>/<cls>/<split>/<type>/xyz/<stem>.tiff
    for source in firsts.values():
        if looks_unpreprocessed(read_xyz(source)):
            _refuse_unpreprocessed(source)


def _cut_job(args: tuple[PatchJob, CutOptions, Path]) -> CutResult:
    return cut_one(*args)


def _key(manifest: Manifest, target: Path) -> str:
    return target.relative_to(manifest.root).as_posix()


def plan_reruns(jobs: list[PatchJob], manifest: Manifest, overwrite: bool = False
                ) -> tuple[list[PatchJob], set[Path], list[Path]]:
    """Split ``jobs`` into (to cut, of those the ones whose source changed, existing files kept without a
    source record); an interrupted commit is completed first (module docstring)."""
    todo, changed, unrecorded = [], set(), []
    for job in jobs:
        record = manifest.records.get(_key(manifest, job.target))
        if record is not None and record["state"] == "commit" and manifest.roll_forward(record):
            record = None                                   # cannot be completed: cut again
            job.target.unlink(missing_ok=True)
        if overwrite or not job.target.exists():
            todo.append(job)
        elif record is None or "source" not in record:
            unrecorded.append(job.target)
        elif source_changed(record["source"], job.source):
            todo.append(job)
            changed.add(job.target)
    return todo, changed, unrecorded


def run_jobs(jobs: list[PatchJob], options: CutOptions, manifest: Manifest, workers: int = 1,
             overwrite: bool = False, progress: bool = True) -> CutReport:
    """Cut the jobs that need it (:func:`plan_reruns`), in-process for ``workers <= 1``, else in a
    process pool; commit each file as it comes back (tqdm bar).

    The output bytes do not depend on ``workers`` (module docstring). A bad cloud
    (:class:`DataError`) stops the run, keeping the files already committed.
    """
    todo, changed, unrecorded = plan_reruns(jobs, manifest, overwrite)
    if not options.allow_unpreprocessed:
        _check_first_clouds(todo)
    for folder in sorted({job.target.parent for job in jobs}):
        remove_stale_temporaries(folder)                    # left by a killed run
    manifest.discard_staged(job.target for job in jobs)     # uncommitted work (commits were completed above)
    threads = max(1, torch.get_num_threads() // max(workers, 1))
    # fork is fast and safe for CPU work (torch resets its thread pools in the child); CUDA needs spawn
    method = start_method(prefer_fork=options.device == "cpu")
    tasks = [(job, options, manifest.staging_path(job.target)) for job in todo]
    done, flagged = {}, []
    with tqdm(total=len(todo), desc="pretrain patches" if options.pretrain else "patches", unit="cloud",
              disable=not progress) as bar:
        for job, result in zip(todo, ordered_map(_cut_job, tasks, workers, method=method,
                                                 initializer=_init_worker, initargs=(threads,))):
            manifest.commit(_key(manifest, job.target), {str(job.target): result.sha256}, source=result.source)
            done[job.target] = dataclasses.replace(result, recut=job.target in changed)
            if result.unpreprocessed:
                if not flagged:
                    _warn_unpreprocessed(job.source)
                flagged.append(job.source)
            bar.update()
    results = [done.get(job.target) or CutResult(job.target, skipped=True) for job in jobs]
    return CutReport(len(done), len(jobs) - len(done), flagged, results, recut=len(changed), unrecorded=len(unrecorded))


def cut_patches(cfg: CutConfig, progress: bool = True) -> CutReport:
    """Cut a preprocessed data set into patch files (SPEC section 3); what ``cut_patches.py`` runs.

    ``group_mul`` defaults to 10, and is fixed to 5 with ``pretrain`` (SPEC 3.5; another
    value is ignored with a warning). Existing files are skipped unless ``overwrite``;
    with ``pretrain`` and ``overwrite``, npz files of the PRETRAIN_DATA class folders that
    the current selection does not produce are removed (the reference recreates the
    folder), otherwise they are reported with a warning.
    """
    smallest = SIGMA_NEIGHBOUR if cfg.pretrain else 1
    if (cfg.point_num < smallest or cfg.sample_num < 1 or cfg.pretrain_clouds < 1 or cfg.workers < 0
            or (cfg.group_mul is not None and cfg.group_mul < 1)):
        raise ConfigError(f"need point_num >= {smallest}, sample_num >= 1, group_mul >= 1 and workers >= 0; got "
                          f"point_num={cfg.point_num}, sample_num={cfg.sample_num}, group_mul={cfg.group_mul}, "
                          f"workers={cfg.workers}")
    check_output_dir(cfg.save_grid_path, "--save_grid_path")
    device = str(resolve_device(cfg.device))   # before touching any file
    if cfg.pretrain:
        if cfg.group_mul not in (None, PRETRAIN_GROUP_MUL):
            warnings.warn(f"--group_mul {cfg.group_mul} is ignored with --pretrain: pretraining patches always use "
                          f"group_mul {PRETRAIN_GROUP_MUL} (SPEC 3.5)", stacklevel=2)
        group_mul = PRETRAIN_GROUP_MUL
        jobs = plan_pretrain_jobs(cfg.datasets_path, cfg.save_grid_path, cfg.classes, cfg.seed,
                                  clouds=cfg.pretrain_clouds)
        stale = _stale_pretrain_files(jobs)
        if stale and cfg.overwrite:
            for path in stale:
                path.unlink()
        elif stale:
            warnings.warn(f"{stale[0].parent}: {len(stale)} pretraining file(s) from an earlier selection "
                          f"(e.g. {stale[0].name}) are not part of this run's selection; pass --overwrite "
                          f"to remove them", stacklevel=2)
    else:
        group_mul = GROUP_MUL if cfg.group_mul is None else cfg.group_mul
        jobs = plan_grid_jobs(cfg.datasets_path, cfg.save_grid_path, cfg.classes, cfg.validation)
    options = CutOptions(cfg.pretrain, group_mul, cfg.point_num, cfg.sample_num, cfg.seed, device,
                         cfg.allow_unpreprocessed)
    return run_jobs(jobs, options, open_patch_manifest(cfg.save_grid_path), cfg.workers, cfg.overwrite, progress)
