"""Background removal of MVTec 3D-AD samples (SPEC section 2).

One sample (:func:`preprocess_arrays`, SPEC 2.1): fit a plane to the valid points of the
10-pixel border (Open3D RANSAC, seeded), zero every pixel closer than 0.005 to it, pad to
a square whose side is a multiple of 100, keep the most frequent DBSCAN label (noise
included, KEEP #4), and black the RGB pixels wherever a point was zeroed (KEEP #5).

A data set (:func:`preprocess_dataset`, SPEC 2.2): every sample under the root, in place
(the authors' documented pipeline) or into a separate output root with the identical
layout. It never damages the data set:

* Outputs of a sample are first written to hidden temporary files beside their targets.
  A ``commit`` record (target paths and sha256) is appended to the manifest
  ``.preprocessing_manifest.jsonl`` in the output root, then the files are renamed onto
  their targets and a ``done`` record is appended. A restart rolls an interrupted commit
  forward (renames what is left, checking hashes) and discards uncommitted temporary
  files, so an in-place run never reprocesses already-modified inputs. Finished samples
  are skipped: a second run changes no byte. Each record also holds the sample's statistics,
  among them its raw size and padding, from which main.py maps results back to the raw
  frame (SPEC 9.2).
* A data set whose borders are already empty (preprocessed before, without a manifest)
  is refused with a message saying so.
* A failing sample (unreadable file, too few valid border points, nothing left after the
  plane removal) is reported with its file name; the run goes on.
"""
from __future__ import annotations

import filecmp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from core.clustering import dbscan_labels, fit_plane, largest_cluster_mask
from core.dataset import BORDER, SPLITS, defect_types, find_classes, samples_in, valid_mask
from utils.errors import ConfigError, DataError
from utils.io import check_output_dir, copy_file, read_gray, read_rgb, read_xyz, write_png, write_xyz
from utils.manifest import Manifest, stage_files
from utils.pool import ordered_map

# SPEC 2.1 constants (coordinates in the tiff's units, metres for MVTec 3D-AD)
PLANE_DISTANCE = 0.004      # RANSAC inlier threshold (step 2)
RANSAC_N = 50               # points per RANSAC hypothesis (step 2)
RANSAC_ITERATIONS = 1000    # RANSAC iterations (step 2)
REMOVE_DISTANCE = 0.005     # pixels closer than this to the plane are zeroed (step 3)
PAD_MULTIPLE = 100          # the square side is a multiple of this (step 4)
DBSCAN_EPS = 0.006          # DBSCAN radius (step 5)
DBSCAN_MIN_POINTS = 30      # DBSCAN core-point count, the point itself included (step 5)

MANIFEST = ".preprocessing_manifest.jsonl"
TMP_SUFFIX = ".preprocessing-tmp"
_PREFLIGHT = 8              # samples checked for an empty border before an in-place run

LabelFn = Callable[[np.ndarray, float, int], np.ndarray]


class PreprocessingError(DataError):
    """A sample that cannot be preprocessed; the message names the file and the reason."""


# ----------------------------------------------------------------------------- one sample
def border_points(xyz: np.ndarray, width: int = BORDER) -> np.ndarray:
    """Valid points of the top, bottom, left and right ``width``-pixel strips (SPEC 2.1 step 1).

    Corner blocks appear twice, as in the reference.
    """
    strips = [xyz[:width], xyz[-width:], xyz[:, :width], xyz[:, -width:]]
    pts = np.concatenate([s.reshape(-1, 3) for s in strips])
    return pts[valid_mask(pts)]


def pad_widths(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding to the square of SPEC 2.1 step 4.

    The side is the larger of ``height`` and ``width`` rounded up to ``multiple``; the
    smaller half of each padding goes first (top, left).
    """
    side = max(-(-height // multiple), -(-width // multiple)) * multiple
    top, left = (side - height) // 2, (side - width) // 2
    return (top, side - top - height), (left, side - left - width)


def pad_to_square(array: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Zero-pad an (H, W) or (H, W, C) array as in SPEC 2.1 step 4."""
    rows, cols = pad_widths(array.shape[0], array.shape[1], multiple)
    return np.pad(array, (rows, cols) + ((0, 0),) * (array.ndim - 2), mode="constant")


@dataclass
class Preprocessed:
    """Outputs of one sample plus what happened to it (recorded in the manifest)."""

    xyz: np.ndarray                 # (L, L, 3) float32
    rgb: np.ndarray                 # (L, L, 3) uint8
    gt: Optional[np.ndarray]        # (L, L) uint8 or None
    plane: np.ndarray               # (4,) float64, unit normal
    removed_plane: int              # valid points zeroed by the plane removal
    removed_cluster: int            # valid points zeroed by the cluster step
    kept: int                       # valid points left
    clusters: int                   # DBSCAN clusters found (noise excluded)
    kept_label: int                 # the label kept (-1 = noise, KEEP #4)
    raw_shape: tuple[int, int]      # (H, W) of the input sample
    padding: tuple[tuple[int, int], tuple[int, int]]   # ((top, bottom), (left, right)), SPEC 2.1 step 4
    nonfinite: int = 0              # points with a NaN or inf coordinate, set to (0, 0, 0)

    def stats(self) -> dict:
        """What the manifest records of the sample; ``raw_shape`` and ``padding`` give main.py the
        raw frame of each preprocessed sample (SPEC 9.2)."""
        return dict(plane=[float(v) for v in self.plane], removed_plane=self.removed_plane,
                    removed_cluster=self.removed_cluster, kept=self.kept, clusters=self.clusters,
                    kept_label=self.kept_label, raw_shape=list(self.raw_shape),
                    padding=[list(p) for p in self.padding], nonfinite=self.nonfinite)


def _fit_border_plane(xyz: np.ndarray, seed: Optional[int], name: str) -> np.ndarray:
    """SPEC 2.1 steps 1-2: the RANSAC plane of the valid border points."""
    border = border_points(xyz)
    if len(border) < RANSAC_N:
        raise PreprocessingError(
            f"{name}: only {len(border)} valid points in the {BORDER}-pixel border, the plane fit needs "
            f"{RANSAC_N}; the file looks already preprocessed (an earlier run emptied its border) "
            f"or has no background plane")
    return fit_plane(border, PLANE_DISTANCE, RANSAC_N, RANSAC_ITERATIONS, seed)


def preprocess_arrays(xyz: np.ndarray, rgb: np.ndarray, gt: Optional[np.ndarray] = None, seed: Optional[int] = 0,
                      name: str = "sample", labels_fn: LabelFn = dbscan_labels,
                      plane: Optional[np.ndarray] = None) -> Preprocessed:
    """SPEC 2.1 steps 1-5 on one sample's arrays; inputs are not modified.

    ``plane`` (a, b, c, d), when given, replaces the RANSAC fit of steps 1-2 (the synthetic
    generator knows its plane, and needs no Open3D then).

    ``labels_fn(points, eps, min_points)`` gives DBSCAN labels (default: the exact fast
    :func:`core.clustering.dbscan_labels`; the authors' way is
    Open3D's ``cluster_dbscan``, in :mod:`tools.authors_way.preprocessing`). ``name`` prefixes error messages.
    Raises :class:`PreprocessingError` for too few valid border points or when no valid
    point is left after the plane removal.
    """
    h, w = xyz.shape[:2]
    nonfinite = ~np.isfinite(xyz).all(axis=-1)
    if nonfinite.any():   # missing data, as MVTec 3D-AD marks it: (0, 0, 0); colours kept (invalid pixels)
        xyz = np.where(nonfinite[..., None], np.float32(0), xyz)
    if rgb.shape[:2] != (h, w) or (gt is not None and gt.shape[:2] != (h, w)):
        raise PreprocessingError(f"{name}: image sizes differ: xyz {h}x{w}, rgb {rgb.shape[0]}x{rgb.shape[1]}"
                                 + ("" if gt is None else f", gt {gt.shape[0]}x{gt.shape[1]}"))
    if plane is None:
        plane = _fit_border_plane(xyz, seed, name)

    flat = xyz.reshape(-1, 3)
    valid = valid_mask(flat)
    # |a x + b y + c z + d| for every pixel, in float64 as the reference computes it
    distance = np.abs(np.dot(plane, np.hstack((flat, np.ones((len(flat), 1)))).T))
    removed = distance < REMOVE_DISTANCE
    out_xyz, out_rgb = flat.copy(), rgb.reshape(-1, rgb.shape[-1]).copy()
    out_xyz[removed] = 0
    out_rgb[removed] = 0
    left = valid & ~removed
    idx = np.flatnonzero(left)
    if len(idx) == 0:
        raise PreprocessingError(f"{name}: no valid point is left after removing the background plane "
                                 f"{np.round(plane, 6).tolist()}; nothing to cluster")

    # step 5 on the valid points in row-major order (padding does not change that order)
    labels = labels_fn(out_xyz[idx], DBSCAN_EPS, DBSCAN_MIN_POINTS)
    keep = largest_cluster_mask(labels)
    drop = idx[~keep]
    out_xyz[drop] = 0
    out_rgb[drop] = 0
    return Preprocessed(
        xyz=pad_to_square(out_xyz.reshape(xyz.shape)), rgb=pad_to_square(out_rgb.reshape(rgb.shape)),
        gt=None if gt is None else pad_to_square(gt), plane=plane,
        removed_plane=int(np.count_nonzero(removed & valid)), removed_cluster=len(drop), kept=int(keep.sum()),
        clusters=int(labels.max()) + 1, kept_label=int(labels[keep][0]), raw_shape=(h, w), padding=pad_widths(h, w),
        nonfinite=int(nonfinite.sum()))


# ----------------------------------------------------------------------------- data set: files and manifest
def open_manifest(root: Path) -> Manifest:
    """The preprocessing manifest of an output root (see :mod:`utils.manifest`)."""
    return Manifest(root, MANIFEST, TMP_SUFFIX)


@dataclass(frozen=True)
class _Task:
    key: str                        # xyz path relative to the root (posix): the manifest key
    sources: tuple[Path, Path, Optional[Path]]   # xyz, rgb, gt inputs
    targets: tuple[Path, Path, Optional[Path]]   # their outputs
    seed: Optional[int]


def _process_sample(task: _Task) -> dict:
    """Worker: read, preprocess, write the outputs to staging files; never renames."""
    xyz_src, rgb_src, gt_src = task.sources

    def writer(write, array, src):
        def run(tmp):
            write(tmp, array)
            shutil.copymode(src, tmp)  # keep the input's permission bits
        return run

    try:
        xyz = read_xyz(xyz_src)
        rgb = read_rgb(rgb_src)
        gt = read_gray(gt_src) if gt_src is not None else None
        result = preprocess_arrays(xyz, rgb, gt, seed=task.seed, name=str(xyz_src))
        outputs = ((write_xyz, result.xyz), (write_png, result.rgb), (write_png, result.gt))
        files = stage_files([(target, writer(write, array, src)) for src, target, (write, array)
                             in zip(task.sources, task.targets, outputs) if target is not None], TMP_SUFFIX)
        return dict(key=task.key, ok=True, files=files, stats=result.stats())
    except Exception as exc:  # any per-file failure is reported and the run continues
        message = str(exc) if isinstance(exc, DataError) else f"{xyz_src}: {type(exc).__name__}: {exc}"
        return dict(key=task.key, ok=False, error=message)


# ----------------------------------------------------------------------------- data set: discovery
def _discover(root: Path, out_root: Path, seed: Optional[int]) -> tuple[list[_Task], list[tuple[str, str]], set]:
    """Tasks for every sample (sorted), folder-level failures, and the sample folders."""
    tasks, failures, folders = [], [], set()
    for cls in find_classes(root):
        for split in SPLITS:
            if not (root / cls / split).is_dir():
                continue
            for defect in defect_types(root, cls, split):
                folder = Path(cls, split, defect)
                folders.add(folder)
                try:
                    samples = samples_in(root, cls, split, defect, need_gt=False)
                except DataError as exc:
                    failures.append((folder.as_posix(), str(exc)))
                    continue
                for s in samples:
                    sources = (s.xyz, s.rgb, s.gt)
                    targets = tuple(None if p is None else out_root / p.relative_to(root) for p in sources)
                    tasks.append(_Task(s.xyz.relative_to(root).as_posix(), sources, targets, seed))
    return tasks, failures, folders


def _copy_other_files(root: Path, out_root: Path, folders: set) -> int:
    """Copy every file that preprocessing does not produce (SPEC 2.2 FIX); return the count.

    Files in the ``xyz``/``rgb``/``gt`` folders of sample folders are never copied: they
    are outputs (a failed sample's raw files must not look preprocessed).
    """
    copied = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir.parent in folders and rel_dir.name in ("xyz", "rgb", "gt"):
            continue
        for name in sorted(filenames):
            if name == MANIFEST or name.endswith(TMP_SUFFIX):
                continue
            src, dst = Path(dirpath, name), out_root / rel_dir / name
            if dst.exists() and filecmp.cmp(src, dst, shallow=False):
                continue
            copy_file(src, dst)
            copied += 1
    return copied


# ----------------------------------------------------------------------------- data set: runner
@dataclass
class RunSummary:
    """What a :func:`preprocess_dataset` run did."""

    root: Path
    out_root: Path
    processed: list[str] = field(default_factory=list)     # manifest keys processed by this run
    skipped: int = 0                                        # already done before this run
    recovered: int = 0                                      # interrupted commits completed
    copied: int = 0                                         # other files copied (output_dir mode)
    multi_cluster: int = 0                                  # processed samples with > 1 cluster
    nonfinite: dict[str, int] = field(default_factory=dict)  # sample -> points with NaN/inf, set to (0, 0, 0)
    failures: list[tuple[str, str]] = field(default_factory=list)   # (relative path, message)

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self) -> str:
        lines = [f"preprocessed {len(self.processed)} sample(s) into {self.out_root}; "
                 f"{self.skipped} already done (manifest), {self.recovered} interrupted commit(s) completed"
                 + (f", {self.copied} other file(s) copied" if self.copied else "")]
        if self.multi_cluster:
            lines.append(f"{self.multi_cluster} sample(s) had more than one DBSCAN cluster "
                         f"(cluster sizes in {self.out_root / MANIFEST})")
        if self.nonfinite:
            lines.append(f"{len(self.nonfinite)} sample(s) had {sum(self.nonfinite.values())} point(s) with a NaN or "
                         f"inf coordinate, written as (0, 0, 0) (missing data), e.g. {next(iter(self.nonfinite))}: "
                         f"{next(iter(self.nonfinite.values()))}")
        if self.failures:
            lines.append(f"{len(self.failures)} FAILED:")
            lines += [f"  {message}" for _, message in self.failures]
        return "\n".join(lines)


def _check_roots(root: Path, output_dir: Optional[Path]) -> Path:
    """The output root (``root`` itself in place), checked to be writable; creates nothing."""
    if not root.is_dir():
        raise DataError(f"{root}: data set path is not a folder")
    if output_dir is None or Path(output_dir).resolve() == root.resolve():
        check_output_dir(root, "DATASET_PATH (preprocessed in place)")
        return root
    out_root = Path(output_dir)
    check_output_dir(out_root, "--output_dir")
    a, b = root.resolve(), out_root.resolve()
    if a in b.parents or b in a.parents:
        raise DataError(f"{out_root}: the output folder must be neither inside the data set {root} nor contain it")
    if (root / MANIFEST).exists():
        raise DataError(f"{root}: holds {MANIFEST}, so it is already preprocessed; "
                        f"run on the raw data set instead")
    return out_root


def _refuse_if_preprocessed(root: Path, tasks: list[_Task]) -> None:
    """Refuse a data set whose first samples all have (nearly) empty borders and no manifest."""
    checked = []
    for task in tasks[:_PREFLIGHT]:
        try:
            n = len(border_points(read_xyz(task.sources[0])))
        except DataError:
            return  # unreadable files are reported per file
        if n >= RANSAC_N:
            return
        checked.append(f"{task.key}: {n}")
    if checked:
        raise DataError(
            f"{root}: looks already preprocessed: the {BORDER}-pixel borders of its first {len(checked)} xyz "
            f"file(s) hold fewer than {RANSAC_N} valid points ({'; '.join(checked)}) and there is no "
            f"{MANIFEST}. Preprocessing it again would fit garbage planes; run on the raw data set.")


@dataclass
class PreprocessConfig:
    """Options of ``tools/preprocessing.py`` (SPEC 2)."""

    dataset_path: Path
    output_dir: Optional[Path] = None   # None: in place
    workers: int = 1
    seed: Optional[int] = 0


def preprocess(cfg: PreprocessConfig, progress: bool = True) -> RunSummary:
    """What ``tools/preprocessing.py`` runs: :func:`preprocess_dataset` with ``cfg``'s options."""
    return preprocess_dataset(cfg.dataset_path, cfg.output_dir, cfg.workers, cfg.seed, progress)


def preprocess_dataset(root: str | os.PathLike, output_dir: Optional[str | os.PathLike] = None, workers: int = 1,
                       seed: Optional[int] = 0, progress: bool = True) -> RunSummary:
    """Preprocess every sample under ``root`` (SPEC 2), resumably; see the module docstring.

    ``output_dir`` None (or equal to ``root``): in place. Otherwise the outputs and a copy
    of every other file go to ``output_dir`` and ``root`` is not modified. ``workers``
    processes preprocess samples in parallel (same bytes as one worker). Raises
    :class:`DataError` for an unusable root; per-sample failures are in the summary.
    """
    root = Path(root)
    out_root = _check_roots(root, None if output_dir is None else Path(output_dir))
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    tasks, failures, folders = _discover(root, out_root, seed)
    if not tasks and not failures:
        raise DataError(f"{root}: no samples found (expected <class>/<split>/<defect>/xyz/NNN.tiff "
                        f"with matching rgb/NNN.png)")
    summary = RunSummary(root=root, out_root=out_root, failures=failures)
    manifest = open_manifest(out_root)

    pending = []
    for task in tasks:
        state, info = manifest.resume(task.key)
        if state == "failed":
            summary.failures.append((task.key, info))
        elif state == "recovered":
            summary.recovered += 1
        elif state == "done":
            summary.skipped += 1
        elif state == "missing" and out_root == root:
            summary.failures.append((task.key, f"{info}: missing although the manifest "
                                               f"records it as preprocessed in place; restore it"))
        else:
            pending.append(task)
    for task in pending:  # staging files of uncommitted work are garbage
        manifest.discard_staged(task.targets)
    if pending and not manifest.exists():
        _refuse_if_preprocessed(root, pending)
    created = out_root                               # the topmost folder this run creates, if any
    while not created.parent.exists():
        created = created.parent
    created = None if out_root.exists() else created
    out_root.mkdir(parents=True, exist_ok=True)      # only now: a refused run leaves no folder behind
    try:
        _run_pending(root, out_root, pending, folders, manifest, summary, workers, progress)
    finally:
        if created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created)                     # nothing written (e.g. every sample failed)
    return summary


def _run_pending(root: Path, out_root: Path, pending: list[_Task], folders: set, manifest: Manifest,
                 summary: RunSummary, workers: int, progress: bool) -> None:
    """Preprocess ``pending`` into ``summary`` (commits through ``manifest``); copy the other files."""

    def handle(result: dict) -> None:
        if result["ok"]:
            manifest.commit(result["key"], result["files"], stats=result["stats"])
            summary.processed.append(result["key"])
            summary.multi_cluster += result["stats"]["clusters"] > 1
            if result["stats"]["nonfinite"]:
                summary.nonfinite[result["key"]] = result["stats"]["nonfinite"]
        else:
            summary.failures.append((result["key"], result["error"]))

    with tqdm(total=len(pending), desc="preprocessing", unit="sample", disable=not progress) as bar:
        for result in ordered_map(_process_sample, pending, workers):
            handle(result)
            bar.update()
    if out_root != root:
        summary.copied = _copy_other_files(root, out_root, folders)
