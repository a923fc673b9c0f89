"""core.clustering: the fast DBSCAN gives exactly Open3D's labels; the plane fit is seeded and deterministic."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.spatial import cKDTree

import core.clustering as clustering
from core.clustering import dbscan_labels, fit_plane, largest_cluster_mask
from tools.authors_way.preprocessing import open3d_dbscan_labels
from tools.synthetic.mvtec import render_sample

EPS, MIN_POINTS = 0.006, 30


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """Gaussian blobs of mixed density plus uniform noise, shuffled, float32 as in a tiff."""
    parts = [rng.uniform(0, 0.04, 3) + rng.normal(0, rng.uniform(0.001, 0.004), (rng.integers(20, 300), 3))
             for _ in range(rng.integers(2, 10))]
    parts.append(rng.uniform(0, 0.04, (rng.integers(0, 200), 3)))
    points = np.concatenate(parts).astype(np.float32)
    return points[rng.permutation(len(points))]


def _contested_border_points(points: np.ndarray, labels: np.ndarray, min_points: int) -> int:
    """Non-core points with core neighbours in two or more clusters (brute force)."""
    pts = points.astype(np.float64)
    nbrs = cKDTree(pts).query_ball_point(pts, EPS)
    core = np.array([len(n) >= min_points for n in nbrs])
    return sum(len({labels[j] for j in nbrs[i] if core[j]}) >= 2 for i in np.flatnonzero(~core))


def test_matches_open3d_on_random_clouds(monkeypatch):
    """Labels (numbering, noise, contested border points) identical to Open3D on 30 random clouds."""
    exact_pair_tests = []
    original = clustering._component_links
    monkeypatch.setattr(clustering, "_component_links",
                        lambda *a: exact_pair_tests.append(1) or original(*a))
    rng = np.random.default_rng(1)
    contested = noise = multi = 0
    for _ in range(30):
        points = _blobs(rng)
        min_points = int(rng.choice([5, 10, 20, 30]))
        ours = dbscan_labels(points, EPS, min_points)
        reference = open3d_dbscan_labels(points, EPS, min_points)
        np.testing.assert_array_equal(ours, reference)
        contested += _contested_border_points(points, reference, min_points)
        noise += (reference == -1).any()
        multi += reference.max() >= 1
    # the clouds exercise every rule: noise, several clusters, border points two clusters reach,
    # and the exact test between components
    assert contested >= 5 and noise >= 10 and multi >= 20 and exact_pair_tests


def test_matches_open3d_on_scan_with_plane_residue():
    """A synthetic scan whose plane was removed too thinly: object, noise and plane-residue clusters."""
    sample = render_sample("bagel", "train", "good", 1, size=160, seed=3)
    flat = sample.xyz.reshape(-1, 3)
    distance = np.abs(flat.astype(np.float64) @ sample.plane[:3] + sample.plane[3])
    points = flat[np.all(flat != 0, axis=1) & (distance >= 0.0003)]
    reference = open3d_dbscan_labels(points, EPS, MIN_POINTS)
    assert (reference == -1).sum() > 100 and len(points) > 5000
    np.testing.assert_array_equal(dbscan_labels(points, EPS, MIN_POINTS), reference)


def _sheets_and_clumps(rng: np.random.Generator, spacing: float, extent: float, n_clumps: int) -> np.ndarray:
    """Two noisy parallel sheets 8 mm apart (farther than eps, within two cubes) and small
    dense clumps 6.8-9 mm above the upper one: several large and small components side by side."""
    grid = np.arange(0, extent, spacing)
    x, y = (a.ravel() for a in np.meshgrid(grid, grid))
    sheets = [np.c_[x, y, z + rng.normal(0, 1e-4, x.size)] for z in (0.4, 0.408)]
    clumps = [np.r_[rng.uniform(0, extent, 2), 0.408 + rng.uniform(0.0068, 0.009)]
              + rng.normal(0, 2e-4, (rng.integers(25, 60), 3)) for _ in range(n_clumps)]
    points = np.concatenate(sheets + clumps).astype(np.float32)
    return points[rng.permutation(len(points))]


def test_matches_open3d_between_nearby_components():
    rng = np.random.default_rng(4)
    points = _sheets_and_clumps(rng, 0.001, 0.045, 40)
    reference = open3d_dbscan_labels(points, EPS, MIN_POINTS)
    assert reference.max() >= 3                             # both sheets and some clumps stay apart
    np.testing.assert_array_equal(dbscan_labels(points, EPS, MIN_POINTS), reference)


def test_nearby_dense_components_stay_fast():
    """Complexity guard: dense sheets whose cubes neighbour each other over their whole area
    (a quadratic cube-pair test took over a minute here; Open3D takes minutes)."""
    points = _sheets_and_clumps(np.random.default_rng(5), 0.00015, 0.03, 60)
    assert len(points) > 80_000
    start = time.perf_counter()
    labels = dbscan_labels(points, EPS, MIN_POINTS)
    assert time.perf_counter() - start < 10
    assert labels.max() >= 1 and (labels == -1).sum() < len(points) // 100


def test_neighbour_radius_is_strict_like_open3d():
    """Points exactly eps apart are not neighbours (nanoflann's strict radius test)."""
    line = np.zeros((6, 3))
    line[:, 0] = np.arange(6) * 0.5                        # spacing exactly eps = 0.5
    np.testing.assert_array_equal(dbscan_labels(line, 0.5, 2), [-1] * 6)
    np.testing.assert_array_equal(open3d_dbscan_labels(line, 0.5, 2), [-1] * 6)
    closer = line * (1 - 1e-12)
    np.testing.assert_array_equal(dbscan_labels(closer, 0.5, 2), [0] * 6)
    np.testing.assert_array_equal(open3d_dbscan_labels(closer, 0.5, 2), [0] * 6)


def test_degenerate_inputs():
    assert dbscan_labels(np.zeros((0, 3)), EPS, MIN_POINTS).shape == (0,)
    np.testing.assert_array_equal(dbscan_labels(np.ones((5, 3)), EPS, MIN_POINTS), [-1] * 5)
    same = np.ones((40, 3), np.float32)                    # duplicates: one dense cluster
    np.testing.assert_array_equal(dbscan_labels(same, EPS, MIN_POINTS), [0] * 40)


def test_largest_cluster_mask_keeps_noise_when_it_is_largest():
    """KEEP #4: the most frequent label wins even if it is noise; ties go to the smaller label."""
    labels = np.array([-1, -1, -1, 0, 0, 1, 1])
    np.testing.assert_array_equal(largest_cluster_mask(labels), labels == -1)
    np.testing.assert_array_equal(largest_cluster_mask(np.array([1, 1, 0, 0, -1])), [False, False, True, True, False])
    assert largest_cluster_mask(np.zeros(0, int)).shape == (0,)


def _cluttered_border(rng: np.random.Generator, n: int = 8000) -> tuple[np.ndarray, np.ndarray]:
    """A noisy tilted plane with 4 % clutter up to 2 cm off it, and the true plane."""
    plane = np.array([0.02, -0.03, 1.0, -0.385])
    plane /= np.linalg.norm(plane[:3])
    xy = rng.uniform(-0.06, 0.06, (n, 2))
    z = -(plane[0] * xy[:, 0] + plane[1] * xy[:, 1] + plane[3]) / plane[2] + rng.normal(0, 0.0015, n)
    z[:n // 25] += rng.uniform(0, 0.02, n // 25)
    return np.c_[xy, z].astype(np.float32), plane


def test_fit_plane_is_seeded_and_deterministic():
    """Same seed, same plane bit for bit. Open3D's RANSAC stops early from inside an OpenMP
    loop, so unpinned runs on this cloud give several different planes on a multi-core machine."""
    points, truth = _cluttered_border(np.random.default_rng(0))
    planes = {fit_plane(points, 0.004, 50, 1000, seed=0).tobytes() for _ in range(10)}
    assert len(planes) == 1
    plane = np.frombuffer(planes.pop())
    plane = plane * np.sign(plane[2])
    np.testing.assert_allclose(plane, truth, atol=2e-3)
    assert abs(np.linalg.norm(plane[:3]) - 1) < 1e-9


def test_single_openmp_thread_restores_the_thread_count():
    gomp = pytest.importorskip("ctypes").CDLL(clustering.ctypes.util.find_library("gomp") or "libgomp.so.1")
    before = gomp.omp_get_max_threads()
    with clustering._single_openmp_thread():
        assert gomp.omp_get_max_threads() == 1
    assert gomp.omp_get_max_threads() == before
