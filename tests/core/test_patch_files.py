"""Tests of core/patch_files.py (SPEC 3.3, 3.4): loading grid files and the per-patch normalisation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from core.patch_files import (load_grid, normalize_patches, open_patch_manifest, source_changed, source_record,
                              stale_patch_file)
from utils.errors import DataError
from utils.io import save_npz
from utils.manifest import sha256_file


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


def test_load_grid_checks_shapes_and_point_count(tmp_path, parity_dir):
    pts, idx = load_grid(parity_dir / "grids" / "torus" / "train" / "good" / "npz" / "000.npz")
    assert pts.shape == (273, 500, 3) and pts.dtype == np.float32 and idx.shape == (273, 500) and idx.dtype == np.int64
    bad = tmp_path / "bad.npz"
    save_npz(bad, points_gt=np.zeros((4, 500, 2), np.float32), points_idx=np.zeros((4, 500), np.int64))
    with pytest.raises(DataError, match=r"bad\.npz: expected points_gt \(G, K, 3\)"):
        load_grid(bad)
    with pytest.raises(DataError, match="hold 500 points, expected 400"):
        load_grid(parity_dir / "grids" / "torus" / "train" / "good" / "npz" / "000.npz", point_num=400)


def test_source_records_tell_a_changed_source_from_a_copy(tmp_path):
    src = tmp_path / "000.tiff"
    src.write_bytes(b"cloud v1")
    record = source_record(src)
    assert record == dict(path=str(src.resolve()), size=8, mtime_ns=src.stat().st_mtime_ns,
                          sha256=sha256_file(src))
    assert not source_changed(record, src)
    os.utime(src, ns=(1, 1))                                   # touched or copied: same bytes
    assert not source_changed(record, src)
    src.write_bytes(b"cloud v2")                               # same size, new bytes
    assert source_changed(record, src)
    src.write_bytes(b"cloud v10")                              # new size: no hash needed
    assert source_changed(record, src)

    grid = tmp_path / "grid"
    npz = grid / "c" / "train" / "good" / "npz" / "000.npz"
    npz.parent.mkdir(parents=True)
    npz.write_bytes(b"patches")
    manifest = open_patch_manifest(grid)
    assert stale_patch_file(manifest, npz, src) is None        # no record: cut elsewhere, accepted
    key = "c/train/good/npz/000.npz"
    manifest.append(dict(sample=key, state="commit", files={key: "x"}, source=source_record(src)))
    assert stale_patch_file(open_patch_manifest(grid), npz, src) == f"{npz}: its writing was interrupted"
    manifest.append(dict(sample=key, state="done", files={key: "x"}, source=source_record(src)))
    assert stale_patch_file(open_patch_manifest(grid), npz, src) is None
    src.write_bytes(b"cloud v11")
    assert stale_patch_file(open_patch_manifest(grid, repair=False), npz, src) == \
        f"{npz}: cut from {src.resolve()} before it changed (now {src})"
