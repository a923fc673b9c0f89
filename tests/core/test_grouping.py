"""Tests of core/grouping.py (SPEC 3.1, 3.2, 3.5): resize rule, FPS, kNN, RNG stream, pretraining data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from core.dataset import IMAGE_SIZE
from core.grouping import (_fps_torch, copy_scales, farthest_point_sample, fps_start, knn_indices, load_cloud,
                           looks_unpreprocessed, nearest_source_indices, neighbour_sigma, patch_count,
                           pretrain_arrays, resize_nearest)
from core.patch_files import normalize_patches
from tests.core.patch_data import RNG_TABLE, arrays_equal, brute_fps
from utils.io import read_xyz

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
