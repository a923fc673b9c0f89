"""utils/cli.py: the interrupted-run message of the resumable stages."""
from __future__ import annotations

from utils.cli import interruptible


def test_interruptible(capsys):
    assert interruptible(lambda: 7) == 7 and capsys.readouterr().err == ""

    def stopped():
        raise KeyboardInterrupt

    assert interruptible(stopped) is None
    assert "finished samples are kept; run the same command again to resume" in capsys.readouterr().err
