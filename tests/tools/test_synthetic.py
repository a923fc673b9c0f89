"""Tests of the synthetic MVTec 3D-AD generator (tools/synthetic/mvtec.py; layout of SPEC 1)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from core.preprocessing import preprocess_dataset
from tools.synthetic import mvtec as synthetic
from core.dataset import defect_types, find_classes, list_samples, valid_mask
from tools.synthetic.mvtec import (CLASSES, DEFAULT_SHAPES, DEFECTS, FAMILIES, MARKER, NOISE_SIGMA,
                                   SyntheticConfigError, default_shape, family_of, generate_dataset, image_shape,
                                   render_sample)
from utils.errors import DataError
from utils.io import read_gray, read_rgb, read_xyz

SIZE = 160


def _pair(cls: str, defect: str, index: int = 0, size: int = SIZE, seed: int = 0):
    return (render_sample(cls, "test", defect, index, size=size, seed=seed),
            render_sample(cls, "test", defect, index, size=size, seed=seed, with_defect=False))


def _plane_fit(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares plane (unit normal n, offset d: n.p + d = 0) of (N, 3) points."""
    centre = points.mean(0)
    normal = np.linalg.svd(points - centre, full_matrices=False)[2][2]
    return normal, -float(normal @ centre)


# ----------------------------------------------------------------------------- names
def test_class_families():
    assert family_of("bagel") == "torus" and family_of("cookie") == "disc" and family_of("potato") == "blob"
    assert all(family_of(f) == f for f in FAMILIES)
    for cls in ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire"):
        assert family_of(cls) in FAMILIES
    with pytest.raises(SyntheticConfigError, match=r"unknown class 'pretzel'.*bagel.*potato"):
        family_of("pretzel")
    assert issubclass(SyntheticConfigError, DataError)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SyntheticConfigError, match="unknown defect type 'scratch'.*dent"):
        render_sample("bagel", "test", "scratch", 0, size=SIZE)
    with pytest.raises(SyntheticConfigError, match="only 'good'"):
        render_sample("bagel", "train", "dent", 0, size=SIZE)
    with pytest.raises(SyntheticConfigError, match="unknown class"):
        generate_dataset(tmp_path / "d", classes=["bagel", "pretzel"], size=SIZE, progress=False)
    with pytest.raises(SyntheticConfigError, match="not a defect type"):
        generate_dataset(tmp_path / "d", defects=["good"], size=SIZE, progress=False)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- one sample
@pytest.mark.parametrize("cls", ["bagel", "cookie", "potato"])
def test_sample_arrays_and_scene(cls):
    s = render_sample(cls, "train", "good", 3, size=SIZE, seed=5)
    assert s.xyz.shape == (SIZE, SIZE, 3) and s.xyz.dtype == np.float32
    assert s.rgb.shape == (SIZE, SIZE, 3) and s.rgb.dtype == np.uint8
    assert s.gt.shape == (SIZE, SIZE) and s.gt.dtype == np.uint8 and not s.gt.any()

    # invalid pixels are exactly (0, 0, 0); the masks split the valid pixels into plane and object
    valid = valid_mask(s.xyz)
    assert np.all(s.xyz[~valid] == 0)
    assert np.array_equal(s.object_mask | s.plane_mask, valid) and not (s.object_mask & s.plane_mask).any()
    assert 0.002 < (~valid).mean() < 0.05
    assert (~valid & ndimage.binary_erosion(s.object_mask | ~valid, iterations=3)).any()  # dropouts on the object
    assert (~valid & ~ndimage.binary_dilation(s.object_mask, iterations=3)).any()  # and on the plane

    # scale of a structured-light sensor ~0.4 m away (as in the parity fixture's generator)
    z = s.xyz[valid, 2]
    assert 0.35 < z.min() and z.max() < 0.42
    assert 0.055 < np.abs(s.xyz[valid, :2]).max() < 0.075

    # background plane: tilted a few degrees, sub-millimetre noise, matches the reported plane
    normal, d = _plane_fit(s.xyz[s.plane_mask].astype(np.float64))
    tilt = np.degrees(np.arccos(abs(normal[2])))
    assert 1.3 < tilt < 4.2
    resid = s.xyz[s.plane_mask].astype(np.float64) @ normal + d
    assert resid.std() < 1.2 * NOISE_SIGMA
    assert abs(abs(normal @ s.plane[:3]) - 1) < 1e-6
    plane_dist = np.abs(s.xyz.astype(np.float64) @ s.plane[:3] + s.plane[3])
    assert plane_dist[s.plane_mask].max() < 6 * NOISE_SIGMA

    # object: well above the 5 mm plane-removal threshold (SPEC 2.1), one connected piece, 20-35 % of the image
    assert plane_dist[s.object_mask].min() > 0.0058 and plane_dist[s.object_mask].max() > 0.01
    assert 0.2 < s.object_mask.mean() < 0.35
    labels, n = ndimage.label(s.object_mask, structure=np.ones((3, 3)))
    assert np.bincount(labels.ravel())[1:].max() > 0.99 * s.object_mask.sum()

    # object texture distinct from the background
    obj_rgb, bg_rgb = s.rgb[s.object_mask].mean(0), s.rgb[s.plane_mask].mean(0)
    assert np.abs(obj_rgb - bg_rgb).max() > 30


def test_plane_removal_keeps_exactly_the_object():
    """SPEC 2.1 steps 1-3 with a least-squares plane on the border strips keep exactly the object pixels."""
    for cls in ("tire", "foam", "carrot"):
        s = render_sample(cls, "test", "good", 1, size=400, seed=2)
        border = np.ones((400, 400), bool)
        border[10:-10, 10:-10] = False
        normal, d = _plane_fit(s.xyz[border & valid_mask(s.xyz)].astype(np.float64))
        keep = valid_mask(s.xyz) & (np.abs(s.xyz.astype(np.float64) @ normal + d) >= 0.005)
        assert np.array_equal(keep, s.object_mask), cls


def test_scale_matches_parity_generator(parity_dir):
    """Same physical scene scale as the reference team's generator (parity fixture, raw torus)."""
    ref = read_xyz(parity_dir / "raw" / "torus" / "train" / "good" / "xyz" / "000.tiff")
    ref_pre = read_xyz(parity_dir / "preprocessed" / "torus" / "train" / "good" / "xyz" / "000.tiff")
    s = render_sample("torus", "train", "good", 0, size=400, seed=0)
    for a, b in ((ref, s.xyz), (ref_pre, s.xyz * s.object_mask[..., None])):
        va, vb = valid_mask(a), valid_mask(b)
        assert abs(va.mean() - vb.mean()) < 0.06
        for k in range(3):
            assert abs(np.median(a[va, k]) - np.median(b[vb, k])) < 0.02
            assert abs(np.ptp(a[va, k]) - np.ptp(b[vb, k])) < 0.3 * np.ptp(a[va, k]) + 0.005


@pytest.mark.parametrize("shape", [(200, 170), (170, 240), (330, 370)])
def test_non_square_samples_keep_the_border_clear_for_the_plane_fit(shape):
    """H x W images: the object stays out of the 10-pixel border strips and the SPEC 2.1 plane
    removal with a plane fitted on those strips keeps exactly the object (as at 400 x 400)."""
    h, w = shape
    border = np.ones(shape, bool)
    border[10:-10, 10:-10] = False
    for cls, index in (("rope", 0), ("cookie", 1), ("potato", 2)):
        s = render_sample(cls, "test", "dent", index, size=shape, seed=4)
        assert s.xyz.shape == (h, w, 3) and s.rgb.shape == (h, w, 3) and s.gt.shape == shape and s.gt.any()
        assert not (s.object_mask & border).any() and not (s.gt.astype(bool) & border).any()
        normal, d = _plane_fit(s.xyz[border & valid_mask(s.xyz)].astype(np.float64))
        keep = valid_mask(s.xyz) & (np.abs(s.xyz.astype(np.float64) @ normal + d) >= 0.005)
        assert np.array_equal(keep, s.object_mask), (cls, shape)
        assert abs(abs(normal @ s.plane[:3]) - 1) < 1e-5


def test_square_sizes_and_the_non_square_default():
    """One side and (side, side) render the same; rope's default is not square, nor multiples of 100;
    the other classes keep 400 x 400, so their data sets are unchanged."""
    a = render_sample("cookie", "test", "stain", 0, size=120, seed=2)
    b = render_sample("cookie", "test", "stain", 0, size=(120, 120), seed=2)
    assert a.xyz.tobytes() == b.xyz.tobytes() and a.rgb.tobytes() == b.rgb.tobytes()
    assert default_shape("rope") == DEFAULT_SHAPES["rope"] == (330, 370)
    assert all(v % 100 for v in default_shape("rope"))
    assert all(default_shape(c) == (400, 400) for c in CLASSES if c not in DEFAULT_SHAPES)
    assert render_sample("rope", "train", "good", 0).xyz.shape == (330, 370, 3)
    assert image_shape(96) == image_shape([96]) == (96, 96) and image_shape((80, 90)) == (80, 90)
    for bad in ((80, 90, 100), (63, 80), (80.5, 90), ()):
        with pytest.raises(SyntheticConfigError, match="--size"):
            image_shape(bad)


def test_generated_data_sets_use_each_class_default(tmp_path):
    out = generate_dataset(tmp_path / "d", classes=["rope", "tire"], n_train=1, n_val=0, n_test_good=1,
                           n_test_defect=0, seed=1, progress=False)
    assert read_xyz(out / "rope" / "train" / "good" / "xyz" / "000.tiff").shape == (330, 370, 3)
    assert read_gray(out / "rope" / "test" / "good" / "gt" / "000.png").shape == (330, 370)
    assert read_xyz(out / "tire" / "test" / "good" / "xyz" / "000.tiff").shape == (400, 400, 3)
    assert '"size": [330, 370]' in (out / "rope" / MARKER).read_text()
    assert '"size": 400' in (out / "tire" / MARKER).read_text()     # square: one number, as before
    out2 = generate_dataset(tmp_path / "e", classes=["rope"], n_train=1, n_val=0, n_test_good=0, n_test_defect=0,
                            size=(90, 120), seed=1, progress=False)
    assert read_xyz(out2 / "rope" / "train" / "good" / "xyz" / "000.tiff").shape == (90, 120, 3)


def test_size_800():
    s = render_sample("cookie", "test", "crack", 0, size=800, seed=1)
    small = render_sample("cookie", "test", "crack", 0, size=400, seed=1)
    assert s.xyz.shape == (800, 800, 3) and s.rgb.shape == (800, 800, 3) and s.gt.shape == (800, 800)
    # the same scene at twice the resolution: same extent, same coverage, same defect area
    assert abs(s.object_mask.mean() - small.object_mask.mean()) < 0.01
    assert abs((s.gt > 0).sum() / 4 - (small.gt > 0).sum()) < 0.2 * (small.gt > 0).sum()
    assert abs(np.abs(s.xyz[..., 0]).max() - np.abs(small.xyz[..., 0]).max()) < 0.002


# ----------------------------------------------------------------------------- defects
def _gt_area_mm2(sample) -> float:
    pitch_mm = 1000 * float(np.median(sample.xyz[valid_mask(sample.xyz), 2])) / (3.0 * sample.gt.shape[0])
    return (sample.gt > 0).sum() * pitch_mm**2


@pytest.mark.parametrize("defect", [d for d, kind in DEFECTS.items() if kind != "colour"])
@pytest.mark.parametrize("cls", ["bagel", "cookie", "potato"])
def test_geometric_defect_changes_z_exactly_on_its_mask(cls, defect):
    bad, good = _pair(cls, defect, index=1)
    mask = bad.gt > 0
    assert set(np.unique(bad.gt)) == {0, 255} and not good.gt.any()
    assert _gt_area_mm2(bad) > 8
    # defects only on the object, never on the plane
    assert not (mask & (bad.plane_mask | good.plane_mask)).any()
    assert np.array_equal(valid_mask(bad.xyz), valid_mask(good.xyz))  # same dropouts
    both = valid_mask(bad.xyz) & mask
    assert both.sum() > 0.9 * mask.sum()
    dz = np.abs(bad.xyz[..., 2].astype(np.float64) - good.xyz[..., 2])
    assert dz[both].min() > 3 * NOISE_SIGMA  # every defect pixel moved by more than the noise
    assert dz[both].max() > 0.002  # millimetres deep / high
    assert np.array_equal(bad.xyz[~mask], good.xyz[~mask])  # and nothing else moved
    changed = np.any(bad.rgb != good.rgb, axis=-1)
    assert not (changed & ~ndimage.binary_dilation(mask)).any()  # shading changes next to the defect at most
    if DEFECTS[defect] == "combined":  # the colour changes on every defect pixel too
        assert changed[mask].all()


@pytest.mark.parametrize("defect", [d for d, kind in DEFECTS.items() if kind == "colour"])
@pytest.mark.parametrize("cls", ["bagel", "foam", "peach"])
def test_colour_defect_changes_colour_exactly_on_its_mask(cls, defect):
    bad, good = _pair(cls, defect, index=2)
    mask = bad.gt > 0
    assert _gt_area_mm2(bad) > 8
    assert np.array_equal(bad.xyz, good.xyz)
    assert not (mask & bad.plane_mask).any() and mask[bad.object_mask].any()
    diff = np.abs(bad.rgb.astype(int) - good.rgb.astype(int)).max(axis=-1)
    assert np.array_equal(diff > 0, mask)
    assert np.median(diff[mask]) > 40  # a clearly different colour


def test_defect_samples_differ_from_each_other_and_have_own_masks():
    masks = [render_sample("bagel", "test", "dent", i, size=SIZE).gt for i in range(3)]
    assert all(m.any() for m in masks) and not np.array_equal(masks[0], masks[1])


# ----------------------------------------------------------------------------- determinism
def test_determinism():
    a = render_sample("potato", "test", "crack", 4, size=SIZE, seed=7)
    b = render_sample("potato", "test", "crack", 4, size=SIZE, seed=7)
    for name in ("xyz", "rgb", "gt", "object_mask", "plane_mask", "plane"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    other_seed = render_sample("potato", "test", "crack", 4, size=SIZE, seed=8)
    other_index = render_sample("potato", "test", "crack", 5, size=SIZE, seed=7)
    other_split = render_sample("potato", "train", "good", 4, size=SIZE, seed=7)
    for other in (other_seed, other_index, other_split):
        assert not np.array_equal(a.xyz, other.xyz) and not np.array_equal(a.rgb, other.rgb)


def test_normal_samples_vary():
    samples = [render_sample("cookie", "train", "good", i, size=SIZE) for i in range(4)]
    coverage = [s.object_mask.mean() for s in samples]
    heights = [np.ptp(s.xyz[s.object_mask, 2]) for s in samples]
    assert np.ptp(coverage) > 0.01 and np.ptp(heights) > 0.001


# ----------------------------------------------------------------------------- data set
def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_generate_dataset_layout_and_contents(tmp_path):
    out = generate_dataset(tmp_path / "data", classes=["bagel", "potato"], n_train=2, n_val=1, n_test_good=2,
                           n_test_defect=1, size=96, seed=3, defects=["dent", "stain"], progress=False)
    expected = set()
    for cls in ("bagel", "potato"):
        expected.add(f"{cls}/.synthetic.json")
        for folder, n, gt in (("train/good", 2, False), ("validation/good", 1, False), ("test/good", 2, True),
                              ("test/dent", 1, True), ("test/stain", 1, True)):
            for i in range(n):
                expected |= {f"{cls}/{folder}/rgb/{i:03d}.png", f"{cls}/{folder}/xyz/{i:03d}.tiff"}
                expected |= {f"{cls}/{folder}/gt/{i:03d}.png"} if gt else set()
    assert _tree(out) == expected  # exact layout, no staging leftovers
    assert find_classes(out) == ["bagel", "potato"] and defect_types(out, "bagel") == ["dent", "good", "stain"]
    for split in ("train", "validation", "test"):
        for sample in list_samples(out, "potato", split):
            ref = render_sample("potato", split, sample.defect, int(sample.stem), size=96, seed=3)
            assert np.array_equal(read_xyz(sample.xyz), ref.xyz)
            assert np.array_equal(read_rgb(sample.rgb), ref.rgb)
            if split == "test":
                gt = read_gray(sample.gt)
                assert np.array_equal(gt, ref.gt) and set(np.unique(gt)) <= {0, 255}
                assert gt.any() == (sample.defect != "good")


def test_generate_dataset_reruns_and_workers(tmp_path):
    kwargs = dict(classes=["cookie"], n_train=3, n_val=0, n_test_good=1, n_test_defect=1, size=80, seed=1,
                  defects=["crack"], progress=False)
    first = generate_dataset(tmp_path / "a", **kwargs)
    files = {p: (first / p).read_bytes() for p in _tree(first)}
    assert not (first / "cookie" / "validation").exists()  # a split with count 0 gets no folder
    # parallel workers write byte-identical files
    second = generate_dataset(tmp_path / "b", workers=2, **kwargs)
    assert {p: (second / p).read_bytes() for p in _tree(second)} == files
    # same settings: the finished class is kept as it is
    mtimes = {p: (first / p).stat().st_mtime_ns for p in files}
    generate_dataset(tmp_path / "a", **kwargs)
    assert {p: (first / p).stat().st_mtime_ns for p in files} == mtimes
    # other settings: refused without overwrite, replaced completely with it
    with pytest.raises(DataError, match=r"cookie: already exists.*overwrite"):
        generate_dataset(tmp_path / "a", **{**kwargs, "n_train": 2})
    assert {p: (first / p).read_bytes() for p in _tree(first)} == files
    generate_dataset(tmp_path / "a", overwrite=True, **{**kwargs, "n_train": 2})
    tree = _tree(first)
    assert "cookie/train/good/rgb/002.png" not in tree and "cookie/train/good/rgb/001.png" in tree
    assert [p.name for p in first.iterdir()] == ["cookie"]


def test_interrupted_generation_leaves_no_class_folder(tmp_path, monkeypatch):
    calls = []

    def failing(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    real = synthetic._write_sample
    monkeypatch.setattr(synthetic, "_write_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "d", classes=["tire"], n_train=4, size=64, progress=False)
    assert list((tmp_path / "d").iterdir()) == []


def test_every_class_renders():
    for cls in CLASSES:
        s = render_sample(cls, "test", "bump", 0, size=96)
        assert s.gt.any() and 0.15 < s.object_mask.mean() < 0.4, cls


def test_background_removed_equals_the_preprocessing_output(tmp_path):
    """The generator's preprocessed mode writes exactly what tools/preprocessing.py makes of its raw output."""
    kw = dict(classes=["bagel", "potato"], n_train=2, n_val=0, n_test_good=1, n_test_defect=1,
              defects=["crack", "stain"], size=400, seed=3, progress=False)
    raw = synthetic.generate_dataset(tmp_path / "raw", **kw)
    summary = preprocess_dataset(raw, tmp_path / "pre", progress=False)
    assert summary.ok and len(summary.processed) == 10
    direct = synthetic.generate_dataset(tmp_path / "direct", background_removed=True, **kw)
    files = sorted(p.relative_to(direct) for p in direct.rglob("*.*") if not p.name.startswith("."))
    assert len(files) == 26 and files == sorted(p.relative_to(tmp_path / "pre") for p in (tmp_path / "pre").rglob("*.*")
                                                if not p.name.startswith("."))
    for f in files:
        read = read_xyz if f.suffix == ".tiff" else read_rgb
        assert np.array_equal(read(direct / f), read(tmp_path / "pre" / f)), f
    assert (read_xyz(direct / files[-1]) == 0).all(axis=-1).mean() > 0.5      # the plane is gone
