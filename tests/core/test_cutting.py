"""Tests of core/cutting.py (SPEC 3.3, 3.5): job order, patch files, reruns, pretraining files."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.dataset import IMAGE_SIZE
from core.cutting import CutConfig, UnpreprocessedWarning, cut_patches, plan_grid_jobs, plan_pretrain_jobs
from core.grouping import load_cloud, patch_count
from core.patch_files import PRETRAIN_DIR, load_grid, load_pretrain, open_patch_manifest
from tests.core.patch_data import RNG_TABLE, arrays_equal, load_all, surface_cloud, write_tiny_dataset
from utils.errors import DataError
from utils.io import write_png, write_xyz
from utils.manifest import sha256_file

def test_jobs_follow_the_reference_order(parity_dir, tmp_path):
    root = parity_dir / "preprocessed"
    jobs = plan_grid_jobs(root, tmp_path)
    assert [j.source for j in jobs] == [root / "torus" / f for f, *_ in RNG_TABLE[:14]]
    assert [j.draw for j in jobs] == list(range(14))
    assert jobs[8].target == tmp_path / "torus" / "test" / "bump" / "npz" / "000.npz"
    with_val = plan_grid_jobs(root, tmp_path, ["torus"], validation=True)
    assert [j.draw for j in with_val] == list(range(16))
    assert with_val[15].target == tmp_path / "torus" / "validation" / "good" / "npz" / "001.npz"


@pytest.fixture(scope="module")
def parity_grids(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grids")
    report = cut_patches(CutConfig(parity_dir / "preprocessed", out, seed=0, device="cpu"), progress=False)
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


def test_too_few_points_is_an_error_naming_the_file(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", few_points=True)
    with pytest.raises(DataError, match=re.escape(str(root / "bagel" / "train" / "good" / "xyz" / "001.tiff"))
                       + ".*fewer than the 500 points"):
        cut_patches(CutConfig(root, tmp_path / "grids"), progress=False)


def _unpreprocessed_dataset(root: Path) -> Path:
    for split in ("train", "test"):
        write_xyz(root / "bagel" / split / "good" / "xyz" / "000.tiff", surface_cloud(full=True))
        write_png(root / "bagel" / split / "good" / "rgb" / "000.png", np.zeros((224, 224, 3), np.uint8))
    return root


def test_unpreprocessed_input_is_refused_before_writing(tmp_path):
    root = _unpreprocessed_dataset(tmp_path / "ds")
    source = root / "bagel" / "train" / "good" / "xyz" / "000.tiff"
    with pytest.raises(DataError, match=re.escape(str(source)) + ".*background plane.*tools/preprocessing.py"):
        cut_patches(CutConfig(root, tmp_path / "grids", point_num=5000, group_mul=1), progress=False)
    assert not [p for p in (tmp_path / "grids").rglob("*") if p.is_file()]


def test_unpreprocessed_input_allowed_warns(tmp_path):
    root = _unpreprocessed_dataset(tmp_path / "ds")
    with pytest.warns(UnpreprocessedWarning, match="--allow_unpreprocessed"):
        report = cut_patches(CutConfig(root, tmp_path / "grids", point_num=5000, group_mul=1,
                                       allow_unpreprocessed=True), progress=False)
    assert report.unpreprocessed == [root / "bagel" / s / "good" / "xyz" / "000.tiff" for s in ("train", "test")]
    assert report.results[0].n_points == 224 * 224 and report.results[0].n_patches == 10


def test_files_record_their_source_and_a_changed_source_is_recut(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    grids = tmp_path / "grids"
    cut_patches(CutConfig(root, grids, seed=5), progress=False)
    records = {k: r for k, r in open_patch_manifest(grids).records.items()}
    target = grids / "bagel" / "train" / "good" / "npz" / "001.npz"
    source = root / "bagel" / "train" / "good" / "xyz" / "001.tiff"
    assert len(records) == 5 and all(r["state"] == "done" for r in records.values())
    rec = records["bagel/train/good/npz/001.npz"]
    assert rec["source"] == dict(path=str(source.resolve()), size=source.stat().st_size,
                                 mtime_ns=source.stat().st_mtime_ns, sha256=sha256_file(source))
    assert rec["files"] == {"bagel/train/good/npz/001.npz": sha256_file(target)}
    assert sorted(load_all(target)) == ["points_gt", "points_idx"]          # the authors' keys, nothing added
    before = load_all(target)

    # a copy with a new mtime but the same bytes is unchanged; new bytes are a new source
    shutil.copyfile(source, tmp_path / "copy.tiff")
    shutil.copyfile(tmp_path / "copy.tiff", source)
    assert cut_patches(CutConfig(root, grids, seed=5), progress=False).written == 0
    write_xyz(source, surface_cloud(radius=0.1, seed=9))
    report = cut_patches(CutConfig(root, grids, seed=5), progress=False)
    assert (report.written, report.recut, report.skipped) == (1, 1, 4)
    assert [r.target for r in report.results if r.recut] == [target]
    fresh = cut_patches(CutConfig(root, tmp_path / "fresh", seed=5), progress=False)
    assert fresh.written == 5
    assert arrays_equal(load_all(target), load_all(tmp_path / "fresh" / "bagel" / "train" / "good" / "npz" / "001.npz"))
    assert not arrays_equal(load_all(target), before)
    assert open_patch_manifest(grids).records["bagel/train/good/npz/001.npz"]["source"]["sha256"] == sha256_file(source)


def test_files_without_record_are_kept_and_leftovers_removed(parity_dir, tmp_path):
    grids = tmp_path / "grids"
    shutil.copytree(parity_dir / "grids", grids)                     # the authors' files: no source records
    folder = grids / "torus" / "train" / "good" / "npz"
    leftovers = [folder / ".000.k3j_9x2a.part.npz", folder / ".001.npz.cut-tmp"]   # killed atomic write, staging
    for path in leftovers:
        path.write_bytes(b"half written")
    keep = folder / ".hidden.npz"
    keep.write_bytes(b"user file")
    before = {p: p.read_bytes() for p in grids.rglob("*") if p.is_file() and p not in leftovers}
    report = cut_patches(CutConfig(parity_dir / "preprocessed", grids, seed=0, device="cpu"), progress=False)
    assert (report.written, report.skipped, report.unrecorded) == (0, 14, 14)
    assert not any(p.exists() for p in leftovers)
    assert {p: p.read_bytes() for p in grids.rglob("*") if p.is_file()} == before   # nothing else touched


def test_interrupted_commit_is_completed(tmp_path, monkeypatch):
    import utils.manifest

    root = write_tiny_dataset(tmp_path / "ds", n_train=1, n_val=0)
    grids = tmp_path / "grids"
    renames = []

    def die_on_second(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append(dst)
        os.replace(src, dst)

    monkeypatch.setattr(utils.manifest, "_rename", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        cut_patches(CutConfig(root, grids, seed=2), progress=False)
    monkeypatch.undo()
    second = sorted(grids.rglob("*.npz"))
    assert len(second) == 1                                           # the second file is staged, not renamed
    report = cut_patches(CutConfig(root, grids, seed=2), progress=False)
    assert report.written == 1 and report.skipped == 2                # completed from its staging file, then 1 new
    assert all(r["state"] == "done" for r in open_patch_manifest(grids).records.values())
    fresh = tmp_path / "fresh"
    cut_patches(CutConfig(root, fresh, seed=2), progress=False)
    for path in fresh.rglob("*.npz"):
        assert arrays_equal(load_all(path), load_all(grids / path.relative_to(fresh)))


def test_existing_files_are_kept_and_recomputed_identically(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    grids = tmp_path / "grids"
    first = cut_patches(CutConfig(root, grids, seed=5), progress=False)
    files = sorted(grids.rglob("*.npz"))
    assert first.written == 5 and len(files) == 5                  # 3 train + 2 test, validation skipped
    before = {f: load_all(f) for f in files}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    second = cut_patches(CutConfig(root, grids, seed=5), progress=False)
    assert second.written == 1 and second.skipped == 4
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != files[1])
    assert arrays_equal(load_all(files[1]), before[files[1]])       # same draw position -> same patches
    third = cut_patches(CutConfig(root, grids, seed=6, overwrite=True), progress=False)
    assert third.written == 5
    assert not np.array_equal(load_all(files[0])["points_idx"][0], before[files[0]]["points_idx"][0])


def test_pretrain_files(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", n_train=2)
    grids = tmp_path / "grids"
    report = cut_patches(CutConfig(root, grids, pretrain=True, seed=1), progress=False)
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
        cut_patches(CutConfig(root, grids, pretrain=True, seed=1), progress=False)
    cut_patches(CutConfig(root, grids, pretrain=True, seed=1, overwrite=True), progress=False)
    assert not (grids / PRETRAIN_DIR / "bagel" / "017.npz").exists()
