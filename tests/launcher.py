"""Start test code the way torchrun starts a script: N local ranks, gloo on CPU, one thread each.

:func:`launch_local` runs a module-level function on N local ranks through torch's launcher API
(the engine behind ``torchrun``; the ranks are spawned, as torchrun does: forking a test process
whose OpenMP threads already ran crashes) and returns the ranks' return values; :func:`torchrun`
builds the command line that runs a script under ``python -m torch.distributed.run
--standalone``; :func:`child_env` is the environment of both (one OpenMP thread per process,
so a rank's float kernels are those of a one-thread single process).
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep), **extra)
    return env


def launch_local(fn: Callable, *args, nproc: int = 2) -> list:
    """``fn(*args)`` on ``nproc`` ranks of one node (spawned, c10d rendezvous on localhost); the return values by rank."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "PYTHONPATH")}
    os.environ.update({k: child_env()[k] for k in saved})        # what the ranks inherit
    try:
        out = elastic_launch(config, fn)(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [out[r] for r in range(nproc)]


def torchrun(script: str | Path, *args, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N script args...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.1", str(script), *map(str, args)]
