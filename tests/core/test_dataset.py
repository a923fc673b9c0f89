from pathlib import Path

import numpy as np
import pytest

from core.dataset import (EYECANDIES_CLASSES, Sample, defect_types, find_classes, list_samples, load_gt_mask,
                          resolve_classes, to_unorganized, valid_mask)
from utils.errors import DataError
from utils.io import write_png, write_xyz


def _sample_files(folder: Path, stems, gt=False, size=8):
    for stem in stems:
        write_xyz(folder / "xyz" / f"{stem}.tiff", np.ones((size, size, 3), np.float32))
        write_png(folder / "rgb" / f"{stem}.png", np.zeros((size, size, 3), np.uint8))
        if gt:
            mask = np.zeros((size, size), np.uint8)
            mask[:2, :2] = 255
            write_png(folder / "gt" / f"{stem}.png", mask)


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "ds"
    for cls in ("cookie", "bagel"):
        _sample_files(root / cls / "train" / "good", ["000", "001", "002"])
        _sample_files(root / cls / "validation" / "good", ["000"])
        _sample_files(root / cls / "test" / "good", ["000", "001"], gt=True)
        _sample_files(root / cls / "test" / "crack", ["000"], gt=True)
        _sample_files(root / cls / "test" / "hole", ["000", "001"], gt=True)
    (root / "readme.txt").write_text("not a class")
    (root / "notes").mkdir()
    return root


def test_discovery_orders(tiny):
    assert find_classes(tiny) == ["bagel", "cookie"]          # MVTec order (bagel before cookie)
    assert defect_types(tiny, "bagel") == ["crack", "good", "hole"]
    assert resolve_classes(tiny) == ["bagel", "cookie"]
    assert resolve_classes(tiny, ["cookie"]) == ["cookie"]


def test_non_mvtec_classes_sorted(tmp_path):
    for cls in ("zeta", "alpha"):
        _sample_files(tmp_path / cls / "train" / "good", ["000"])
    assert find_classes(tmp_path) == ["alpha", "zeta"]


def test_mvtec_order(tmp_path):
    for cls in ("tire", "bagel", "potato", "cable_gland"):
        (tmp_path / cls / "train").mkdir(parents=True)
    assert find_classes(tmp_path) == ["bagel", "cable_gland", "potato", "tire"]


def test_eyecandies_order(tmp_path):
    for cls in ("PeppermintCandy", "Lollipop", "CandyCane", "GummyBear"):
        (tmp_path / cls / "test").mkdir(parents=True)
    assert find_classes(tmp_path) == ["CandyCane", "GummyBear", "Lollipop", "PeppermintCandy"]
    assert len(EYECANDIES_CLASSES) == 10 and EYECANDIES_CLASSES[0] == "CandyCane"
    (tmp_path / "bagel" / "train").mkdir(parents=True)           # a mixture: plain name order
    assert find_classes(tmp_path) == ["CandyCane", "GummyBear", "Lollipop", "PeppermintCandy", "bagel"]


def test_list_samples_pairs_by_stem(tiny):
    train = list_samples(tiny, "bagel", "train")
    assert [s.stem for s in train] == ["000", "001", "002"]
    assert all(s.rgb.stem == s.xyz.stem == s.stem for s in train)
    assert all(s.label == 0 for s in train)
    test = list_samples(tiny, "bagel", "test")
    assert [(s.defect, s.stem, s.label) for s in test] == [
        ("crack", "000", 1), ("good", "000", 0), ("good", "001", 0), ("hole", "000", 1), ("hole", "001", 1)]
    assert all(s.gt is not None and s.gt.stem == s.stem for s in test)
    s = test[0]
    assert s.grid_file("G") == Path("G", "bagel", "test", "crack", "npz", "000.npz")
    assert s.name == "bagel/test/crack/000"


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_classes(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        list_samples(tmp_path / "nope", "bagel", "train")


def test_missing_class_lists_found(tiny):
    with pytest.raises(DataError, match=r"class folder\(s\) \['carrot'\] not found; classes found: \['bagel', 'cookie'\]"):
        resolve_classes(tiny, ["carrot"])
    with pytest.raises(DataError, match=r"carrot: class folder not found; classes found: \['bagel', 'cookie'\]"):
        list_samples(tiny, "carrot", "train")


def test_no_classes(tmp_path):
    with pytest.raises(DataError, match="no class folders found"):
        resolve_classes(tmp_path)


def test_empty_split(tiny):
    (tiny / "bagel" / "train" / "good" / "rgb").rename(tiny / "x_rgb")
    for f in (tiny / "bagel" / "train" / "good" / "xyz").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"bagel/train/good: empty split"):
        list_samples(tiny, "bagel", "train")


def test_missing_split_folder(tiny):
    import shutil

    shutil.rmtree(tiny / "bagel" / "validation")
    with pytest.raises(DataError, match=r"bagel/validation/good: folder not found"):
        list_samples(tiny, "bagel", "validation")


def test_stem_mismatch_lists_stems(tiny):
    (tiny / "bagel" / "train" / "good" / "xyz" / "001.tiff").rename(tiny / "bagel" / "train" / "good" / "xyz" / "007.tiff")
    with pytest.raises(DataError, match=r"file stems do not match: no rgb/\*\.png for \['007'\]; "
                                        r"no xyz/\*\.tiff for \['001'\]"):
        list_samples(tiny, "bagel", "train")


def test_missing_gt_for_defect(tiny):
    (tiny / "cookie" / "test" / "hole" / "gt" / "001.png").unlink()
    with pytest.raises(DataError, match=r"cookie/test/hole: file stems do not match: no gt/\*\.png for \['001'\]"):
        list_samples(tiny, "cookie", "test")


def test_good_gt_optional(tiny):
    import shutil

    shutil.rmtree(tiny / "cookie" / "test" / "good" / "gt")
    good = [s for s in list_samples(tiny, "cookie", "test") if s.defect == "good"]
    assert len(good) == 2 and all(s.gt is None for s in good)


def test_valid_mask_rule():
    xyz = np.array([[[1, 2, 3], [0, 2, 3], [1, 0, 3], [1, 2, 0]],
                    [[0, 0, 0], [np.nan, 1, 1], [1, np.inf, 1], [-1, -2, -3]]], np.float32)
    np.testing.assert_array_equal(valid_mask(xyz), [[True, False, False, False], [False, False, False, True]])
    pts, idx = to_unorganized(xyz)
    np.testing.assert_array_equal(idx, [0, 7])
    np.testing.assert_array_equal(pts, [[1, 2, 3], [-1, -2, -3]])


def test_gt_mask_resize_pixel_centre(tmp_path):
    # 448 -> 224 nearest with PIL's pixel-centre rule samples source (2i + 1): a mask on odd rows/cols only
    mask = np.zeros((448, 448), np.uint8)
    mask[1::2, 1::2] = 255
    write_png(tmp_path / "gt.png", mask)
    s = Sample(tmp_path, "c", "test", "crack", "000", tmp_path / "x.png", tmp_path / "x.tiff", tmp_path / "gt.png")
    out = load_gt_mask(s)
    assert out.shape == (224, 224) and out.dtype == np.float32
    assert out.min() == 1.0
    good = Sample(tmp_path, "c", "test", "good", "000", tmp_path / "x.png", tmp_path / "x.tiff", tmp_path / "gt.png")
    assert load_gt_mask(good).max() == 0.0


def test_gt_mask_parity(parity_dir):
    import numpy as np

    exp = np.load(parity_dir / "expected" / "torus" / "predictions.npz")
    root = parity_dir / "preprocessed"
    samples = {f"{s.cls}/test/{s.defect}/rgb/{s.stem}.png": s for s in list_samples(root, "torus", "test")}
    for path, gt in zip(exp["sample_paths"], exp["gt"]):
        np.testing.assert_array_equal(load_gt_mask(samples[str(path)]), gt.astype(np.float32))


def test_hidden_leftovers_are_not_samples(tiny):
    # a temporary file left by an interrupted atomic write must not count as a sample
    (tiny / "bagel" / "train" / "good" / "xyz" / ".003.abcd.part.tiff").write_bytes(b"partial")
    assert [s.stem for s in list_samples(tiny, "bagel", "train")] == ["000", "001", "002"]
