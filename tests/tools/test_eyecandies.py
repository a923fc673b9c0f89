"""The Eyecandies converter (tools/eyecandies/) on a synthetic release (tools/synthetic/eyecandies.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import utils.manifest as manifest_engine
from core.dataset import list_samples, valid_mask
from core.preprocessing import pad_widths, preprocess_dataset
from tools.eyecandies.convert import MANIFEST, TMP_SUFFIX, ConvertConfig, convert
from tools.eyecandies.release import (anomaly_type, backproject, decode_depth, discover, encode_depth, focal_length,
                                      read_depth_range)
from tools.synthetic import eyecandies
from tools.synthetic.mvtec import SyntheticConfig
from utils.errors import ConfigError, DataError
from utils.io import read_gray, read_rgb, read_xyz

SIZE = 128
DEFECTS = ["dent", "bump", "stain", "crack"]
FOLDER = {"dent": "dents", "bump": "bumps", "stain": "colors", "crack": "combined", "good": "good"}


def _tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eyecandies") / "release"
    cfg = SyntheticConfig(root, classes=["CandyCane", "ChocolateCookie"], n_train=2, n_val=1, n_test_good=2,
                          n_test_defect=1, size=SIZE, defects=DEFECTS, workers=2, format="eyecandies")
    eyecandies.generate(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    before = _tree_hash(release)
    out = tmp_path_factory.mktemp("converted") / "out"
    summary = convert(ConvertConfig(release, out, workers=2), progress=False)
    assert _tree_hash(release) == before          # RAW is only read
    return out, summary


def _generated(cls: str, split: str, sample_id: str):
    """The generator's own sample behind a release id."""
    if split == "test_public":
        defect, index = eyecandies.public_test_order(2, DEFECTS, 1, 0)[int(sample_id)]
    else:
        defect, index = "good", int(sample_id)
    return defect, eyecandies.render_eyecandies(cls, split, defect, index, SIZE, 0)


# ----------------------------------------------------------------------------- the maths
def test_depth_encoding_and_camera():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.15, 0.19, (6, 8))
    png, lo, hi = encode_depth(depth)
    assert png.dtype == np.uint16 and png.min() == 0 and png.max() == 65535
    assert np.abs(decode_depth(png, lo, hi) - depth).max() <= (hi - lo) / 65535 / 2 * (1 + 1e-9)
    xyz = backproject(depth)
    f = 711.11 * 8 / 512
    rows, cols = np.mgrid[0:6, 0:8]
    np.testing.assert_allclose(xyz[..., 0], (cols + 0.5 - 4) * depth / f, rtol=1e-6)
    np.testing.assert_allclose(xyz[..., 1], (rows + 0.5 - 3) * depth / f, rtol=1e-6)
    assert valid_mask(xyz).all() and focal_length(512) == 711.11        # no coordinate is exactly 0
    depth[1, 2], depth[2, 3] = 0.0, np.nan
    bad = backproject(depth)
    assert (bad[1, 2] == 0).all() and (bad[2, 3] == 0).all() and valid_mask(bad).sum() == 46


def test_anomaly_type_rule():
    zero, one = np.zeros((3, 3), np.uint8), np.eye(3, dtype=np.uint8) * 255
    masks = {t: zero for t in ("bumps", "dents", "colors", "normals")}
    assert anomaly_type(masks) == "good"
    assert anomaly_type({**masks, "normals": one}) == "normals"
    assert anomaly_type({**masks, "dents": one, "colors": one}) == "combined"


# ----------------------------------------------------------------------------- a converted release
def test_layout_and_summary(converted, release):
    out, summary = converted
    for cls in ("CandyCane", "ChocolateCookie"):
        assert len(list_samples(out, cls, "train")) == 2 and len(list_samples(out, cls, "validation")) == 1
        test = list_samples(out, cls, "test")
        assert sorted({s.defect for s in test}) == ["bumps", "colors", "combined", "dents", "good"]
        assert all(s.gt is not None for s in test)          # gt for every test folder, good included
        assert [s.stem for s in test if s.defect == "good"] == sorted(s.stem for s in test if s.defect == "good")
    report = summary.report()
    assert "converted 18 sample(s)" in report and "CandyCane/test/combined: 1" in report
    assert "ChocolateCookie/validation/good: 1" in report


def test_converted_xyz_equals_the_generators_cloud(converted, release):
    """To the depth quantisation: |dz| <= (max - min) / 65535 / 2 and |dx|, |dy| that times x/z, y/z."""
    out, _ = converted
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    checked = 0
    for r in (r for r in records if r["state"] == "done"):
        cls, split, sample_id = r["sample"].split("/")
        _, gen = _generated(cls, split, sample_id)
        xyz = read_xyz(out / next(f for f in r["files"] if f.endswith(".tiff")))
        data = release / cls / split / "data"
        lo, hi = read_depth_range(data / f"{sample_id}_info_depth.yaml")
        half_step = (hi - lo) / 65535 / 2
        dz = np.abs(xyz[..., 2] - gen.xyz[..., 2])
        assert dz.max() <= half_step + 2e-8, (r["sample"], dz.max(), half_step)
        ray = np.abs(gen.xyz[..., :2] / gen.xyz[..., 2:])
        assert (np.abs(xyz[..., :2] - gen.xyz[..., :2]) <= ray * half_step + 2e-8).all()
        # the camera written out independently: principal point at the image centre, pixel centres
        f = 711.11 * SIZE / 512
        cols = np.arange(SIZE)[None, :]
        np.testing.assert_allclose(gen.xyz[..., 0], (cols + 0.5 - SIZE / 2) * gen.depth / f, rtol=1e-12)
        assert valid_mask(xyz).all()
        checked += 1
    assert checked == 18


def test_masks_land_on_the_defects(converted, release):
    out, _ = converted
    for cls in ("CandyCane", "ChocolateCookie"):
        for sample in list_samples(out, cls, "test"):
            sample_id = next(p.name.split("_")[0] for p in (release / cls / "test_public" / "data").iterdir()
                             if int(p.name.split("_")[0]) == int(sample.stem))
            defect, gen = _generated(cls, "test_public", sample_id)
            assert FOLDER[defect] == sample.defect
            gt = read_gray(sample.gt)
            np.testing.assert_array_equal(gt, gen.masks["mask"])
            assert set(np.unique(gt)) <= {0, 255} and (gt.any() == (defect != "good"))
            assert gen.object_mask[gt > 0].all()                 # on the object
            np.testing.assert_array_equal(read_rgb(sample.rgb), gen.images[4])   # image_4 by default


def test_rerun_resume_and_light(converted, release, tmp_path, monkeypatch):
    out, _ = converted
    before = _tree_hash(out)
    again = convert(ConvertConfig(release, out), progress=False)
    assert sum(again.converted.values()) == 0 and again.skipped == 18 and _tree_hash(out) == before
    with pytest.raises(ConfigError, match="--light 4"):
        convert(ConvertConfig(release, out, light=0), progress=False)

    # an interrupted run: the second sample's commit stops after its first rename
    fresh = tmp_path / "fresh"
    real, calls = manifest_engine._rename, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(manifest_engine, "_rename", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertConfig(release, fresh, classes=["CandyCane"]), progress=False)
    monkeypatch.setattr(manifest_engine, "_rename", real)
    resumed = convert(ConvertConfig(release, fresh, classes=["CandyCane"], workers=2), progress=False)
    assert resumed.recovered == 1 and resumed.skipped == 1 and sum(resumed.converted.values()) == 7
    assert not [p for p in fresh.rglob(f"*{TMP_SUFFIX}")]
    assert {k: v for k, v in _tree_hash(fresh).items() if k != MANIFEST} == \
        {k: v for k, v in _tree_hash(out).items() if k.startswith("CandyCane/")}
    (fresh / "CandyCane" / "train" / "good" / "xyz" / "000.tiff").unlink()      # a lost file is converted again
    assert sum(convert(ConvertConfig(release, fresh, classes=["CandyCane"]), progress=False).converted.values()) == 1


def test_light_choice(release, tmp_path):
    out = tmp_path / "light0"
    convert(ConvertConfig(release, out, light=0, classes=["CandyCane"]), progress=False)
    _, gen = _generated("CandyCane", "train", "001")
    np.testing.assert_array_equal(read_rgb(out / "CandyCane" / "train" / "good" / "rgb" / "001.png"), gen.images[0])
    assert not np.array_equal(gen.images[0], gen.images[4])


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def broken(release, tmp_path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(release / "CandyCane", root / "CandyCane")
    return root


def test_errors_name_the_file(broken, tmp_path):
    data = broken / "CandyCane" / "train" / "data"
    (data / "001_depth.png").unlink()
    with pytest.raises(DataError, match=r"001_depth\.png: missing"):
        convert(ConvertConfig(broken, tmp_path / "o1"), progress=False)
    assert not (tmp_path / "o1").exists()                  # checked before anything is written
    shutil.copy(data / "000_depth.png", data / "001_depth.png")
    (data / "000_info_depth.yaml").write_text("normalization: [1, 2\n")
    with pytest.raises(DataError, match=r"000_info_depth\.yaml: not valid YAML"):
        convert(ConvertConfig(broken, tmp_path / "o2"), progress=False)
    (data / "000_info_depth.yaml").write_text("normalization: {low: 0.1}\n")
    with pytest.raises(DataError, match=r"000_info_depth\.yaml: expected 'normalization"):
        convert(ConvertConfig(broken, tmp_path / "o3"), progress=False)
    shutil.copy(data / "001_info_depth.yaml", data / "000_info_depth.yaml")
    Image.new("RGB", (SIZE // 2, SIZE)).save(data / "000_image_4.png")
    with pytest.raises(DataError, match=r"000_image_4\.png: 64x128 pixels, but the depth map"):
        convert(ConvertConfig(broken, tmp_path / "o4"), progress=False)
    with pytest.raises(DataError, match="one class folder"):
        discover(broken / "CandyCane")
    with pytest.raises(DataError, match="neither"):
        convert(ConvertConfig(broken, broken / "inside"), progress=False)
    shutil.copy(data / "001_image_4.png", data / "000_image_4.png")
    public = broken / "CandyCane" / "test_public" / "data"
    good = next(p.name[:2] for p in sorted(public.glob("*_mask.png")) if p.name[3:] == "mask.png"
                and not read_gray(p).any())
    Image.new("L", (SIZE, SIZE), 255).save(public / f"{good}_mask.png")
    with pytest.raises(DataError, match=rf"{good}_mask\.png: marks anomalous pixels, but every type mask"):
        convert(ConvertConfig(broken, tmp_path / "o5"), progress=False)
    (broken / "CandyCane" / "test_public" / "data" / "00_dents_mask.png").unlink()
    with pytest.raises(DataError, match=r"00_dents_mask\.png: missing"):
        discover(broken)


def test_test_private_is_skipped_and_reported(broken, tmp_path):
    private = broken / "CandyCane" / "test_private" / "data"
    private.mkdir(parents=True)
    for p in (broken / "CandyCane" / "test_public" / "data").glob("0[01]_*"):
        if "mask" not in p.name and "metadata" not in p.name:
            shutil.copy(p, private / p.name)
    summary = convert(ConvertConfig(broken, tmp_path / "out"), progress=False)
    assert summary.private == {"CandyCane": 2}
    assert "skipped test_private (no ground truth): CandyCane 2" in summary.report()
    assert not (tmp_path / "out" / "CandyCane" / "test_private").exists()


def test_workers_give_the_same_bytes(release, converted, tmp_path):
    out, _ = converted
    one = tmp_path / "one"
    convert(ConvertConfig(release, one, workers=1), progress=False)
    drop = {MANIFEST}
    assert {k: v for k, v in _tree_hash(one).items() if k not in drop} == \
        {k: v for k, v in _tree_hash(out).items() if k not in drop}


# ----------------------------------------------------------------------------- background removal
def test_plane_and_largest_cluster_remove_exactly_the_background(converted, tmp_path):
    """tools/preprocessing.py on the converted set: every object pixel kept, every background
    pixel removed, against the generator's object mask."""
    out, _ = converted
    summary = preprocess_dataset(out, tmp_path / "pre", workers=2, progress=False)
    assert summary.ok and summary.multi_cluster == 0
    (top, _), (left, _) = pad_widths(SIZE, SIZE)
    kept = removed = n_obj = n_bg = 0
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    for r in (r for r in records if r["state"] == "done"):
        cls, split, sample_id = r["sample"].split("/")
        _, gen = _generated(cls, split, sample_id)
        pre = read_xyz(tmp_path / "pre" / next(f for f in r["files"] if f.endswith(".tiff")))
        valid = valid_mask(pre[top:top + SIZE, left:left + SIZE])
        kept += (valid & gen.object_mask).sum()
        removed += (~valid & ~gen.object_mask).sum()
        n_obj, n_bg = n_obj + gen.object_mask.sum(), n_bg + (~gen.object_mask).sum()
    assert kept / n_obj >= 0.999 and removed / n_bg >= 0.999, (kept / n_obj, removed / n_bg)
