"""core/preflight.py (SPEC 5.2): every input of a main.py run is checked before any work.

The failing cases through main.py (exit 2, no model loaded) are in tests/test_main.py.
"""
from __future__ import annotations

import shutil

import pytest

from core.memory import MissingGridError
from core.preflight import check_run_inputs


def test_the_parity_inputs_pass_and_nothing_is_written(parity_dir, tmp_path):
    check_run_inputs(parity_dir / "preprocessed", parity_dir / "grids", ["torus"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_grid_folder_lists_every_missing_file_per_folder(parity_dir, tmp_path):
    with pytest.raises(MissingGridError) as err:
        check_run_inputs(parity_dir / "preprocessed", tmp_path / "grids", ["torus"], tmp_path / "out")
    msg = str(err.value)
    g = tmp_path / "grids" / "torus"
    assert msg.startswith(f"14 patch file(s) not found: {g / 'train' / 'good' / 'npz'}/{{000,001,002,003,004,005,006,"
                          f"007}}.npz; {g / 'test' / 'bump' / 'npz' / '000.npz'}; ")
    assert f"{g / 'test' / 'good' / 'npz'}/{{000,001}}.npz" in msg and "\n" not in msg
    assert msg.endswith(f"run `python cut_patches.py --datasets_path {parity_dir / 'preprocessed'} "
                        f"--save_grid_path {tmp_path / 'grids'}` first")


def test_more_than_eight_files_of_a_folder_are_counted(parity_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(parity_dir / "preprocessed" / "torus", data / "torus")
    train = data / "torus" / "train" / "good"
    for kind, ext in (("rgb", "png"), ("xyz", "tiff")):
        for i in range(8, 11):
            shutil.copyfile(train / kind / f"000.{ext}", train / kind / f"{i:03d}.{ext}")
    with pytest.raises(MissingGridError, match=r"npz/\{000,001,002,003,004,005,006,007,\.\.\. \(\+3\)\}\.npz; "):
        check_run_inputs(data, tmp_path / "grids", ["torus"], tmp_path / "out")
