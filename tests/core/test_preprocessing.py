"""core.preprocessing: SPEC 2 on one sample, and the safe, resumable data-set runner."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import core.preprocessing as prep
import utils.manifest as manifest_engine
from core.preprocessing import (MANIFEST, PreprocessingError, pad_to_square, pad_widths, preprocess_arrays,
                                preprocess_dataset)
from tools.authors_way.preprocessing import open3d_dbscan_labels
from tools.synthetic.mvtec import generate_dataset, render_sample
from utils.errors import DataError
from utils.io import read_gray, read_rgb, read_xyz, write_png, write_xyz


# ----------------------------------------------------------------------------- helpers and fixtures
def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_hash(root: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree_bytes(root).items()}


def non_square(sample, rows: slice):
    """Crop a rendered sample's arrays to a non-square window."""
    return sample.xyz[rows], sample.rgb[rows], sample.gt[rows], sample.object_mask[rows], sample.plane_mask[rows]


@pytest.fixture(scope="session")
def raw(tmp_path_factory) -> Path:
    """Five 200-px samples (train x2, validation, test good, test crack); train/001 cropped to
    150x200; extra files that preprocessing must copy."""
    root = generate_dataset(tmp_path_factory.mktemp("raw") / "data", classes=("bagel",), n_train=2, n_val=1,
                            n_test_good=1, n_test_defect=1, defects=("crack",), size=200, seed=0, progress=False)
    folder = root / "bagel" / "train" / "good"
    write_xyz(folder / "xyz" / "001.tiff", read_xyz(folder / "xyz" / "001.tiff")[20:170])
    write_png(folder / "rgb" / "001.png", read_rgb(folder / "rgb" / "001.png")[20:170])
    good_gt = root / "bagel" / "test" / "good" / "gt"
    assert (good_gt / "000.png").exists()  # a gt beside a good sample is padded too
    (root / "readme.txt").write_text("MVTec 3D-AD\n")
    (root / "bagel" / "calibration").mkdir()
    (root / "bagel" / "calibration" / "camera.json").write_text("{}\n")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)    # as a downloaded data set (atomic writers make 0600)
    return root


@pytest.fixture(scope="session")
def reference_run(raw, tmp_path_factory) -> Path:
    """An uninterrupted single-worker run into a separate output folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = preprocess_dataset(raw, out, workers=1, seed=0, progress=False)
    assert summary.ok and len(summary.processed) == 5, summary.report()
    return out


def copy_of(raw: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(raw, dst)
    return dst


# ----------------------------------------------------------------------------- one sample
def test_pad_widths_follow_spec():
    assert pad_widths(250, 310) == ((75, 75), (45, 45))        # side 400
    assert pad_widths(750, 620) == ((25, 25), (90, 90))        # SPEC example, side 800
    assert pad_widths(251, 310) == ((74, 75), (45, 45))        # smaller half first
    assert pad_widths(800, 800) == ((0, 0), (0, 0))
    assert pad_widths(801, 120) == ((49, 50), (390, 390))      # side 900
    padded = pad_to_square(np.ones((3, 5), np.uint8), multiple=4)
    assert padded.shape == (8, 8) and padded.sum() == 15 and padded[2:5, 1:6].all()


def test_sample_acceptance_on_non_square_synthetic():
    """Plane removed (>= 99 %), object kept (>= 98 %), square padding per SPEC, gt padded,
    rgb black exactly where xyz was zeroed, original colour where xyz was missing."""
    sample = render_sample("cookie", "test", "crack", 0, size=310, seed=5)
    xyz, rgb, gt, obj, plane = non_square(sample, slice(30, 280))
    assert xyz.shape[:2] == (250, 310) and gt.any()
    result = preprocess_arrays(xyz, rgb, gt, seed=0)

    assert result.xyz.shape == (400, 400, 3) and result.rgb.shape == (400, 400, 3) and result.gt.shape == (400, 400)
    assert result.xyz.dtype == np.float32 and result.rgb.dtype == np.uint8
    inner = (slice(75, 325), slice(45, 355))
    outside = np.ones((400, 400), bool)
    outside[inner] = False
    assert not result.xyz[outside].any() and not result.rgb[outside].any() and not result.gt[outside].any()
    np.testing.assert_array_equal(result.gt[inner], gt)

    out_xyz, out_rgb = result.xyz[inner], result.rgb[inner]
    kept = np.all(out_xyz != 0, axis=-1)
    assert 1 - kept[plane].mean() >= 0.99
    assert kept[obj].mean() >= 0.98
    valid_in = np.all(xyz != 0, axis=-1)
    np.testing.assert_array_equal(out_xyz[kept], xyz[kept])                # surviving points untouched
    assert not out_rgb[valid_in & ~kept].any()                            # zeroed point -> black pixel
    np.testing.assert_array_equal(out_rgb[kept], rgb[kept])
    np.testing.assert_array_equal(out_rgb[~valid_in], rgb[~valid_in])     # missing 3D keeps its colour
    assert (~valid_in).sum() > 100
    assert result.removed_plane + result.removed_cluster + result.kept == valid_in.sum()
    assert result.raw_shape == (250, 310) and result.padding == ((75, 75), (45, 45))
    assert result.stats()["raw_shape"] == [250, 310] and result.stats()["padding"] == [[75, 75], [45, 45]]


@pytest.mark.parametrize("cls", ["bagel", "cookie", "potato"])  # the three object families
def test_authors_way_gives_identical_outputs(cls):
    """Open3D cluster_dbscan on the full cloud (the reference) keeps exactly the same points."""
    sample = render_sample(cls, "test", "dent", 0, size=200, seed=1)
    ours = preprocess_arrays(sample.xyz, sample.rgb, sample.gt, seed=0)
    theirs = preprocess_arrays(sample.xyz, sample.rgb, sample.gt, seed=0, labels_fn=open3d_dbscan_labels)
    np.testing.assert_array_equal(ours.xyz, theirs.xyz)
    np.testing.assert_array_equal(ours.rgb, theirs.rgb)
    assert ours.kept > 5000


def test_noise_label_is_kept_when_it_is_the_most_frequent():
    """KEEP #4 wiring: whatever label is most frequent survives, even -1."""
    sample = render_sample("bagel", "train", "good", 0, size=200, seed=0)
    seen = {}

    def labels_fn(points, eps, min_points):
        labels = np.zeros(len(points), np.int32)
        labels[: len(points) // 2 + 1] = -1                 # noise is the majority
        labels[-10:] = 1
        seen["points"] = points
        return labels

    result = preprocess_arrays(sample.xyz, sample.rgb, seed=0, labels_fn=labels_fn)
    kept = result.xyz[np.all(result.xyz != 0, axis=-1)]
    np.testing.assert_array_equal(kept, seen["points"][: len(seen["points"]) // 2 + 1])
    assert result.kept_label == -1 and result.clusters == 2


def test_sample_failures_say_what_is_wrong():
    sample = render_sample("bagel", "train", "good", 0, size=200, seed=0)
    done = preprocess_arrays(sample.xyz, sample.rgb, seed=0)
    with pytest.raises(PreprocessingError, match=r"x\.tiff: only \d+ valid points in the 10-pixel border.*already "
                                                 r"preprocessed"):
        preprocess_arrays(done.xyz, done.rgb, seed=0, name="x.tiff")
    plane_only = sample.xyz.copy()
    plane_only[sample.object_mask] = 0
    with pytest.raises(PreprocessingError, match="y.tiff: no valid point is left after removing the background"):
        preprocess_arrays(plane_only, sample.rgb, seed=0, name="y.tiff")
    with pytest.raises(PreprocessingError, match="z.tiff: image sizes differ"):
        preprocess_arrays(sample.xyz, sample.rgb[:100], seed=0, name="z.tiff")


def test_non_finite_coordinates_are_missing_data():
    """NaN / inf coordinates become (0, 0, 0), the invalid point of MVTec 3D-AD, before the plane fit:
    the output holds no NaN, the pixels keep their colour like every invalid pixel (SPEC 2.1 step 3),
    and the result equals that of the same sample with those points zeroed by hand."""
    sample = render_sample("cookie", "train", "good", 1, size=200, seed=3)
    rng = np.random.default_rng(0)
    xyz = sample.xyz.copy()
    valid = np.flatnonzero(np.all(xyz != 0, axis=-1))
    bad = rng.choice(valid, 300, replace=False)                 # object and plane pixels, border included
    xyz.reshape(-1, 3)[bad[:100], 0] = np.nan
    xyz.reshape(-1, 3)[bad[100:200], 2] = np.inf
    xyz.reshape(-1, 3)[bad[200:]] = -np.inf
    zeroed = xyz.copy()
    zeroed[~np.isfinite(xyz).all(axis=-1)] = 0
    result = preprocess_arrays(xyz, sample.rgb, seed=0)
    expected = preprocess_arrays(zeroed, sample.rgb, seed=0)
    assert np.isfinite(result.xyz).all() and result.nonfinite == 300 and expected.nonfinite == 0
    assert result.xyz.tobytes() == expected.xyz.tobytes() and result.rgb.tobytes() == expected.rgb.tobytes()
    assert (result.rgb.reshape(-1, 3)[bad] == sample.rgb.reshape(-1, 3)[bad]).all()
    assert result.stats()["nonfinite"] == 300


def test_non_finite_points_are_counted_in_the_summary_and_manifest(raw, tmp_path):
    data = copy_of(raw, tmp_path)
    path = data / "bagel" / "train" / "good" / "xyz" / "000.tiff"
    xyz = read_xyz(path)
    xyz[50:52, 60:70] = np.nan
    write_xyz(path, xyz)
    summary = preprocess_dataset(data, tmp_path / "out", progress=False)
    assert summary.ok and summary.nonfinite == {"bagel/train/good/xyz/000.tiff": 20}
    assert "1 sample(s) had 20 point(s) with a NaN or inf coordinate" in summary.report()
    assert np.isfinite(read_xyz(tmp_path / "out" / "bagel" / "train" / "good" / "xyz" / "000.tiff")).all()
    records = [json.loads(line) for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert {r["sample"]: r["stats"]["nonfinite"] for r in records if r["state"] == "done"}["bagel/train/good/xyz/000.tiff"] == 20


def test_same_seed_same_bytes():
    sample = render_sample("cookie", "train", "good", 2, size=200, seed=0)
    a = preprocess_arrays(sample.xyz, sample.rgb, seed=7)
    b = preprocess_arrays(sample.xyz, sample.rgb, seed=7)
    assert a.xyz.tobytes() == b.xyz.tobytes() and a.rgb.tobytes() == b.rgb.tobytes()
    assert a.plane.tobytes() == b.plane.tobytes()


# ----------------------------------------------------------------------------- data set
def test_output_dir_leaves_source_untouched_and_copies_the_rest(raw, reference_run):
    before = tree_hash(raw)
    summary = preprocess_dataset(raw, reference_run, progress=False)    # rerun: nothing to do
    assert tree_hash(raw) == before
    assert summary.ok and summary.skipped == 5 and not summary.processed
    out = reference_run
    assert (out / "readme.txt").read_text() == "MVTec 3D-AD\n"
    assert (out / "bagel" / "calibration" / "camera.json").exists()
    cropped = read_xyz(out / "bagel" / "train" / "good" / "xyz" / "001.tiff")
    assert cropped.shape == (200, 200, 3) and not cropped[:25].any() and not cropped[175:].any()
    for rel in ("bagel/test/good/gt/000.png", "bagel/test/crack/gt/000.png", "bagel/validation/good/rgb/000.png"):
        assert (out / rel).exists()
    np.testing.assert_array_equal(read_gray(out / "bagel/test/crack/gt/000.png"),
                                  read_gray(raw / "bagel/test/crack/gt/000.png"))
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [r["state"] for r in records] == ["commit", "done"] * 5
    for record in records[1::2]:
        for rel, sha in record["files"].items():
            assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha
        # the raw size and padding, for main.py's native frame (SPEC 9.2)
        cropped_sample = record["sample"] == "bagel/train/good/xyz/001.tiff"
        assert record["stats"]["raw_shape"] == ([150, 200] if cropped_sample else [200, 200])
        assert record["stats"]["padding"] == ([[25, 25], [0, 0]] if cropped_sample else [[0, 0], [0, 0]])
    assert not [p for p in out.rglob("*") if p.name.endswith(prep.TMP_SUFFIX)]
    mode = (raw / "bagel/train/good/xyz/000.tiff").stat().st_mode
    assert (out / "bagel/train/good/xyz/000.tiff").stat().st_mode == mode


def test_rerun_in_place_changes_no_byte(raw, reference_run, tmp_path):
    data = copy_of(raw, tmp_path)
    assert preprocess_dataset(data, progress=False).ok
    assert tree_bytes(data) == tree_bytes(reference_run)                 # in place == output_dir
    first = tree_bytes(data)
    summary = preprocess_dataset(data, progress=False)
    assert summary.ok and summary.skipped == 5 and not summary.processed
    assert tree_bytes(data) == first


def test_workers_give_the_same_bytes(raw, reference_run, tmp_path):
    summary = preprocess_dataset(raw, tmp_path / "out", workers=2, progress=False)
    assert summary.ok and len(summary.processed) == 5
    assert tree_bytes(tmp_path / "out") == tree_bytes(reference_run)


def test_interrupted_after_k_samples_resumes_to_the_same_bytes(raw, reference_run, tmp_path, monkeypatch):
    data = copy_of(raw, tmp_path)
    calls = []
    real = prep._process_sample

    def interrupted(task):
        calls.append(task.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "_process_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(data, progress=False)
    monkeypatch.setattr(prep, "_process_sample", real)
    summary = preprocess_dataset(data, progress=False)
    assert summary.ok and summary.skipped == 2 and len(summary.processed) == 3
    assert tree_bytes(data) == tree_bytes(reference_run)


def test_interrupted_between_renames_is_rolled_forward(raw, reference_run, tmp_path, monkeypatch):
    """An in-place commit cut after renaming the tiff but before the png: the restart must
    finish it (the inputs are already modified), not reprocess it."""
    data = copy_of(raw, tmp_path)
    renames = []

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 4:                                 # sample 2: tiff renamed, png not yet
            raise KeyboardInterrupt
        Path(src).replace(dst)

    monkeypatch.setattr(manifest_engine, "_rename", rename)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(data, progress=False)
    half = Path(renames[2]).relative_to(data).as_posix()     # the tiff of the interrupted sample
    assert tree_bytes(data)[half] == tree_bytes(reference_run)[half]
    png = Path(renames[3]).relative_to(data).as_posix()
    assert tree_bytes(data)[png] != tree_bytes(reference_run)[png]
    monkeypatch.setattr(manifest_engine, "_rename", lambda src, dst: Path(src).replace(dst))
    summary = preprocess_dataset(data, progress=False)
    assert summary.ok and summary.recovered == 1 and summary.skipped == 1 and len(summary.processed) == 3
    assert tree_bytes(data) == tree_bytes(reference_run)


def test_already_preprocessed_data_set_is_refused(raw, reference_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(reference_run, data)
    (data / MANIFEST).unlink()                              # preprocessed by someone else, no manifest
    before = tree_hash(data)
    with pytest.raises(DataError, match="looks already preprocessed.*fewer than 50 valid points"):
        preprocess_dataset(data, progress=False)
    with pytest.raises(DataError, match="looks already preprocessed"):
        preprocess_dataset(data, tmp_path / "out" / "sub", progress=False)
    assert tree_hash(data) == before and not (tmp_path / "out").exists()   # a refused run leaves no folder
    with pytest.raises(DataError, match="already preprocessed"):  # a manifest marks an output root
        preprocess_dataset(reference_run, tmp_path / "out2", progress=False)
    with pytest.raises(DataError, match="neither inside"):
        preprocess_dataset(raw, raw / "bagel" / "out", progress=False)


def test_failing_samples_are_reported_and_the_run_continues(raw, tmp_path):
    data = copy_of(raw, tmp_path)
    test = data / "bagel" / "test"
    corrupt = test / "good" / "xyz" / "000.tiff"
    corrupt.write_bytes(corrupt.read_bytes()[:50_000])             # truncated download
    crack_xyz = read_xyz(test / "crack" / "xyz" / "000.tiff")
    crack_xyz[render_sample("bagel", "test", "crack", 0, size=200, seed=0).object_mask] = 0
    write_xyz(test / "crack" / "xyz" / "000.tiff", crack_xyz)      # only the plane: nothing left
    val = data / "bagel" / "validation" / "good" / "xyz" / "000.tiff"
    val_xyz = read_xyz(val)
    val_xyz[:12], val_xyz[-12:], val_xyz[:, :12], val_xyz[:, -12:] = 0, 0, 0, 0
    write_xyz(val, val_xyz)                                          # empty border
    out = tmp_path / "out"
    summary = preprocess_dataset(data, out, progress=False)
    assert not summary.ok and len(summary.processed) == 2
    messages = dict(summary.failures)
    assert "cannot read TIFF" in messages["bagel/test/good/xyz/000.tiff"]
    assert messages["bagel/test/good/xyz/000.tiff"].startswith(str(corrupt))
    assert "no valid point is left" in messages["bagel/test/crack/xyz/000.tiff"]
    assert "only 0 valid points in the 10-pixel border" in messages["bagel/validation/good/xyz/000.tiff"]
    assert "3 FAILED" in summary.report() and str(val) in summary.report()
    # nothing of a failed sample reaches the output, so it cannot pass for preprocessed
    assert not (out / "bagel" / "test" / "good" / "rgb" / "000.png").exists()
    assert not (out / "bagel" / "test" / "crack" / "gt" / "000.png").exists()
    assert (out / "bagel" / "train" / "good" / "rgb" / "001.png").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(prep.TMP_SUFFIX)]


def test_torn_manifest_line_is_dropped_and_corrupt_lines_refused(raw, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    manifest = out / MANIFEST
    good = manifest.read_text()
    manifest.write_text(good + '{"sample": "bagel/tra')           # interrupted append
    summary = preprocess_dataset(raw, out, progress=False)
    assert summary.ok and summary.skipped == 5 and manifest.read_text() == good
    manifest.write_text("garbage\n" + good)
    with pytest.raises(DataError, match="corrupt manifest line 1"):
        preprocess_dataset(raw, out, progress=False)


# ----------------------------------------------------------------------------- parity with the reference
def test_parity_with_the_reference_preprocessing(parity_dir, tmp_path):
    """Our output on the fixture's raw class equals the reference's: validity, values, PNG bytes."""
    raw = tmp_path / "raw"
    shutil.copytree(parity_dir / "raw", raw)
    summary = preprocess_dataset(raw, tmp_path / "out", progress=False)
    assert summary.ok and len(summary.processed) == 16
    reference = parity_dir / "preprocessed"
    agree = total = 0
    for ref in sorted(reference.rglob("*.tiff")):
        expected, ours = read_xyz(ref), read_xyz(tmp_path / "out" / ref.relative_to(reference))
        agree += np.count_nonzero(np.all(expected != 0, -1) == np.all(ours != 0, -1))
        total += expected.shape[0] * expected.shape[1]
        np.testing.assert_array_equal(ours, expected)
    assert agree / total == 1.0 and total == 16 * 400 * 400
    pngs = sorted(reference.rglob("*.png"))
    assert len(pngs) == 22
    for ref in pngs:
        assert (tmp_path / "out" / ref.relative_to(reference)).read_bytes() == ref.read_bytes(), ref
