"""train_3Dmodel.py: options, a short run, clear errors with a non-zero exit."""
import subprocess
import sys

import pytest
import torch

import train_3Dmodel
from tests.core.test_sdf_training import one_thread, read_log, write_pretrain  # noqa: F401 (autouse fixture)


def test_defaults_and_float_learning_rate():
    args, _ = train_3Dmodel.parse_args(["--grid_path", "g", "--learning_rate", "5e-4"])
    assert args.learning_rate == 5e-4 and isinstance(args.learning_rate, float)
    defaults, _ = train_3Dmodel.parse_args(["--grid_path", "g"])
    assert (defaults.batch_size, defaults.epoch, defaults.learning_rate, defaults.save_every, defaults.point_num,
            defaults.seed, defaults.device, defaults.amp, defaults.compile, defaults.resume) == \
        (32, 1000, 1e-4, 100, 500, 0, "auto", False, False, None)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return write_pretrain(tmp_path_factory.mktemp("cli") / "grid", {"bagel": [6]}, point_num=24, n_copies=2)


def test_short_run_writes_run_folder(grid, tmp_path, capsys):
    rc = train_3Dmodel.main(["--grid_path", str(grid), "--ckpt_path", str(tmp_path / "ck"), "--batch_size", "3",
                             "--epoch", "1", "--save_every", "5", "--learning_rate", "2.5e-4", "--point_num", "24",
                             "--device", "cpu", "--seed", "7", "--quiet"])
    assert rc == 0
    run, = (tmp_path / "ck").iterdir()
    assert f"checkpoints written to {run}" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("*.pth")) == ["ckpt_000000.pth", "ckpt_000002.pth"]
    assert [e for e, _ in read_log(run)] == [0, 1]
    text = (run / "Congiguration.txt").read_text()
    assert "learning_rate: 0.00025\n" in text and "seed: 7\n" in text
    ckpt = torch.load(run / "ckpt_000002.pth", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 2.5e-4 and ckpt["current_iteration"] == 2


def test_errors_exit_nonzero_with_message(grid, tmp_path, capsys):
    empty = tmp_path / "empty_grid"
    empty.mkdir()
    assert train_3Dmodel.main(["--grid_path", str(empty), "--ckpt_path", str(tmp_path / "ck"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{empty / 'PRETRAIN_DATA'}: pretraining data folder not found" in err and "--pretrain" in err

    assert train_3Dmodel.main(["--grid_path", str(grid), "--ckpt_path", str(tmp_path / "ck"), "--quiet"]) == 2
    assert "patches hold 24 points but --point_num is 500" in capsys.readouterr().err

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert train_3Dmodel.main(["--grid_path", str(grid), "--ckpt_path", str(tmp_path / "ck"), "--point_num", "24",
                               "--batch_size", "3", "--resume", str(bad), "--device", "cpu", "--quiet"]) == 2
    assert f"{bad}: not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())   # no half-made run folder

    (tmp_path / "file").write_text("x")
    assert train_3Dmodel.main(["--grid_path", str(grid), "--ckpt_path", str(tmp_path / "file"), "--point_num", "24",
                               "--batch_size", "3", "--device", "cpu", "--quiet"]) == 2
    assert f"{tmp_path / 'file'}: --ckpt_path is a file, not a folder" in capsys.readouterr().err


def test_script_runs_as_a_program(tmp_path):
    proc = subprocess.run([sys.executable, str(train_3Dmodel.__file__), "--grid_path", str(tmp_path / "none"),
                           "--ckpt_path", str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cut_patches.py" in proc.stderr and "Traceback" not in proc.stderr
