"""utils/allocator.py: freed activation blocks are reused instead of page-faulted in again (SPEC 12.3)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Six "chunks" like the encoder's: an 8 MB conv3-sized output each, freed after its max.
CHUNKS = f"""
import resource, sys, torch
sys.path.insert(0, {str(REPO)!r})
from utils.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
torch.set_num_threads(2)   # the pattern of main.py on 2 cores (one thread allocates differently)
x, w = torch.rand(4, 128, 500), torch.rand(1024, 128, 1)
def chunks():
    for _ in range(6):
        torch.nn.functional.conv1d(x, w).amax(2)
chunks()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
chunks()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHUNKS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    tuned, faults = _faults("tune")
    assert tuned == "True" and faults < 100
    default, faults_default = _faults("default")
    assert default == "False" and faults_default > 6 * 2048     # every chunk faults its 8 MB in again
    # a threshold the user set in the environment is respected (and nothing is tuned)
    assert _faults("tune", MALLOC_TRIM_THRESHOLD_="1000")[0] == "False"
