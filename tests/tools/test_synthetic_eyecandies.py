"""The synthetic Eyecandies release (tools/synthetic/eyecandies.py): the release's files and conventions."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy import ndimage

from tools.synthetic import eyecandies
from tools.synthetic.eyecandies import render_eyecandies
from tools.synthetic.mvtec import SyntheticConfig, SyntheticConfigError
from utils.io import read_gray, read_png16, read_rgb

SIZE = 96
ITEMS = sorted([f"image_{k}.png" for k in range(6)] + ["depth.png", "info_depth.yaml", "normals.png", "pose.txt",
                                                       "metadata.yaml", "bumps_mask.png", "dents_mask.png",
                                                       "colors_mask.png", "normals_mask.png", "mask.png"])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    cfg = SyntheticConfig(root, classes=["Lollipop"], n_train=2, n_val=1, n_test_good=3, n_test_defect=1,
                          size=SIZE, defects=["dent", "stain"], format="eyecandies")
    eyecandies.generate(cfg, progress=False)
    return root / "Lollipop"


def test_files_of_the_release(release):
    ids = {split: sorted({p.name.split("_")[0] for p in (release / split / "data").iterdir()})
           for split in ("train", "val", "test_public")}
    assert ids == {"train": ["000", "001"], "val": ["000"], "test_public": ["00", "01", "02", "03", "04"]}
    for split, split_ids in ids.items():
        for i in split_ids:
            assert sorted(p.name[len(i) + 1:] for p in (release / split / "data").glob(f"{i}_*")) == ITEMS
    data = release / "train" / "data"
    depth = read_png16(data / "000_depth.png")
    info = yaml.safe_load((data / "000_info_depth.yaml").read_text())["normalization"]
    gen = render_eyecandies("Lollipop", "train", "good", 0, SIZE)
    assert depth.min() == 0 and depth.max() == 65535
    assert (info["min"], info["max"]) == (gen.depth.min(), gen.depth.max())
    assert np.abs(depth / 65535 * (info["max"] - info["min"]) + info["min"] - gen.depth).max() \
        <= (info["max"] - info["min"]) / 65535 / 2 * (1 + 1e-9)
    pose = np.loadtxt(data / "000_pose.txt")
    assert pose.shape == (4, 4) and np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3))
    normals = read_rgb(data / "000_normals.png").astype(float) / 127.5 - 1
    flat = ~ndimage.binary_dilation(gen.object_mask, iterations=2)
    assert np.abs(normals[flat] - [0, 0, 1]).max() < 0.02     # the table faces the camera
    assert normals[gen.object_mask][:, 2].min() < 0.9         # the object's flanks do not


def test_masks_by_defect_kind():
    for defect, types in (("dent", {"dents"}), ("hole", {"dents"}), ("bump", {"bumps"}), ("stain", {"colors"}),
                          ("contamination", {"colors"}), ("crack", {"dents", "colors"}), ("cut", {"dents", "colors"})):
        s = render_eyecandies("GummyBear", "test_public", defect, 0, SIZE)
        assert {t for t in ("bumps", "dents", "colors", "normals") if s.masks[t].any()} == types, defect
        union = np.any([s.masks[t] > 0 for t in ("bumps", "dents", "colors", "normals")], axis=0)
        np.testing.assert_array_equal(s.masks["mask"] > 0, union)
        assert s.object_mask[union].all()
    assert not render_eyecandies("GummyBear", "test_public", "good", 0, SIZE).masks["mask"].any()


def test_six_lightings():
    """image_4 is lit from the left, image_2 from the right: slopes facing left are brighter in image_4."""
    s = render_eyecandies("ChocolatePraline", "train", "good", 1, SIZE)
    left, right = (s.images[4].astype(float).mean(-1), s.images[2].astype(float).mean(-1))
    gx = np.gradient(s.depth, axis=1)     # the object's left flank rises to the right: its depth falls, gx < 0
    facing_left = s.object_mask & (gx < -1e-5)
    facing_right = s.object_mask & (gx > 1e-5)
    assert (left - right)[facing_left].mean() > 10 and (right - left)[facing_right].mean() > 10
    assert len({im.tobytes() for im in s.images}) == 6


def test_bad_requests():
    with pytest.raises(SyntheticConfigError, match="even"):
        render_eyecandies("Lollipop", "train", "good", 0, 97)
    with pytest.raises(SyntheticConfigError, match="unknown Eyecandies class 'bagel'"):
        render_eyecandies("bagel", "train", "good", 0, SIZE)


def test_test_ids_interleave_good_and_anomalous(release):
    labels = [read_gray(release / "test_public" / "data" / f"{i:02d}_mask.png").any() for i in range(5)]
    assert sorted(labels) == [False] * 3 + [True] * 2 and labels != sorted(labels)
