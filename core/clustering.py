"""Plane fit and DBSCAN for the preprocessing of SPEC section 2.1 (steps 2 and 5).

``dbscan_labels`` returns exactly the labels of Open3D's ``PointCloud.cluster_dbscan``
(same clusters, same numbering, same border-point assignment), many times faster.

Open3D's semantics, reproduced here:

* neighbours of a point: every point (itself included) with squared distance
  ``(dx*dx + dy*dy) + dz*dz < eps*eps`` in float64 (nanoflann's strict radius test);
* core point: at least ``min_points`` neighbours;
* clusters: connected components of core points under the neighbour relation, numbered
  0, 1, ... in the order of their lowest core-point index (Open3D starts a new cluster at the
  first unlabelled core point in index order);
* border point (not core, with a core neighbour): the lowest-numbered cluster among its
  core neighbours (the first cluster whose expansion reaches it keeps it);
* noise: ``-1``.

The speed comes from never enumerating all neighbour pairs (Open3D builds every
neighbour list, about a thousand per point on MVTec-like scans):

1. Coarse cubes of side slightly below ``eps / sqrt(3)`` (two points in one cube are always
   neighbours) and fine cubes of half that side (the 3x3x3 block of fine cubes around a
   point lies within ``eps`` of it). A point whose block holds ``min_points`` points is
   core; only the few others get an exact ``min_points``-nearest-neighbour query.
2. All core points of one coarse cube are connected. Cubes are joined when a test pair of
   core points (the one nearest each cube centre) are neighbours. Components that still own
   neighbouring cubes (offsets up to 2 cubes per axis) are then tested exactly with one
   KD-tree nearest-neighbour query per point of the smaller side.
3. Border points have fewer than ``min_points`` neighbours, all found by the query of 1.

Equality with Open3D holds except for point pairs whose distance equals ``eps`` within a
few units in the last place, where floating-point summation order could differ.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import contextlib
from typing import Iterator, Optional

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

#: grid cube side as a fraction of ``eps``: cube diagonal < eps with a safe margin
_CELL_FRACTION = (1.0 - 1e-9) / np.sqrt(3.0)
#: coarse cube offsets that can hold neighbours (within 2 cubes per axis), one of each +-pair
_OFFSETS = np.array([(i, j, k) for i in range(-2, 3) for j in range(-2, 3) for k in range(-2, 3)
                     if (i, j, k) > (0, 0, 0)], dtype=np.int64)
#: the 3x3x3 block of fine cubes around a fine cube
_BLOCK = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.int64)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances of row pairs in nanoflann's summation order ``(dx² + dy²) + dz²``."""
    d = a - b
    return (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]


def _keys(cells: np.ndarray, span: np.ndarray) -> np.ndarray:
    """One int64 key per integer cube coordinate (last axis), coordinates in ``[0, span)``."""
    return (cells[..., 0] * span[1] + cells[..., 1]) * span[2] + cells[..., 2]


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each of ``keys`` in ``sorted_keys``, ``-1`` where absent."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


def dbscan_labels(points: np.ndarray, eps: float, min_points: int) -> np.ndarray:
    """DBSCAN labels (int32, ``-1`` = noise) identical to Open3D ``cluster_dbscan(eps, min_points)``.

    ``points`` is (N, 3); coordinates are used in float64 as Open3D does.
    """
    pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
    n = len(pts)
    labels = np.full(n, -1, dtype=np.int32)
    if n == 0:
        return labels
    if not np.isfinite(pts).all():
        raise ValueError("dbscan_labels: points must be finite")
    eps2 = float(eps) * float(eps)
    side = float(eps) * _CELL_FRACTION  # coarse cube side

    # 1. core points. Fine cubes (half the coarse side): the 3x3x3 block of fine cubes around
    # a point lies within eps of it, so a block holding min_points points makes it core.
    fine = np.floor((pts - pts.min(axis=0)) / (side / 2)).astype(np.int64) + 4
    span = fine.max(axis=0) + 5
    if np.prod(span.astype(np.float64)) >= 2.0 ** 62:
        raise ValueError(f"dbscan_labels: cloud extent {np.ptp(pts, axis=0)} is too large for eps={eps}")
    fine_keys, first, fine_of, fine_count = np.unique(_keys(fine, span), return_index=True,
                                                       return_inverse=True, return_counts=True)
    block = _lookup(fine_keys, _keys(fine[first][:, None, :] + _BLOCK, span))
    block_count = np.where(block >= 0, fine_count[block], 0).sum(axis=1)
    core = block_count[fine_of] >= min_points
    sparse = np.flatnonzero(~core)
    nbr = np.empty((0, min_points), dtype=np.int64)
    nbr_ok = np.empty((0, min_points), dtype=bool)
    if len(sparse):  # exact count: the min_points nearest, then the exact strict test
        tree = cKDTree(pts, leafsize=32, balanced_tree=False, compact_nodes=False)
        _, nbr = tree.query(pts[sparse], k=min_points, distance_upper_bound=float(eps) * (1 + 1e-7))
        nbr = np.asarray(nbr, dtype=np.int64).reshape(len(sparse), min_points)
        found = nbr < n
        nbr = np.where(found, nbr, 0)
        nbr_ok = found & (_sq_dist(pts[sparse][:, None, :], pts[nbr]) < eps2)
        core[sparse[nbr_ok.sum(axis=1) >= min_points]] = True
    core_idx = np.flatnonzero(core)
    if len(core_idx) == 0:
        return labels

    # 2. components of core points, as components of the coarse cubes holding them
    cells = fine[core_idx] // 2
    ccell_keys, ccell_of = np.unique(_keys(cells, span), return_inverse=True)
    m = len(ccell_keys)
    order = np.argsort(ccell_of, kind="stable")             # core points grouped by cube
    start = np.searchsorted(ccell_of[order], np.arange(m))
    size = np.diff(np.append(start, len(order)))
    ccell_xyz = cells[order[start]]                           # integer coordinates of each cube
    cpts = pts[core_idx]

    # candidate cube pairs: each unordered pair once
    nb = _lookup(ccell_keys, _keys(ccell_xyz[:, None, :] + _OFFSETS, span))
    pair_a, pair_b = np.nonzero(nb >= 0)
    pair_b = nb[pair_a, pair_b]

    # test pair: the core point nearest each cube centre (any choice is correct; this one links most)
    centre = (ccell_xyz[ccell_of[order]] + 0.5) * side + pts.min(axis=0) - 2 * side
    to_centre = _sq_dist(cpts[order], centre)
    is_min = np.flatnonzero(to_centre == np.repeat(np.minimum.reduceat(to_centre, start), size))
    rep = order[is_min[np.searchsorted(is_min, start)]]
    linked = _sq_dist(cpts[rep[pair_a]], cpts[rep[pair_b]]) < eps2
    comp = _components(m, pair_a[linked], pair_b[linked])

    # exact test between components that still own neighbouring cubes
    todo = np.flatnonzero(comp[pair_a] != comp[pair_b])
    if len(todo):
        link_a, link_b = _component_links(cpts, order, start, size, comp, pair_a[todo], pair_b[todo], eps)
        comp = _components(int(comp.max()) + 1, link_a, link_b)[comp]

    # number clusters by their lowest point index (core points are in index order)
    core_comp = comp[ccell_of]
    first_comp, first_pos = np.unique(core_comp, return_index=True)
    rank = np.empty(len(first_comp), dtype=np.int32)
    rank[np.argsort(first_pos, kind="stable")] = np.arange(len(first_comp), dtype=np.int32)
    labels[core_idx] = rank[np.searchsorted(first_comp, core_comp)]

    # 3. border points: lowest cluster number among their core neighbours
    border = ~core[sparse]
    if border.any():
        nb_idx, nb_ok = nbr[border], nbr_ok[border] & core[nbr[border]]
        nb_label = np.where(nb_ok, labels[nb_idx], np.iinfo(np.int32).max)
        best = nb_label.min(axis=1)
        labels[sparse[border]] = np.where(nb_ok.any(axis=1), best, -1)
    return labels


def _components(m: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``m`` nodes joined by edges ``a[i] - b[i]``."""
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(m, m))
    return connected_components(graph, directed=False)[1]


def _cube_points(order: np.ndarray, start: np.ndarray, size: np.ndarray, cubes: np.ndarray) -> np.ndarray:
    """Core-point indices (into the core-point array) of the given cubes."""
    counts = size[cubes]
    first = np.repeat(start[cubes] - (np.cumsum(counts) - counts), counts)
    return order[first + np.arange(counts.sum())]


def _component_links(cpts: np.ndarray, order: np.ndarray, start: np.ndarray, size: np.ndarray, comp: np.ndarray,
                     cube_a: np.ndarray, cube_b: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of components (over the neighbouring cube pairs ``cube_a - cube_b`` of different
    components) that hold two core points closer than ``eps``.

    For every pair of components, the core points of one in those cubes are queried against a
    KD-tree of the other's core points in all cubes taking part (one tree per component,
    built for the component with more such points). Any hit is a true edge between two
    components, and every edge lies in some neighbouring cube pair, so the test is exact.
    """
    eps2 = float(eps) * float(eps)
    swap = comp[cube_a] > comp[cube_b]
    cube_a, cube_b = np.where(swap, cube_b, cube_a), np.where(swap, cube_a, cube_b)
    ca, cb = comp[cube_a], comp[cube_b]
    cubes = np.unique(np.concatenate([cube_a, cube_b]))
    weight = np.bincount(comp[cubes], weights=size[cubes], minlength=int(comp.max()) + 1)
    by_pair = np.lexsort((cb, ca))
    bounds = np.flatnonzero(np.diff(ca[by_pair]) | np.diff(cb[by_pair])) + 1
    trees: dict[int, tuple[cKDTree, np.ndarray]] = {}
    links = []
    for group in np.split(by_pair, bounds):
        c_a, c_b = int(ca[group[0]]), int(cb[group[0]])
        big, query_cubes = (c_a, cube_b[group]) if weight[c_a] >= weight[c_b] else (c_b, cube_a[group])
        if big not in trees:
            members = _cube_points(order, start, size, cubes[comp[cubes] == big])
            trees[big] = (cKDTree(cpts[members], leafsize=32, balanced_tree=False, compact_nodes=False), members)
        tree, members = trees[big]
        query = _cube_points(order, start, size, np.unique(query_cubes))
        _, nearest = tree.query(cpts[query], k=1, distance_upper_bound=float(eps) * (1 + 1e-7))
        found = nearest < len(members)
        if (_sq_dist(cpts[query[found]], cpts[members[nearest[found]]]) < eps2).any():
            links.append((c_a, c_b))
    links = np.array(links, dtype=np.int64).reshape(-1, 2)
    return links[:, 0], links[:, 1]


def largest_cluster_mask(labels: np.ndarray) -> np.ndarray:
    """Points carrying the most frequent label, ``-1`` (noise) included (SPEC 2.1 step 5, KEEP #4).

    Ties go to the smallest label, as ``np.unique`` + ``argmax`` in the reference.
    """
    if len(labels) == 0:
        return np.zeros(0, dtype=bool)
    values, counts = np.unique(labels, return_counts=True)
    return labels == values[np.argmax(counts)]


# ----------------------------------------------------------------------------- Open3D
@contextlib.contextmanager
def _single_openmp_thread() -> Iterator[None]:
    """Run Open3D's OpenMP loops on one thread inside the block.

    Open3D's RANSAC stops early from inside a parallel loop, so with several threads the
    evaluated candidates (hence the plane) depend on thread timing even with a fixed seed.
    """
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        gomp = ctypes.CDLL(name)
        before = gomp.omp_get_max_threads()
    except (OSError, AttributeError):  # no GNU OpenMP runtime: nothing to pin
        yield
        return
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(before)


def fit_plane(points: np.ndarray, distance_threshold: float, ransac_n: int, num_iterations: int,
              seed: Optional[int] = 0) -> np.ndarray:
    """RANSAC plane ``(a, b, c, d)`` (unit normal) by Open3D ``segment_plane`` (SPEC 2.1 step 2).

    Seeds Open3D's global RNG with ``seed`` and runs single-threaded, so the same seed
    gives the same plane. The caller checks ``len(points) >= ransac_n``.
    """
    import open3d as o3d  # optional heavy dependency: only the plane fit needs it (GPU images may lack it)

    if seed is not None:
        o3d.utility.random.seed(int(seed))
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    with _single_openmp_thread():
        plane, _ = cloud.segment_plane(distance_threshold=distance_threshold, ransac_n=ransac_n,
                                       num_iterations=num_iterations)
    return np.asarray(plane, dtype=np.float64)
