"""tools/preprocessing.py: runs from any directory, reports failures, exit codes."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.preprocessing import MANIFEST
from tools.synthetic.mvtec import generate_dataset

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tools_preprocessing", REPO / "tools" / "preprocessing.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("cli") / "data", classes=("cookie",), n_train=2, n_val=0,
                            n_test_good=1, n_test_defect=1, defects=("dent",), size=200, seed=2, progress=False)


def test_runs_from_another_directory_and_resumes(raw, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocessing.py"), str(raw), "--output_dir",
                           str(out), "--workers", "2", "--seed", "3", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "preprocessed 4 sample(s)" in proc.stdout
    assert len((out / MANIFEST).read_text().splitlines()) == 8
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main([str(raw), "--output_dir", str(out), "--quiet"]) == 0
    assert "4 already done" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_failures_are_listed_and_exit_non_zero(raw, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(raw, data)
    bad = data / "cookie" / "train" / "good" / "xyz" / "001.tiff"
    bad.write_bytes(bad.read_bytes()[:1000])
    assert cli.main([str(data), "--quiet"]) == 1                # in place
    err = capsys.readouterr().err
    assert "preprocessed 3 sample(s)" in err and "1 FAILED" in err and f"{bad}: cannot read TIFF" in err


def test_already_preprocessed_is_refused(raw, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(raw, data)
    assert cli.main([str(data), "--quiet"]) == 0
    (data / MANIFEST).unlink()
    assert cli.main([str(data), "--quiet"]) == 2
    assert "looks already preprocessed" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path), "--workers", "0"])
    assert exc.value.code == 2
    assert cli.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_output_folder_that_is_a_file_or_read_only(raw, tmp_path, capsys, as_unprivileged):
    """Exit 2 (bad input, not 1 = "some samples failed"), a one-line message naming the folder, nothing made."""
    target = tmp_path / "out.txt"
    target.write_text("not a folder")
    assert cli.main([str(raw), "--output_dir", str(target), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {target}: --output_dir is a file, not a folder; pass a folder path " \
                                      f"to --output_dir\n"
    assert cli.main([str(raw), "--output_dir", str(target / "sub"), "--quiet"]) == 2
    assert f"{target} is a file" in capsys.readouterr().err

    locked = tmp_path / "locked"
    (locked / "data").mkdir(parents=True)
    data = locked / "data"
    shutil.copytree(raw, data, dirs_exist_ok=True)
    locked.chmod(0o555)
    data.chmod(0o555)
    try:
        for argv, needle in (([str(raw), "--output_dir", str(locked / "out")], f"{locked / 'out'}: --output_dir is "
                                                                               f"not writable by this user"),
                             ([str(data)], f"{data}: DATASET_PATH (preprocessed in place) is not writable")):
            proc = subprocess.run([*as_unprivileged, sys.executable, str(REPO / "tools" / "preprocessing.py"), *argv,
                                   "--quiet"], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in locked.iterdir()) == ["data"]
    finally:
        data.chmod(0o755)
        locked.chmod(0o755)
