"""Tests of core/patches.py (SPEC section 3): resize rule, FPS, kNN, RNG stream, files, pretraining data."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from core.dataset import IMAGE_SIZE
from core.patches import (PRETRAIN_DIR, UnpreprocessedWarning, _fps_torch, copy_scales, cut_patches,
                          farthest_point_sample, fps_start, knn_indices, load_cloud, load_grid, load_pretrain,
                          looks_unpreprocessed, nearest_source_indices, neighbour_sigma, normalize_patches,
                          patch_count, plan_grid_jobs, plan_pretrain_jobs, pretrain_arrays, resize_nearest)
from utils.io import DataError, read_xyz, write_png, write_xyz

# The parity README's "Patch cutting: RNG stream" table: (file, N, P, start position).
RNG_TABLE = [
    ("train/good/xyz/000.tiff", 13638, 273, 12314), ("train/good/xyz/001.tiff", 13025, 260, 4014),
    ("train/good/xyz/002.tiff", 12948, 259, 9101), ("train/good/xyz/003.tiff", 13644, 273, 9744),
    ("train/good/xyz/004.tiff", 14315, 286, 9843), ("train/good/xyz/005.tiff", 14076, 282, 4947),
    ("train/good/xyz/006.tiff", 13521, 270, 184), ("train/good/xyz/007.tiff", 12368, 247, 5543),
    ("test/bump/xyz/000.tiff", 12266, 245, 8259), ("test/crack/xyz/000.tiff", 14783, 296, 8705),
    ("test/dent/xyz/000.tiff", 13003, 260, 8075), ("test/good/xyz/000.tiff", 12773, 255, 9389),
    ("test/good/xyz/001.tiff", 14557, 291, 12157), ("test/stain/xyz/000.tiff", 12954, 259, 2253),
    ("validation/good/xyz/000.tiff", 13536, 271, 2854), ("validation/good/xyz/001.tiff", 12351, 247, 6305),
]


# ----------------------------------------------------------------------------- helpers
def surface_cloud(size: int = IMAGE_SIZE, radius: float = 0.12, seed: int = 0, full: bool = False) -> np.ndarray:
    """A bumpy cap over a disc of ``radius`` (fraction of the image side), zero elsewhere;
    ``full``: a tilted plane covering every pixel (an unpreprocessed-looking cloud)."""
    rng = np.random.default_rng(seed)
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    if full:
        z = 0.4 + 0.05 * u + 0.02 * v
    else:
        z = 0.38 - 0.01 * np.cos(9 * u + seed) * np.sin(7 * v) + 1e-4 * rng.standard_normal(u.shape)
    xyz = np.stack([u * z + 0.3, v * z + 0.3, z], axis=-1).astype(np.float32)
    if not full:
        xyz[u ** 2 + v ** 2 >= radius ** 2] = 0
    return xyz


def write_tiny_dataset(root: Path, cls: str = "bagel", n_train: int = 3, n_val: int = 1, radius: float = 0.12,
                       few_points: bool = False) -> Path:
    """MVTec layout with train/validation/test(good, crack) clouds from :func:`surface_cloud`."""
    plan = [("train", "good", n_train), ("validation", "good", n_val), ("test", "good", 1), ("test", "crack", 1)]
    seed = 0
    for split, defect, n in plan:
        for i in range(n):
            folder = root / cls / split / defect
            xyz = surface_cloud(radius=0.01 if few_points and seed == 1 else radius, seed=seed)
            seed += 1
            write_xyz(folder / "xyz" / f"{i:03d}.tiff", xyz)
            write_png(folder / "rgb" / f"{i:03d}.png", np.zeros(xyz.shape, np.uint8))
            if split == "test":
                write_png(folder / "gt" / f"{i:03d}.png", np.zeros(xyz.shape[:2], np.uint8))
    return root


def brute_fps(points: np.ndarray, count: int, start: int) -> list[int]:
    """Farthest point sampling in plain Python, float32 scalar arithmetic."""
    dist = [np.float32(1e10)] * len(points)
    out, far = [], start
    for _ in range(count):
        out.append(far)
        cx, cy, cz = points[far]
        for i, (x, y, z) in enumerate(points):
            d = (x - cx) * (x - cx) + (y - cy) * (y - cy) + (z - cz) * (z - cz)
            if d < dist[i]:
                dist[i] = d
        far = 0
        for i in range(1, len(points)):
            if dist[i] > dist[far]:
                far = i
    return out


def arrays_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def load_all(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- 3.1 loading
def test_nearest_rule_equals_torch_interpolate():
    for size in list(range(100, 224, 7)) + list(range(224, 1601)):
        src = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)   # float32 clouds: float32 scale
        ref = torch.nn.functional.interpolate(src, size=(IMAGE_SIZE, 1), mode="nearest").view(-1).long().numpy()
        assert np.array_equal(nearest_source_indices(size), ref), size
    shortcut = np.arange(IMAGE_SIZE) * 454 // IMAGE_SIZE          # the integer rule the SPEC warns about
    assert not np.array_equal(nearest_source_indices(454), shortcut)
    assert np.array_equal(nearest_source_indices(800), np.arange(IMAGE_SIZE) * 800 // IMAGE_SIZE)


def test_resize_nearest_equals_torch_on_rectangular_cloud():
    xyz = np.random.default_rng(0).standard_normal((457, 310, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(xyz).permute(2, 0, 1)[None], size=(224, 224),
                                          mode="nearest")[0].permute(1, 2, 0).numpy()
    assert np.array_equal(resize_nearest(xyz), ref)


def test_load_cloud_follows_the_reference_steps(parity_dir):
    path = parity_dir / "preprocessed" / "torus" / "test" / "crack" / "xyz" / "000.tiff"
    points, pixel_idx, unpreprocessed = load_cloud(path)
    grid = torch.nn.functional.interpolate(torch.from_numpy(read_xyz(path)).permute(2, 0, 1)[None],
                                           size=(224, 224), mode="nearest")[0].permute(1, 2, 0).numpy()
    flat = grid.reshape(-1, 3)
    idx = np.nonzero(np.all(flat != 0, axis=1))[0]
    pc = flat[idx]
    low = pc.min(axis=0)
    expected = (pc - low) / (pc[:, 0].max() - low[0])
    assert np.array_equal(pixel_idx, idx) and pixel_idx.dtype == np.int64
    assert np.array_equal(points, expected) and points.dtype == np.float32
    assert len(points) == 14783 and not unpreprocessed


def test_unpreprocessed_detection(parity_dir):
    raw = read_xyz(parity_dir / "raw" / "torus" / "train" / "good" / "xyz" / "000.tiff")
    done = read_xyz(parity_dir / "preprocessed" / "torus" / "train" / "good" / "xyz" / "000.tiff")
    assert looks_unpreprocessed(raw) and not looks_unpreprocessed(done)
    border_only = np.zeros((200, 200, 3), np.float32)
    border_only[:10] = 1.0                                         # 5 % valid pixels, all on the border
    assert looks_unpreprocessed(border_only)


# ----------------------------------------------------------------------------- 3.2 grouping
def test_patch_count_uses_python_rounding():
    assert patch_count(13625) == 272 and patch_count(13675) == 274   # 272.5 and 273.5: ties to even
    assert patch_count(13625, 5) == 136 and patch_count(1000, 10, 100) == 100
    for _, n, p, _ in RNG_TABLE:
        assert patch_count(n) == p


@pytest.mark.parametrize("kind", ["random", "grid"])
def test_fps_equals_brute_force(kind):
    rng = np.random.default_rng(1)
    if kind == "random":
        points = rng.random((220, 3)).astype(np.float32)
    else:  # integer grid: many exactly equal distances, so the first-index rule matters
        points = np.stack(np.meshgrid(np.arange(6), np.arange(5), np.arange(5)), -1).reshape(-1, 3).astype(np.float32)
    expected = brute_fps(points, 40, 7)
    tensor = torch.from_numpy(points)
    assert farthest_point_sample(tensor, 40, 7).tolist() == expected
    assert _fps_torch(tensor.t().contiguous(), 40, 7).tolist() == expected


def test_knn_equals_brute_force():
    rng = np.random.default_rng(2)
    points = rng.random((1500, 3)).astype(np.float32)
    centres = rng.choice(1500, 23, replace=False)
    dist = ((points[centres][:, None] - points[None]) ** 2).sum(-1)
    assert (np.diff(np.sort(dist, axis=1)[:, :101], axis=1) > 0).all()   # no ties: the order is unique
    expected = np.argsort(dist, axis=1, kind="stable")[:, :100]
    for chunk in (None, 5):
        got = knn_indices(torch.from_numpy(points), torch.from_numpy(centres), 100, chunk).numpy()
        assert np.array_equal(got, expected)


def test_knn_with_ties_keeps_the_reference_argsort():
    points = np.stack(np.meshgrid(np.arange(12), np.arange(12), np.arange(4)), -1).reshape(-1, 3).astype(np.float32)
    centres = np.array([0, 17, 300, 575])
    tensor = torch.from_numpy(points)
    got = knn_indices(tensor, torch.from_numpy(centres), 50, chunk=3).numpy()
    dist = ((points[centres][:, None] - points[None]) ** 2).sum(-1)
    reference = torch.from_numpy(dist).argsort(dim=-1)[:, :50].numpy()   # the reference's full argsort
    assert np.array_equal(got, reference)
    assert np.array_equal(np.take_along_axis(dist, got, 1), np.sort(dist, axis=1)[:, :50])
    assert np.array_equal(got[:, 0], centres)


def test_fps_start_replays_the_reference_stream():
    assert [fps_start(0, i, n) for i, (_, n, _, _) in enumerate(RNG_TABLE)] == [s for *_, s in RNG_TABLE]
    gen = torch.Generator().manual_seed(3)
    sizes = np.random.default_rng(0).integers(500, 60000, 4000)
    sequential = [int(torch.randint(0, int(n), (1,), generator=gen)) for n in sizes]
    for i in (0, 1, 2, 1000, 3999):
        assert fps_start(3, i, int(sizes[i])) == sequential[i]
    assert fps_start(4, 5, 1000) != fps_start(3, 5, 1000)


def test_jobs_follow_the_reference_order(parity_dir, tmp_path):
    root = parity_dir / "preprocessed"
    jobs = plan_grid_jobs(root, tmp_path)
    assert [j.source for j in jobs] == [root / "torus" / f for f, *_ in RNG_TABLE[:14]]
    assert [j.draw for j in jobs] == list(range(14))
    assert jobs[8].target == tmp_path / "torus" / "test" / "bump" / "npz" / "000.npz"
    with_val = plan_grid_jobs(root, tmp_path, ["torus"], validation=True)
    assert [j.draw for j in with_val] == list(range(16))
    assert with_val[15].target == tmp_path / "torus" / "validation" / "good" / "npz" / "001.npz"


# ----------------------------------------------------------------------------- parity with the authors' grids
@pytest.fixture(scope="module")
def parity_grids(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grids")
    report = cut_patches(parity_dir / "preprocessed", out, seed=0, device="cpu", progress=False)
    assert report.written == 14 and report.skipped == 0 and not report.unpreprocessed
    return out


def test_grids_equal_the_reference_exactly(parity_dir, parity_grids):
    """The central acceptance: with seed 0 every array equals the authors' output bit for bit
    (values, order, dtypes, keys; the tie order of their argsort included)."""
    reference = sorted((parity_dir / "grids").rglob("*.npz"))
    ours = sorted(parity_grids.rglob("*.npz"))
    assert [p.relative_to(parity_grids) for p in ours] == [p.relative_to(parity_dir / "grids") for p in reference]
    for ref_path in reference:
        ours_path = parity_grids / ref_path.relative_to(parity_dir / "grids")
        assert arrays_equal(load_all(ours_path), load_all(ref_path)), ref_path
        pts, idx = load_grid(ours_path)
        assert pts.dtype == np.float32 and idx.dtype == np.int64


def test_grid_contents(parity_dir, parity_grids):
    for rel, n, p, start in RNG_TABLE[:14]:
        source = parity_dir / "preprocessed" / "torus" / rel
        points, pixel_idx, _ = load_cloud(source)
        split, defect = Path(rel).parts[:2]
        pts, idx = load_grid(parity_grids / "torus" / split / defect / "npz" / f"{Path(rel).stem}.npz")
        assert pts.shape == (p, 500, 3) and len(points) == n
        position = np.full(IMAGE_SIZE * IMAGE_SIZE, -1)
        position[pixel_idx] = np.arange(n)
        assert (position[idx] >= 0).all()                          # every index is a foreground pixel ...
        assert np.array_equal(pts, points[position[idx]])          # ... and holds that pixel's point
        assert np.array_equal(np.unique(idx), pixel_idx)           # every foreground pixel is covered
        assert idx[0, 0] == pixel_idx[start]                       # the first centre is the replayed start
        assert len(np.unique(idx[:, 0])) == p                      # distinct centres, each first in its patch
        assert all(len(np.unique(row)) == 500 for row in idx[:20])


# ----------------------------------------------------------------------------- errors, warnings, skipping
def test_too_few_points_is_an_error_naming_the_file(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", few_points=True)
    with pytest.raises(DataError, match=re.escape(str(root / "bagel" / "train" / "good" / "xyz" / "001.tiff"))
                       + ".*fewer than the 500 points"):
        cut_patches(root, tmp_path / "grids", progress=False)


def test_unpreprocessed_input_warns(tmp_path):
    root = tmp_path / "ds"
    write_xyz(root / "bagel" / "train" / "good" / "xyz" / "000.tiff", surface_cloud(full=True))
    write_png(root / "bagel" / "train" / "good" / "rgb" / "000.png", np.zeros((224, 224, 3), np.uint8))
    write_xyz(root / "bagel" / "test" / "good" / "xyz" / "000.tiff", surface_cloud(full=True))
    write_png(root / "bagel" / "test" / "good" / "rgb" / "000.png", np.zeros((224, 224, 3), np.uint8))
    with pytest.warns(UnpreprocessedWarning, match="tools/preprocessing.py"):
        report = cut_patches(root, tmp_path / "grids", point_num=5000, group_mul=1, progress=False)
    assert report.unpreprocessed == [root / "bagel" / s / "good" / "xyz" / "000.tiff" for s in ("train", "test")]
    assert report.results[0].n_points == 224 * 224 and report.results[0].n_patches == 10


def test_existing_files_are_kept_and_recomputed_identically(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    grids = tmp_path / "grids"
    first = cut_patches(root, grids, seed=5, progress=False)
    files = sorted(grids.rglob("*.npz"))
    assert first.written == 5 and len(files) == 5                  # 3 train + 2 test, validation skipped
    before = {f: load_all(f) for f in files}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    second = cut_patches(root, grids, seed=5, progress=False)
    assert second.written == 1 and second.skipped == 4
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[1])
    assert arrays_equal(load_all(files[1]), before[files[1]])       # same draw position -> same patches
    third = cut_patches(root, grids, seed=6, overwrite=True, progress=False)
    assert third.written == 5
    assert not np.array_equal(load_all(files[0])["points_idx"][0], before[files[0]]["points_idx"][0])


# ----------------------------------------------------------------------------- 3.4 normalisation
def test_normalize_patches_is_bit_identical_to_the_reference_numpy(parity_dir):
    patches = np.load(parity_dir / "grids" / "torus" / "train" / "good" / "npz" / "000.npz")["points_gt"]

    def reference(p):
        rx, ry, rz = (np.max(p[:, a]) - np.min(p[:, a]) for a in range(3))
        e = rx if rx > ry else ry
        e = rz if e < rz else e
        s = 10 / (10 * e)
        return p * s - np.mean(p * s, axis=0)

    ours = normalize_patches(torch.from_numpy(patches)).numpy()
    assert np.array_equal(ours, np.stack([reference(p) for p in patches]))


# ----------------------------------------------------------------------------- 3.5 pretraining data
@pytest.fixture(scope="module")
def few_patches(parity_dir):
    with np.load(parity_dir / "grids" / "torus" / "train" / "good" / "npz" / "003.npz") as data:
        return np.ascontiguousarray(data["points_gt"][::50])      # 6 patches


def test_sigma_is_the_51st_neighbour_distance(few_patches):
    sigma = neighbour_sigma(few_patches)
    per_patch = np.stack([cKDTree(p).query(p, 51)[0][:, -1] for p in few_patches])
    assert sigma.shape == (6, 500) and np.array_equal(sigma, per_patch)
    brute = np.sqrt(np.sort(((few_patches[:, :, None].astype(np.float64) - few_patches[:, None]) ** 2).sum(-1),
                            axis=2)[:, :, 50])
    np.testing.assert_allclose(sigma, brute, rtol=1e-12)


def test_pretrain_arrays(few_patches):
    out = pretrain_arrays(few_patches, np.random.default_rng(7), chunk=4)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "samples_all": ((6, 10000, 3), np.float32), "points_all": ((6, 10000, 3), np.float32),
        "origins_all": ((6, 500, 3), np.float32)}
    assert np.array_equal(out["origins_all"], few_patches)
    assert list(copy_scales()) == [0.5] * 13 + [1.0] * 7

    # the queries: the reference's per-patch, per-copy recipe with the same noise stream, sigma recomputed per copy
    rng = np.random.default_rng(7)
    surfaces = normalize_patches(torch.from_numpy(few_patches)).numpy()
    for g, patch in enumerate(few_patches):
        tree = cKDTree(patch)
        copies = [patch + scale * tree.query(patch, 51)[0][:, -1][:, None] * rng.standard_normal((500, 3))
                  for scale in [0.5] * 13 + [1.0] * 7]
        rx, ry, rz = patch.max(axis=0) - patch.min(axis=0)
        e = rx if rx > ry else ry
        e = rz if e < rz else e
        s = 10 / (10 * e)
        centre = np.mean(patch * s, axis=0)
        assert np.array_equal(out["samples_all"][g], (np.concatenate(copies) * s - centre).astype(np.float32))

        # every target is the nearest normalised patch point of its query (brute force, float64)
        queries, targets = out["samples_all"][g, ::4].astype(np.float64), out["points_all"][g, ::4]
        dist = np.sqrt((((queries[:, None] - surfaces[g][None].astype(np.float64)) ** 2).sum(-1)))
        to_target = np.sqrt(((queries - targets) ** 2).sum(-1))
        assert (((targets[:, None] - surfaces[g][None]) ** 2).sum(-1).min(axis=1) == 0).all()
        np.testing.assert_allclose(to_target, dist.min(axis=1), rtol=1e-6, atol=1e-7)

    again = pretrain_arrays(few_patches, np.random.default_rng(7), chunk=64)
    assert arrays_equal(out, again)                                # blocks do not change the result


def test_pretrain_files(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_train=2)
    grids = tmp_path / "grids"
    report = cut_patches(root, grids, pretrain=True, seed=1, progress=False)
    files = sorted((grids / PRETRAIN_DIR / "bagel").glob("*.npz"))
    assert [f.name for f in files] == ["000.npz", "001.npz"] and report.written == 2
    for result in report.results:
        data = load_all(result.target)
        g = patch_count(result.n_points, 5)
        assert result.n_patches == g
        assert {k: (v.shape, v.dtype) for k, v in data.items()} == {
            "samples_all": ((g, 10000, 3), np.float32), "points_all": ((g, 10000, 3), np.float32),
            "origins_all": ((g, 500, 3), np.float32)}
        samples, targets = load_pretrain(result.target)
        assert np.array_equal(samples, data["samples_all"]) and np.array_equal(targets, data["points_all"])

    jobs = plan_pretrain_jobs(root, grids, seed=4, clouds=1)
    names = ["000", "001"]
    assert [j.target.stem for j in jobs] == random.Random(4).sample(names, 1)
    (grids / PRETRAIN_DIR / "bagel" / "017.npz").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="--overwrite"):
        cut_patches(root, grids, pretrain=True, seed=1, progress=False)
    cut_patches(root, grids, pretrain=True, seed=1, overwrite=True, progress=False)
    assert not (grids / PRETRAIN_DIR / "bagel" / "017.npz").exists()
