"""utils/cli.py: run_cli exits 2 with the message (under torchrun the rank is named and ends at once);
the interrupted-run message of the resumable stages."""
import json
import subprocess
import sys

import pytest

from tests.launcher import REPO, child_env
from utils.cli import interruptible, run_cli
from utils.errors import DataError

SNIPPET = """
import atexit, sys
from utils.cli import run_cli
from utils.errors import DataError
atexit.register(lambda: print("interpreter teardown ran", flush=True))
def body(kind):
    if kind == "user":
        raise DataError("g/bagel/train/good/npz/000.npz: file not found")
    raise RuntimeError("a bug")
sys.exit(run_cli(body, sys.argv[1]))
"""


def test_plain_run_returns_2_with_the_message(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def body(error):
        raise error
    assert run_cli(body, DataError("x.npz: file not found")) == 2
    assert capsys.readouterr().err == "error: x.npz: file not found\n"
    with pytest.raises(RuntimeError, match="a bug"):           # a bug keeps its traceback
        run_cli(body, RuntimeError("a bug"))


@pytest.mark.parametrize("kind, code", [("user", 2), ("bug", 1)])
def test_a_failing_rank_names_itself_and_ends_at_once(tmp_path, kind, code):
    error_file = tmp_path / "error.json"
    env = child_env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", TORCHELASTIC_ERROR_FILE=str(error_file))
    proc = subprocess.run([sys.executable, "-c", SNIPPET, kind], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code
    assert "interpreter teardown ran" not in proc.stdout            # os._exit: torchrun sees the exit at once
    recorded = json.loads(error_file.read_text())["message"]["message"]
    if kind == "user":
        assert proc.stderr == "error: rank 1 of 2: g/bagel/train/good/npz/000.npz: file not found\n"
        assert recorded == "rank 1 of 2: DataError: g/bagel/train/good/npz/000.npz: file not found"
    else:
        assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr
        assert recorded == "rank 1 of 2: RuntimeError: a bug"


def test_plain_process_tears_down_normally():
    proc = subprocess.run([sys.executable, "-c", SNIPPET, "user"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "interpreter teardown ran" in proc.stdout
    assert proc.stderr == "error: g/bagel/train/good/npz/000.npz: file not found\n"


def test_interruptible(capsys):
    assert interruptible(lambda: 7) == 7 and capsys.readouterr().err == ""

    def stopped():
        raise KeyboardInterrupt

    assert interruptible(stopped) is None
    assert "finished samples are kept; run the same command again to resume" in capsys.readouterr().err
