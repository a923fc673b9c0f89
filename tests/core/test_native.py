"""core.native: native frames from the manifest, the raw data set or neither; maps and gt in them (SPEC 9.2)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from core.dataset import list_samples
from core.native import (FRAME_MIXED, FRAME_PREPROCESSED, FRAME_RAW, FROM_MANIFEST, FROM_NONE, FROM_RAW,
                         NativeFrame, class_frame, native_gt, native_metrics, resolve_frames, to_native)
from core.preprocessing import MANIFEST, preprocess_dataset
from tests import official_evaluation as official
from tools.synthetic.mvtec import generate_dataset
from utils.errors import DataError
from utils.io import read_gray, read_rgb, read_xyz, write_png, write_xyz

RAW_SHAPE = (200, 170)   # pads to 200 x 200: 15 columns left and right


def test_to_native_upsamples_to_the_preprocessed_size_then_crops():
    m = np.zeros((224, 224), np.float32)
    m[100:124, 50:60] = 1.0
    m[0, 0] = 3.0      # in the padding: cropped away
    frame = NativeFrame((400, 400), ((35, 35), (15, 15)), FROM_MANIFEST)
    out = to_native(m, frame)
    full = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(400, 400), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    assert out.shape == frame.shape == (330, 370) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, full[35:365, 15:385])
    assert out.max() == 1.0
    # no padding: the plain upsampling (what --save_maps wrote before native frames)
    none = NativeFrame((400, 448), ((0, 0), (0, 0)), FROM_NONE)
    assert none.frame == FRAME_PREPROCESSED and frame.frame == FRAME_RAW
    np.testing.assert_array_equal(to_native(m, none), torch.nn.functional.interpolate(
        torch.from_numpy(m)[None, None], size=(400, 448), mode="bilinear", align_corners=False)[0, 0].numpy())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A raw data set cropped to 200 x 170 (every xyz/rgb/gt file alike), preprocessed by
    tools/preprocessing.py (with its manifest) and a copy of that without the manifest."""
    base = tmp_path_factory.mktemp("native")
    raw = generate_dataset(base / "raw", classes=("bagel",), n_train=1, n_val=0, n_test_good=1, n_test_defect=1,
                           defects=("stain",), size=200, seed=3, progress=False)
    for path in raw.rglob("*"):
        if path.suffix == ".tiff":
            write_xyz(path, read_xyz(path)[:, 10:180])
        elif path.suffix == ".png":
            read = read_gray if path.parent.name == "gt" else read_rgb
            write_png(path, read(path)[:, 10:180])
    summary = preprocess_dataset(raw, base / "pre", seed=0, progress=False)
    assert summary.ok, summary.report()
    elsewhere = base / "pre_elsewhere"
    shutil.copytree(base / "pre", elsewhere)
    (elsewhere / MANIFEST).unlink()
    return raw, base / "pre", elsewhere


def test_frames_from_the_manifest_and_the_raw_data_set(datasets):
    raw, pre, elsewhere = datasets
    for root, raw_root, source in ((pre, None, FROM_MANIFEST), (elsewhere, raw, FROM_RAW), (pre, raw, FROM_MANIFEST)):
        test = list_samples(root, "bagel", "test")
        frames = resolve_frames(test, raw_root)
        assert [f.source for f in frames] == [source] * 2 and class_frame(frames) == FRAME_RAW
        for s, f in zip(test, frames):
            assert f.size == (200, 200) and f.padding == ((0, 0), (15, 15)) and f.shape == RAW_SHAPE
            raw_gt = read_gray(raw / s.cls / s.split / s.defect / "gt" / f"{s.stem}.png")
            gt = native_gt(s, f)
            assert gt.dtype == bool and np.array_equal(gt, raw_gt != 0)   # the cropped gt is the raw gt
            assert gt.any() == (s.defect != "good")


def test_frames_without_raw_sizes_stay_preprocessed(datasets):
    _, _, elsewhere = datasets
    test = list_samples(elsewhere, "bagel", "test")
    frames = resolve_frames(test)
    assert [f.source for f in frames] == [FROM_NONE] * 2 and class_frame(frames) == FRAME_PREPROCESSED
    assert all(f.shape == (200, 200) for f in frames)
    assert class_frame([frames[0], resolve_frames(list_samples(datasets[1], "bagel", "test"))[0]]) == FRAME_MIXED
    good = [s for s in test if s.defect == "good"][0]
    assert not native_gt(good, frames[test.index(good)]).any()


def test_wrong_raw_data_set_is_a_clear_error(datasets, tmp_path):
    raw, pre, elsewhere = datasets
    test = list_samples(elsewhere, "bagel", "test")
    with pytest.raises(DataError, match=r"not found; --raw_datasets_path must be the raw data set"):
        resolve_frames(test, tmp_path)
    # a raw data set of other sizes: 200 x 180 pads to 200 x 200 too, but is not this sample's raw size
    other = tmp_path / "other"
    shutil.copytree(raw, other)
    for path in other.rglob("*.tiff"):
        write_xyz(path, np.ones((200, 180, 3), np.float32))
    with pytest.raises(DataError, match=r"records 200x170 for it"):
        resolve_frames(list_samples(pre, "bagel", "test"), other)
    for path in other.rglob("*.tiff"):
        write_xyz(path, np.ones((300, 170, 3), np.float32))
    with pytest.raises(DataError, match=r"a raw sample of 300x170 pads to 300x300 .*not to the 200x200"):
        resolve_frames(test, other)


def test_a_manifest_that_does_not_match_the_file_is_an_error(datasets, tmp_path):
    _, pre, _ = datasets
    copy = tmp_path / "pre"
    shutil.copytree(pre, copy)
    text = (copy / MANIFEST).read_text()
    assert text.count('"raw_shape": [200, 170]') == 6      # commit and done record of 3 samples
    (copy / MANIFEST).write_text(text.replace('"raw_shape": [200, 170]', '"raw_shape": [200, 180]'))
    with pytest.raises(DataError, match=r"a raw sample of 200x180 .*file changed after preprocessing"):
        resolve_frames(list_samples(copy, "bagel", "test"))


def test_native_metrics_equal_the_official_evaluation(datasets):
    """native_metrics on made-up 224 maps = the official transcription on the same maps at the raw
    size against the raw gt PNGs."""
    raw, pre, _ = datasets
    test = list_samples(pre, "bagel", "test")
    frames = resolve_frames(test)
    rng = np.random.default_rng(0)
    maps = {m: rng.random((len(test), 224, 224)).astype(np.float32) for m in ("RGB", "RGB_SDF")}
    got = native_metrics(test, frames, maps)
    gts = [read_gray(raw / s.cls / s.split / s.defect / "gt" / f"{s.stem}.png") for s in test]
    for method, stack in maps.items():
        natives = [to_native(m, f) for m, f in zip(stack, frames)]
        assert [n.shape for n in natives] == [g.shape for g in gts] == [RAW_SHAPE] * 2
        want = official.evaluate(gts, natives)
        for limit, value in want["au_pro"].items():
            assert got[method]["au_pro"][limit] == pytest.approx(value, abs=1e-12)
        assert got[method]["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-12)
        assert got[method]["image_auroc"] == want["image_auroc"]
