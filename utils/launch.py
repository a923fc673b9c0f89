"""What a launcher such as ``torchrun`` told this process, read from its environment (no torch import).

``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``; a plain ``python script.py`` has none of them and is rank 0 of 1. A run
is *distributed* when ``WORLD_SIZE`` is above 1 (``torchrun --nproc_per_node 1`` is a plain
run). :mod:`utils.distributed` builds the process group from this; :mod:`utils.cli` uses it to
name the failing rank in an error message, to hand the message to torchrun's error file
(``TORCHELASTIC_ERROR_FILE``), so that torchrun's failure summary shows it too, and to end a
failing rank at once (:func:`leave_if_distributed`).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

from utils.errors import ConfigError

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: global rank, number of ranks, rank and ranks on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; start the script with "
                          f"torchrun (which sets it) or unset it") from None


def launch() -> Launch:
    """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; rank 0 of 1 without them."""
    world = _int_env("WORLD_SIZE", 1)
    info = Launch(_int_env("RANK", 0), world, _int_env("LOCAL_RANK", 0), _int_env("LOCAL_WORLD_SIZE", 1))
    if world < 1 or not 0 <= info.rank < world or info.local_rank < 0:
        raise ConfigError(f"inconsistent launcher environment RANK={info.rank} WORLD_SIZE={world} "
                          f"LOCAL_RANK={info.local_rank} LOCAL_WORLD_SIZE={info.local_world_size}; "
                          f"start the script with torchrun")
    return info


def _launch_or_plain() -> Launch:
    try:
        return launch()
    except ConfigError:
        return Launch()


def distributed_run() -> bool:
    """Whether this process is one of several ranks (a malformed environment counts as a plain run)."""
    return _launch_or_plain().distributed


def rank_prefix() -> str:
    """``"rank R of N: "`` in a distributed run, else ``""`` (for messages)."""
    info = _launch_or_plain()
    return f"rank {info.rank} of {info.world_size}: " if info.distributed else ""


def leave_if_distributed(code: int) -> int:
    """In a distributed run: end this rank now with exit status ``code``; otherwise return ``code``.

    The rank's streams are flushed and the interpreter's teardown (seconds with torch and the
    models loaded) is skipped, so torchrun notices the failure within its monitor interval and
    stops the other ranks at once. Every file this project writes is atomic, so nothing is
    left half-written.
    """
    if not distributed_run():
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def record_error(exc: BaseException, traceback_too: bool = True) -> None:
    """Write ``exc`` to torchrun's error file (when torchrun set one), which its failure summary prints.

    The file holds the JSON torchrun's own ``@record`` decorator writes: ``{"message":
    {"message": ..., "extraInfo": {"py_callstack": ..., "timestamp": ...}}}``; the summary shows
    ``py_callstack``: the traceback, or with ``traceback_too=False`` (a user error) the
    one-line message.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    message = f"{rank_prefix()}{type(exc).__name__}: {exc}"
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc)) if traceback_too
                                      else message,
                                      "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    except OSError:
        pass                    # the message is on stderr anyway
