"""CLI of tools/prepare_eyecandies.py (run as a user would) and make_synthetic_dataset.py --format eyecandies."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from core.dataset import list_samples
from tools.synthetic.eyecandies import render_eyecandies
from utils.io import read_xyz


def _run(repo_dir, script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=repo_dir, capture_output=True, text=True,
                          timeout=300)


def test_generate_convert_and_errors(repo_dir, tmp_path):
    raw, out = tmp_path / "release", tmp_path / "converted"
    res = _run(repo_dir, "tools/make_synthetic_dataset.py", raw, "--format", "eyecandies", "--classes", "Confetto",
               "--n_train", 2, "--n_val", 0, "--n_test_good", 1, "--n_test_defect", 1, "--defects", "bump",
               "--size", 96, "--quiet")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in raw.iterdir()) == ["Confetto"]
    res = _run(repo_dir, "tools/prepare_eyecandies.py", raw, out, "--workers", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "converted 4 sample(s)" in res.stdout and "Confetto/test/bumps: 1" in res.stdout
    assert "no val split in: Confetto" in res.stdout
    train = list_samples(out, "Confetto", "train")
    gen = render_eyecandies("Confetto", "train", "good", 1, 96)
    assert np.abs(read_xyz(train[1].xyz) - gen.xyz).max() < 1e-6

    (raw / "Confetto" / "train" / "data" / "001_info_depth.yaml").unlink()
    res = _run(repo_dir, "tools/prepare_eyecandies.py", raw, tmp_path / "other")
    assert res.returncode == 2 and "001_info_depth.yaml: missing" in res.stderr and "Traceback" not in res.stderr
    res = _run(repo_dir, "tools/prepare_eyecandies.py", raw, out, "--light", 6)
    assert res.returncode == 2 and "--light" in res.stderr
    res = _run(repo_dir, "tools/make_synthetic_dataset.py", tmp_path / "x", "--format", "eyecandies", "--size", 95)
    assert res.returncode == 2 and "even" in res.stderr
