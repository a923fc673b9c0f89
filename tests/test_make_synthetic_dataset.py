"""CLI tests of tools/make_synthetic_dataset.py (run as a user would, from the repository root)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from core.dataset import list_samples
from tools.synthetic.mvtec import render_sample
from utils.io import read_gray, read_xyz


def _run(repo_dir, *args):
    return subprocess.run([sys.executable, "tools/make_synthetic_dataset.py", *map(str, args)], cwd=repo_dir,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_data_set(repo_dir, tmp_path):
    out = tmp_path / "data"
    args = [out, "--classes", "carrot", "--n_train", 1, "--n_val", 1, "--n_test_good", 1, "--n-test-defect", 1,
            "--size", 72, "--seed", 4, "--defects", "hole,contamination", "cut", "--quiet"]
    res = _run(repo_dir, *args)
    assert res.returncode == 0, res.stderr
    test = list_samples(out, "carrot", "test")
    assert [s.name for s in test] == ["carrot/test/contamination/000", "carrot/test/cut/000",
                                      "carrot/test/good/000", "carrot/test/hole/000"]
    assert [s.name for s in list_samples(out, "carrot", "validation")] == ["carrot/validation/good/000"]
    ref = render_sample("carrot", "test", "cut", 0, size=72, seed=4)
    assert np.array_equal(read_xyz(test[1].xyz), ref.xyz) and np.array_equal(read_gray(test[1].gt), ref.gt)

    # a rerun with other settings is refused and names the folder; --overwrite replaces it
    res = _run(repo_dir, *args[:-1], "--seed", 5, "--quiet")
    assert res.returncode == 2 and "carrot: already exists" in res.stderr
    res = _run(repo_dir, *args, "--seed", 5, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not np.array_equal(read_xyz(test[1].xyz), ref.xyz)


def test_cli_unknown_class_is_a_clear_error(repo_dir, tmp_path):
    res = _run(repo_dir, tmp_path / "data", "--classes", "bagel", "pretzel", "--size", 64)
    assert res.returncode == 2
    assert "unknown class 'pretzel'" in res.stderr and "bagel" in res.stderr and "potato" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()


def test_cli_size_h_w(repo_dir, tmp_path):
    out = tmp_path / "data"
    res = _run(repo_dir, out, "--classes", "cookie", "--n_train", 1, "--n_val", 0, "--n_test_good", 1,
               "--n_test_defect", 1, "--defects", "stain", "--size", 90, 120, "--quiet")
    assert res.returncode == 0, res.stderr
    for s in list_samples(out, "cookie", "test"):
        assert read_xyz(s.xyz).shape == (90, 120, 3) and read_gray(s.gt).shape == (90, 120)
    res = _run(repo_dir, tmp_path / "other", "--size", 90, 120, 130)
    assert res.returncode == 2 and "--size" in res.stderr and "Traceback" not in res.stderr
