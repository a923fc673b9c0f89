"""utils/cli.py: the shared command-line conventions: run_cli exits 2 with the message (under torchrun
the rank is named and ends at once), name lists, the interrupted-run message of the resumable stages."""
import json
import subprocess
import sys

import pytest

from tests.launcher import REPO, child_env
from utils.cli import add_names, interruptible, make_parser, run_cli, split_names
from utils.errors import ConfigError, DataError, first_line

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


def test_names_accept_spaces_commas_and_both():
    p = make_parser("test")
    add_names(p, "--classes", default=None)
    add_names(p, "--stages", choices=("a", "b", "c"), default=["a"])
    assert p.parse_args([]).classes is None and p.parse_args([]).stages == ["a"]
    assert p.parse_args(["--classes", "bagel,cookie"]).classes == ["bagel", "cookie"]
    assert p.parse_args(["--classes", "bagel", "cookie,tire,"]).classes == ["bagel", "cookie", "tire"]
    assert p.parse_args(["--stages", "c,a"]).stages == ["c", "a"]
    assert split_names(None) is None


@pytest.mark.parametrize("argv", [["--stages", "a,x"], ["--stages", "x"], ["--classes", ","]])
def test_names_reject_unknown_choices_and_empty_lists(argv, capsys):
    p = make_parser("test")
    add_names(p, "--classes")
    add_names(p, "--stages", choices=("a", "b"))
    with pytest.raises(SystemExit) as exc:
        p.parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_run_cli_maps_errors_to_exit_2(capsys):
    def body():
        raise ConfigError("--workers must be at least 1")
    assert run_cli(body) == 2 and capsys.readouterr().err == "error: --workers must be at least 1\n"


def test_first_line_of_a_multi_line_library_error():
    exc = ValueError("\x1b[1mWeights only load failed.\x1b[0m Re-run it.\n\t(1) In PyTorch 2.6 ...\n(2) ...")
    assert first_line(exc) == "ValueError: Weights only load failed. Re-run it."
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 300), limit=20) == "OSError: " + "x" * 17 + "..."
