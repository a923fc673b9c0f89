"""Shared pytest fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The authors' parity fixture (read-only: copy before anything writes)."""
    if not PARITY.is_dir():
        pytest.fail(f"parity fixture not found at {PARITY}")
    return PARITY


@pytest.fixture(scope="session")
def as_unprivileged() -> list[str]:
    """Command prefix that runs a subprocess without root's permission override, so that a read-only
    folder is read-only for it too (tests run as root in CI): ``setpriv`` drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH. Empty for a non-root user."""
    import shutil

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop root's write permission")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
