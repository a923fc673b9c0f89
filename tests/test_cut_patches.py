"""Tests of the cut_patches.py command line (SPEC section 3)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cut_patches
from core.preprocessing import preprocess_dataset
from core.cutting import plan_pretrain_jobs
from core.patch_files import PRETRAIN_DIR
from tests.core.patch_data import arrays_equal, load_all, write_tiny_dataset
from tools.synthetic.mvtec import generate_dataset


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_dataset(tmp_path / "ds", n_train=3, n_val=1)


def test_default_mode_writes_the_authors_layout(tiny, tmp_path, capsys):
    grids = tmp_path / "grids"
    assert cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(grids), "--device", "cpu"]) == 0
    files = sorted(p.relative_to(grids).as_posix() for p in grids.rglob("*.npz"))
    assert files == ["bagel/test/crack/npz/000.npz", "bagel/test/good/npz/000.npz", "bagel/train/good/npz/000.npz",
                     "bagel/train/good/npz/001.npz", "bagel/train/good/npz/002.npz"]
    data = load_all(grids / files[2])
    assert sorted(data) == ["points_gt", "points_idx"] and data["points_gt"].dtype == np.float32
    assert data["points_idx"].dtype == np.int64 and data["points_gt"].shape[1:] == (500, 3)
    assert "wrote 5 patch file(s), kept 0" in capsys.readouterr().out

    assert cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(grids), "--validation"]) == 0
    assert "wrote 1 patch file(s), kept 5" in capsys.readouterr().out
    assert (grids / "bagel" / "validation" / "good" / "npz" / "000.npz").is_file()


def test_same_seed_same_arrays_for_any_worker_count(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(one), "--seed", "3"]) == 0
    assert cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(two), "--seed", "3",
                             "--workers", "2"]) == 0
    files = sorted(p.relative_to(one) for p in one.rglob("*.npz"))
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.npz")) and len(files) == 5
    assert all(arrays_equal(load_all(one / f), load_all(two / f)) for f in files)


def test_pretrain_mode(tiny, tmp_path, capsys):
    grids = tmp_path / "grids"
    with pytest.warns(UserWarning, match="--group_mul 10 is ignored"):
        rc = cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(grids), "--pretrain",
                               "--group_mul", "10", "--sample_num", "4", "--classes", "bagel"])
    assert rc == 0
    files = sorted((grids / PRETRAIN_DIR / "bagel").glob("*.npz"))
    assert [f.name for f in files] == ["000.npz", "001.npz", "002.npz"]
    data = load_all(files[0])
    g = data["origins_all"].shape[0]
    assert data["samples_all"].shape == data["points_all"].shape == (g, 4 * 500, 3)
    assert all(v.dtype == np.float32 for v in data.values())
    assert not (grids / "bagel").exists()
    assert "wrote 3 patch file(s)" in capsys.readouterr().out


def test_bad_input_exits_non_zero_naming_the_file(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "ds", few_points=True)
    rc = cut_patches.main(["--datasets_path", str(root), "--save_grid_path", str(tmp_path / "grids")])
    err = capsys.readouterr().err
    assert rc == 2 and str(root / "bagel" / "train" / "good" / "xyz" / "001.tiff") in err and "--point_num" in err
    rc = cut_patches.main(["--datasets_path", str(tmp_path / "missing"), "--save_grid_path", str(tmp_path / "g")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cut_patches.main(["--datasets_path", str(root), "--save_grid_path", str(tmp_path / "g"), "--classes", "tire"])
    assert rc == 2 and "tire" in capsys.readouterr().err


def test_pretrain_clouds_flag_limits_the_cloud_choice(tmp_path):
    root = generate_dataset(tmp_path / "ds", classes=("bagel",), n_train=4, n_val=0, n_test_good=1, n_test_defect=0,
                            size=100, seed=0, progress=False)
    stems = [j for j in plan_pretrain_jobs(root, tmp_path / "g", ["bagel"], 0, clouds=2)]
    assert len(stems) == 2
    assert len(plan_pretrain_jobs(root, tmp_path / "g", ["bagel"], 0, clouds=20)) == 4   # all when fewer
    cfg, _ = cut_patches.parse_args(["--datasets_path", "d", "--save_grid_path", "g", "--pretrain_clouds", "3"])
    assert cfg.pretrain_clouds == 3
    assert cut_patches.parse_args(["--datasets_path", "d", "--save_grid_path", "g"])[0].pretrain_clouds == 20


def test_cut_patches_bad_device_exits_2(tmp_path, capsys):
    rc = cut_patches.main(["--datasets_path", str(tmp_path), "--save_grid_path", str(tmp_path / "g"),
                           "--device", "gpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "gpu" in err and "Traceback" not in err


def test_unpreprocessed_data_is_refused_and_a_preprocessed_source_is_recut(tmp_path, capsys):
    """The issue's sequence: cutting raw data exits 2 (nothing written); cut anyway, preprocess in place,
    cut again: every file is recut, because each records the TIFF it was cut from."""
    raw = generate_dataset(tmp_path / "ds", classes=("bagel",), n_train=2, n_val=0, n_test_good=1, n_test_defect=0,
                           size=200, seed=1, progress=False)
    grids = tmp_path / "grids"
    argv = ["--datasets_path", str(raw), "--save_grid_path", str(grids), "--device", "cpu"]
    assert cut_patches.main(argv) == 2
    err = capsys.readouterr().err
    first = raw / "bagel" / "train" / "good" / "xyz" / "000.tiff"
    assert err.startswith(f"error: {first}: the cloud still seems to contain its background plane")
    assert "tools/preprocessing.py" in err and "--allow_unpreprocessed" in err and not grids.exists()

    with pytest.warns(UserWarning, match="background plane"):
        assert cut_patches.main(argv + ["--allow_unpreprocessed"]) == 0
    assert "wrote 3 patch file(s), kept 0" in capsys.readouterr().out
    assert preprocess_dataset(raw, progress=False).ok                            # in place
    assert cut_patches.main(argv) == 0
    assert "wrote 3 patch file(s) (3 recut: their source TIFF changed since they were cut), kept 0" in \
        capsys.readouterr().out
    assert cut_patches.main(argv) == 0
    assert "wrote 0 patch file(s), kept 3" in capsys.readouterr().out


def test_grid_folder_that_is_a_file_or_read_only(tiny, tmp_path, capsys, as_unprivileged):
    target = tmp_path / "grids.npz"
    target.write_bytes(b"x")
    assert cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(target)]) == 2
    assert f"error: {target}: --save_grid_path is a file, not a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = subprocess.run([*as_unprivileged, sys.executable, cut_patches.__file__, "--datasets_path", str(tiny),
                               "--save_grid_path", str(locked / "grids"), "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == f"error: {locked / 'grids'}: --save_grid_path is not writable by this user (its parent " \
                          f"{locked} is not writable); pass a folder you can write to, or fix its permissions\n"
    assert not list(locked.iterdir())


def test_classes_take_commas(tiny, tmp_path, capsys):
    cfg, _ = cut_patches.parse_args(["--datasets_path", "d", "--save_grid_path", "g", "--classes", "bagel,cookie"])
    assert cfg.classes == ["bagel", "cookie"]
    rc = cut_patches.main(["--datasets_path", str(tiny), "--save_grid_path", str(tmp_path / "g"), "--classes",
                           "bagel,tire"])
    assert rc == 2 and "['tire'] not found" in capsys.readouterr().err
