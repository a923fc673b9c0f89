"""Local 3D patches (SPEC section 3): loading clouds, FPS + kNN grouping, patch files.

Default mode writes ``<grid>/<cls>/<split>/<type>/npz/<stem>.npz`` (SPEC 3.3); ``--pretrain``
writes ``<grid>/PRETRAIN_DATA/<cls>/<stem>.npz`` (SPEC 3.5).

Randomness (SPEC App. A, parity README "Patch cutting: RNG stream"). The reference draws
one FPS start ``torch.randint(0, N, (1,))`` per cloud from torch's global generator seeded
once; clouds are visited class by class, ``train`` (sorted), ``test`` (sorted by full path),
``validation`` (sorted). Such a draw consumes exactly one 32-bit Mersenne-Twister output
whatever ``N`` is, so draw number ``i`` is replayed from a fresh generator seeded with
``seed`` and advanced by ``i`` outputs (:func:`fps_start`). Every cloud therefore knows
its start from ``(seed, i, N)`` alone: the same seed gives identical arrays for any number of
workers, for any subset of files skipped as already done, and validation clouds keep
their places in the stream even when they are not cut. With ``--seed 0`` the start points,
and on CPU the whole files, equal the reference's. Pretraining noise comes from a NumPy
generator per cloud seeded with ``(seed, i)`` (the reference's unseeded global NumPy stream
cannot be replayed per cloud); the pretraining clouds are chosen with ``random.Random(seed)``.

(The lead wrote the patch-file loader and the per-patch normalisation first because the
inference code needs them; the cutting itself is added below them.)
"""
from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from core.dataset import IMAGE_SIZE, list_samples, resolve_classes, to_unorganized, valid_mask
from core.preprocessing import BORDER
from utils.device import resolve_device
from utils.io import DataError, load_npz, read_xyz, save_npz

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


# ============================================================================= cutting (SPEC 3.1-3.3, 3.5)
GROUP_MUL = 10                # default mode: G = round(N * 10 / 500) = round(N / 50)
PRETRAIN_GROUP_MUL = 5        # pretrain mode: forced (SPEC 3.5, KEEP #10)
SAMPLE_NUM = 20               # noisy query copies per pretraining patch
PRETRAIN_CLOUDS = 20          # training clouds per class used for pretraining
NEAR_SHARE = 0.625            # ceil(20 * 0.625) = 13 copies at 0.5 sigma, the rest at 1.0 sigma
SIGMA_NEIGHBOUR = 51          # sigma = distance to the 51st nearest patch point, the point itself included
PRETRAIN_DIR = "PRETRAIN_DATA"
PRETRAIN_KEYS = ("samples_all", "points_all", "origins_all")
MAX_VALID_SHARE = 0.6         # above this share of valid pixels a cloud still holds its background plane
MAX_BORDER_SHARE = 0.25       # ... or above this share of valid pixels in the border strips
KNN_CHUNK = 64                # centres per kNN distance block on CPU (64 x N float32)
PRETRAIN_CHUNK = 64           # patches per KD-tree / noise block in pretraining


# ----------------------------------------------------------------------------- 3.1 loading
def nearest_source_indices(in_size: int, out_size: int = IMAGE_SIZE) -> np.ndarray:
    """Source index read by each output index of torch ``interpolate(mode='nearest')`` (SPEC 3.1).

    ``min(floor(fl32(o) * fl32(in/out)), in - 1)``, all in float32 as PyTorch computes it for
    float32 clouds (not ``o * in // out``, which differs for e.g. 454, 480, 1300 -> 224).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(xyz: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Organised cloud (H, W, 3) resized to (size, size, 3) by nearest sampling (SPEC 3.1 step 2)."""
    rows = nearest_source_indices(xyz.shape[0], size)
    cols = nearest_source_indices(xyz.shape[1], size)
    return xyz[rows[:, None], cols[None, :]]


def looks_unpreprocessed(xyz: np.ndarray) -> bool:
    """True when a cloud still seems to hold its background plane (SPEC 2): more than 60 % of
    its pixels valid (estimated on every 4th row and column), or more than 25 % of the
    pixels of its 10-pixel border strips valid (preprocessing zeroes the plane and pads
    with zeros)."""
    strips = (xyz[:BORDER], xyz[-BORDER:], xyz[BORDER:-BORDER, :BORDER], xyz[BORDER:-BORDER, -BORDER:])
    border = np.concatenate([valid_mask(strip).ravel() for strip in strips])
    return bool(valid_mask(xyz[::4, ::4]).mean() > MAX_VALID_SHARE or border.mean() > MAX_BORDER_SHARE)


def normalize_cloud(points: np.ndarray, path: str | os.PathLike = "cloud") -> np.ndarray:
    """Global normalisation of SPEC 3.1 step 4 in float32: ``(p - min) / (max_x - min_x)`` on all axes."""
    low = points.min(axis=0)
    x_range = points[:, 0].max() - low[0]
    if not x_range > 0:
        raise DataError(f"{path}: all valid points have the same x coordinate; cannot normalise the cloud")
    return (points - low) / x_range


def load_cloud(path: str | os.PathLike, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, bool]:
    """Load a cloud as the reference does (SPEC 3.1).

    Returns the valid points of the nearest-resized ``size`` x ``size`` grid, globally
    normalised (N, 3) float32, their flat pixel indices (N,) int64 ascending, and whether
    the file looks unpreprocessed (:func:`looks_unpreprocessed`).
    """
    xyz = read_xyz(path)
    points, pixel_idx = to_unorganized(resize_nearest(xyz, size))
    if len(points) == 0:
        raise DataError(f"{path}: no valid points after the {size}x{size} resize")
    return normalize_cloud(points, path), pixel_idx.astype(np.int64), looks_unpreprocessed(xyz)


# ----------------------------------------------------------------------------- 3.2 grouping
def patch_count(n_points: int, group_mul: int = GROUP_MUL, point_num: int = POINT_NUM) -> int:
    """Number of patches ``G = round(N * group_mul / point_num)`` with Python rounding (SPEC 3.2)."""
    return round(n_points * group_mul / point_num)


def fps_start(seed: int, draw: int, n_points: int) -> int:
    """FPS start of draw number ``draw`` of the stream ``torch.manual_seed(seed)``; one
    ``torch.randint(0, n_points, (1,))`` per cloud (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if draw:
        torch.randint(0, 2, (draw,), generator=gen)  # one 32-bit output per element
    return int(torch.randint(0, n_points, (1,), generator=gen))


def _squared_distances(centres: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(3, M) centres x (3, N) points -> (M, N) squared Euclidean distances in the reference's
    rounding: per-coordinate differences squared, summed x, y, z in that order (what
    ``((a - b) ** 2).sum(-1)`` computes; no matmul identity, whose rounding reorders near-ties)."""
    dist = (centres[0][:, None] - coords[0][None]) ** 2
    dist += (centres[1][:, None] - coords[1][None]) ** 2
    dist += (centres[2][:, None] - coords[2][None]) ** 2
    return dist


def _fps_numpy(coords: np.ndarray, count: int, start: int) -> np.ndarray:
    """FPS on (3, N) float32 coordinates with NumPy (CPU: ~7x less per-step overhead than torch)."""
    dist = np.full(coords.shape[1], 1e10, dtype=np.float32)
    step = np.empty_like(dist)
    centres = np.empty(count, dtype=np.int64)
    far = start
    for t in range(count):
        centres[t] = far
        np.square(coords[0] - coords[0, far], out=step)
        step += np.square(coords[1] - coords[1, far])
        step += np.square(coords[2] - coords[2, far])
        np.minimum(dist, step, out=dist)
        far = int(dist.argmax())
    return centres


def _fps_torch(coords: torch.Tensor, count: int, start: int) -> torch.Tensor:
    """FPS on (3, N) float32 coordinates with torch, without host synchronisation (CUDA)."""
    dist = torch.full((coords.shape[1],), 1e10, dtype=coords.dtype, device=coords.device)
    centres = torch.empty(count, dtype=torch.long, device=coords.device)
    far = torch.tensor([start], dtype=torch.long, device=coords.device)
    for t in range(count):
        centres[t] = far[0]
        torch.minimum(dist, _squared_distances(coords.index_select(1, far), coords)[0], out=dist)
        far = dist.max(dim=0, keepdim=True).indices
    return centres


def farthest_point_sample(points: torch.Tensor, count: int, start: int) -> torch.Tensor:
    """Exact farthest point sampling (SPEC 3.2): ``count`` centre indices, the first ``start``.

    float32 squared distances as the reference computes them, initialised to 1e10, updated
    with the minimum; the next centre is the first index of the maximum. Vectorised over
    the points, sequential over the centres; NumPy on CPU, torch on other devices.
    """
    coords = points.t().contiguous()
    if coords.device.type == "cpu":
        return torch.from_numpy(_fps_numpy(coords.numpy(), count, start))
    return _fps_torch(coords, count, start)


def knn_indices(points: torch.Tensor, centres: torch.Tensor, k: int, chunk: Optional[int] = None) -> torch.Tensor:
    """Indices (G, k) of the ``k`` nearest points of every centre index, nearest first (SPEC 3.2).

    Blocks of ``chunk`` centres (default 64 on CPU, 512 on GPU): squared distances, then
    ``topk(k + 1)`` instead of the reference's full argsort of every row. Where the k + 1
    smallest distances of a row hold an exact tie (their order, or which of them is k-th,
    would be up to the sort), that row alone is ordered with the reference's full-row
    argsort, so on CPU the result equals the first ``k`` columns of the reference's argsort
    exactly; elsewhere the order of the ``topk`` is already unique.
    """
    coords = points.t().contiguous()
    chunk = chunk or (KNN_CHUNK if points.device.type == "cpu" else 8 * KNN_CHUNK)
    out = torch.empty(len(centres), k, dtype=torch.long, device=points.device)
    take = min(k + 1, points.shape[0])
    for s in range(0, len(centres), chunk):
        dist = _squared_distances(coords[:, centres[s:s + chunk]], coords)
        values, idx = dist.topk(take, dim=1, largest=False, sorted=True)
        tied = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero()[:, 0]
        if len(tied):
            idx[tied] = dist[tied].argsort(dim=1)[:, :take]
        out[s:s + chunk] = idx[:, :k]
    return out


def group_patches(points: np.ndarray, pixel_idx: np.ndarray, count: int, start: int,
                  point_num: int = POINT_NUM, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """FPS + kNN grouping (SPEC 3.2): ``points_gt`` (G, K, 3) float32 in the globally
    normalised frame and ``points_idx`` (G, K) int64 flat pixel indices; ``points_idx[g, 0]``
    is centre ``g``."""
    xyz = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    nearest = knn_indices(xyz, farthest_point_sample(xyz, count, start), point_num).cpu().numpy()
    return points[nearest], pixel_idx[nearest]


# ----------------------------------------------------------------------------- 3.5 pretraining data
def neighbour_sigma(patches: np.ndarray) -> np.ndarray:
    """Per-point noise scale (G, K) float64: distance to the 51st nearest point of the same
    patch, the point itself included (SPEC 3.5), computed once per patch (FIX #11).

    scipy's KD-tree in float64, as the reference. One tree and one batched query per patch:
    a single tree over all patches (patch id as a fourth coordinate) gives identical
    results but was measured 1.1-1.4x slower; the Python overhead per patch is negligible.
    """
    from scipy.spatial import cKDTree

    return np.stack([cKDTree(p).query(p, SIGMA_NEIGHBOUR)[0][:, -1] for p in patches.astype(np.float64)])


def nearest_surface_points(surfaces: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index (G, Q) of the nearest point of ``surfaces[g]`` (G, K, 3) for every query of
    ``queries[g]`` (G, Q, 3): exact Euclidean k=1 search with scipy's KD-tree in float64, as
    the reference; one batched query of Q points per patch (1.6x faster than one tree over
    all patches, measured; torch brute force is far slower on CPU)."""
    from scipy.spatial import cKDTree

    threads = torch.get_num_threads()
    return np.stack([cKDTree(s).query(q, k=1, workers=threads)[1]
                     for s, q in zip(surfaces.astype(np.float64), queries)])


def copy_scales(sample_num: int = SAMPLE_NUM) -> np.ndarray:
    """Noise scale of each query copy: ``ceil(0.625 n)`` copies at 0.5, the rest at 1.0 (SPEC 3.5)."""
    near = math.ceil(sample_num * NEAR_SHARE)
    return np.array([0.5] * near + [1.0] * (sample_num - near))


def pretrain_arrays(patches: np.ndarray, rng: np.random.Generator, sample_num: int = SAMPLE_NUM,
                    chunk: int = PRETRAIN_CHUNK) -> dict[str, np.ndarray]:
    """Pretraining arrays of SPEC 3.5 for patches (G, K, 3) float32 (globally normalised frame).

    ``samples_all`` (G, sample_num*K, 3): copy ``m`` of point ``i`` is
    ``p_i + (scale_m * sigma_i) * eps`` (eps standard normal, drawn patch by patch, copy by
    copy, from ``rng``), normalised with the patch's own frame (:func:`patch_frame`);
    ``points_all``: the nearest normalised patch point of each query; ``origins_all``: the
    patches as given. All float32 (the queries are built in float64 and cast at the end).
    """
    g, k, _ = patches.shape
    scales = copy_scales(sample_num)
    samples = np.empty((g, sample_num * k, 3), dtype=np.float32)
    targets = np.empty((g, sample_num * k, 3), dtype=np.float32)
    for s in range(0, g, chunk):
        block = patches[s:s + chunk]
        n = len(block)
        sigma = neighbour_sigma(block)                                            # (n, K)
        noise = rng.standard_normal((n, sample_num, k, 3))
        queries = block[:, None].astype(np.float64) + (scales[None, :, None, None] * sigma[:, None, :, None]) * noise
        scale, centre = (t.numpy()[:, None] for t in patch_frame(torch.from_numpy(block)))
        surface = block * scale[..., None] - centre                                # float32
        queries = queries.reshape(n, sample_num * k, 3) * scale[..., None] - centre
        samples[s:s + n] = queries
        targets[s:s + n] = np.take_along_axis(surface, nearest_surface_points(surface, queries)[..., None], axis=1)
    return {"samples_all": samples, "points_all": targets, "origins_all": np.ascontiguousarray(patches)}


def load_pretrain(path: str | os.PathLike, point_num: int = POINT_NUM) -> tuple[np.ndarray, np.ndarray]:
    """Read a pretraining file: ``samples_all`` and ``points_all``, both (G, S*K, 3) float32 (SPEC 3.5)."""
    data = load_npz(path, PRETRAIN_KEYS[:2])
    samples, points = data["samples_all"], data["points_all"]
    if samples.ndim != 3 or samples.shape[2] != 3 or points.shape != samples.shape or samples.shape[0] == 0 \
            or samples.shape[1] % point_num:
        raise DataError(f"{path}: expected samples_all and points_all of the same shape (G, S*{point_num}, 3) "
                        f"with G > 0, got {samples.shape} and {points.shape}")
    return samples.astype(np.float32, copy=False), points.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- one cloud
@dataclass(frozen=True)
class PatchJob:
    """One cloud to cut: source tiff, destination npz and its place in the FPS-start stream."""

    source: Path
    target: Path
    draw: int


@dataclass(frozen=True)
class CutOptions:
    pretrain: bool = False
    group_mul: int = GROUP_MUL
    point_num: int = POINT_NUM
    sample_num: int = SAMPLE_NUM
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class CutResult:
    target: Path
    n_points: int = 0
    n_patches: int = 0
    skipped: bool = False
    unpreprocessed: bool = False


def cut_arrays(job: PatchJob, options: CutOptions) -> tuple[dict[str, np.ndarray], CutResult]:
    """Arrays of one patch file (SPEC 3.3 or 3.5) and a summary of the cloud."""
    points, pixel_idx, unpreprocessed = load_cloud(job.source)
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


def cut_one(job: PatchJob, options: CutOptions, overwrite: bool = False) -> CutResult:
    """Cut one cloud and write its file atomically (uncompressed ``.npz`` like the reference:
    deflate would triple the time per cloud for a 1.6x smaller file); an existing file is
    kept unless ``overwrite``."""
    if job.target.exists() and not overwrite:
        return CutResult(job.target, skipped=True)
    arrays, result = cut_arrays(job, options)
    save_npz(job.target, compressed=False, **arrays)
    return result


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
    return [f for folder in folders if folder.is_dir() for f in sorted(folder.glob("*.npz")) if f not in wanted]


# ----------------------------------------------------------------------------- whole data set
@dataclass
class CutReport:
    written: int
    skipped: int
    unpreprocessed: list[Path]
    results: list[CutResult]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class UnpreprocessedWarning(UserWarning):
    """Patch cutting was run on data that looks unpreprocessed (SPEC 2)."""


def _warn_unpreprocessed(source: Path) -> None:
    warnings.warn(f"{source}: the cloud still seems to contain its background plane (too many valid "
                  f"pixels, or valid pixels along the border); run tools/preprocessing.py on the data "
                  f"set first and cut patches from its output", UnpreprocessedWarning, stacklevel=3)


def run_jobs(jobs: list[PatchJob], options: CutOptions, workers: int = 1, overwrite: bool = False,
             progress: bool = True) -> CutReport:
    """Cut every job, in-process for ``workers <= 1``, else in a process pool; tqdm bar.

    The output bytes do not depend on ``workers`` (module docstring). The first file that
    looks unpreprocessed raises an :class:`UnpreprocessedWarning` at once; a bad cloud
    (:class:`DataError`) stops the run, keeping the files already completed.
    """
    from tqdm import tqdm

    results, flagged = [], []
    bar = tqdm(total=len(jobs), desc="pretrain patches" if options.pretrain else "patches", unit="cloud",
               disable=not progress)

    def collect(job: PatchJob, result: CutResult) -> None:
        results.append(result)
        if result.unpreprocessed:
            if not flagged:
                _warn_unpreprocessed(job.source)
            flagged.append(job.source)
        bar.update()

    try:
        if workers <= 1:
            for job in jobs:
                collect(job, cut_one(job, options, overwrite))
        else:
            threads = max(1, torch.get_num_threads() // workers)
            # fork is fast and safe for CPU work (torch resets its thread pools in the child); CUDA needs spawn
            method = "fork" if options.device == "cpu" and "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                futures = {pool.submit(cut_one, job, options, overwrite): job for job in jobs}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()
                        collect(futures[future], future.result())
    finally:
        bar.close()
    order = {job.target: i for i, job in enumerate(jobs)}
    results.sort(key=lambda r: order[r.target])
    written = sum(not r.skipped for r in results)
    return CutReport(written, len(results) - written, flagged, results)


def cut_patches(datasets_path: str | os.PathLike, save_grid_path: str | os.PathLike, *, pretrain: bool = False,
                classes: Optional[Iterable[str]] = None, group_mul: Optional[int] = None,
                point_num: int = POINT_NUM, sample_num: int = SAMPLE_NUM, pretrain_clouds: int = PRETRAIN_CLOUDS,
                seed: int = 0, workers: int = 1,
                overwrite: bool = False, validation: bool = False, device: str = "auto",
                progress: bool = True) -> CutReport:
    """Cut a preprocessed data set into patch files (SPEC section 3); what ``cut_patches.py`` runs.

    ``group_mul`` defaults to 10, and is fixed to 5 with ``pretrain`` (SPEC 3.5; another
    value is ignored with a warning). Existing files are skipped unless ``overwrite``;
    with ``pretrain`` and ``overwrite``, npz files of the PRETRAIN_DATA class folders that
    the current selection does not produce are removed (the reference recreates the
    folder), otherwise they are reported with a warning.
    """
    smallest = SIGMA_NEIGHBOUR if pretrain else 1
    if point_num < smallest or sample_num < 1 or pretrain_clouds < 1 or workers < 0 or (group_mul is not None and group_mul < 1):
        raise ValueError(f"need point_num >= {smallest}, sample_num >= 1, group_mul >= 1 and workers >= 0; got "
                         f"point_num={point_num}, sample_num={sample_num}, group_mul={group_mul}, workers={workers}")
    device = str(resolve_device(device))   # before touching any file
    if pretrain:
        if group_mul not in (None, PRETRAIN_GROUP_MUL):
            warnings.warn(f"--group_mul {group_mul} is ignored with --pretrain: pretraining patches always use "
                          f"group_mul {PRETRAIN_GROUP_MUL} (SPEC 3.5)", stacklevel=2)
        group_mul = PRETRAIN_GROUP_MUL
        jobs = plan_pretrain_jobs(datasets_path, save_grid_path, classes, seed, clouds=pretrain_clouds)
        stale = _stale_pretrain_files(jobs)
        if stale and overwrite:
            for path in stale:
                path.unlink()
        elif stale:
            warnings.warn(f"{stale[0].parent}: {len(stale)} pretraining file(s) from an earlier selection "
                          f"(e.g. {stale[0].name}) are not part of this run's selection; pass --overwrite "
                          f"to remove them", stacklevel=2)
    else:
        group_mul = GROUP_MUL if group_mul is None else group_mul
        jobs = plan_grid_jobs(datasets_path, save_grid_path, classes, validation)
    options = CutOptions(pretrain, group_mul, point_num, sample_num, seed, device)
    return run_jobs(jobs, options, workers, overwrite, progress)
