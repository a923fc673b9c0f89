"""Shared pytest fixtures."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------- accelerator tests
# Tests marked ``cuda`` run on the CUDA device when there is one. ``SHAPE_GUIDED_TEST_DEVICE=cpu``
# runs them on the CPU instead (CPU against CPU): the device check's dry run, which exercises
# their code without a GPU. Without either they are skipped.
ACCEL = os.environ.get("SHAPE_GUIDED_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
MEASUREMENTS = os.environ.get("SHAPE_GUIDED_MEASUREMENTS")  # JSON-lines file the device check collects


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on the CUDA device (skipped without one; "
                                       "SHAPE_GUIDED_TEST_DEVICE=cpu runs it on the CPU)")


def pytest_collection_modifyitems(config, items):
    if ACCEL:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (SHAPE_GUIDED_TEST_DEVICE=cpu runs it on the CPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def accel_device() -> torch.device:
    """The device of the ``cuda``-marked tests."""
    return torch.device(ACCEL)


@pytest.fixture
def record(request):
    """``record(**values)``: append the values, with the test's name, to the device check's measurements."""
    def write(**values):
        if MEASUREMENTS:
            with open(MEASUREMENTS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"test": request.node.name, **values}, default=float) + "\n")
    return write


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
