"""utils/cli.py: the shared command-line conventions."""
from __future__ import annotations

import pytest

from utils.cli import add_names, make_parser, run_cli, split_names
from utils.errors import ConfigError, first_line


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
