"""Small synthetic clouds and data sets for the patch tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.dataset import IMAGE_SIZE
from utils.io import write_png, write_xyz

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
