"""``torch.distributed`` for the scripts under ``torchrun``: the process group, each rank's device, collectives.

A plain ``python script.py`` is rank 0 of 1 (:mod:`utils.launch`): :func:`session` does
nothing, :func:`broadcast` returns its argument, :func:`gather` a one-element list,
:func:`mean_over_ranks` its argument, and ``torch.distributed`` is never touched.

Under ``torchrun`` with more than one process, :func:`session` joins the process group that
torchrun's environment describes (``env://``): NCCL when the rank computes on CUDA (device
``cuda:LOCAL_RANK``, made the current device), gloo on CPU, or the backend the caller names
(``main.py`` asks for gloo: its ranks only exchange small Python objects). It leaves the group
when its body finishes. When the body raises, the group is left as it is and the exception
propagates: the script exits non-zero and torchrun's agent, which polls its workers every
``--monitor-interval`` seconds (0.1 by default), stops every other rank with SIGTERM, so a
rank blocked in a collective never waits for the collective's timeout. A rank whose
collective breaks first (gloo notices the failed peer's closed connection before torchrun
does) raises :class:`PeerFailedError`, a one-line user error, rather than gloo's traceback:
the failed rank's own message is the one to read.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import re
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from utils.device import DeviceUnavailableError, resolve_device
from utils.errors import ConfigError, ShapeGuidedError
from utils.launch import launch


class PeerFailedError(ShapeGuidedError):
    """A collective broke because another rank ended; that rank printed the cause."""


# gloo: "Connection reset by peer", "Connection closed by peer", "Socket closed"; NCCL: "remote process exited"
_PEER_GONE = re.compile(r"by peer|connection (reset|closed|refused)|socket closed|remote process", re.I)


def _peer_guard(collective):
    """Turn the error of a collective whose peer has ended into :class:`PeerFailedError`."""
    @functools.wraps(collective)
    def guarded(*args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except RuntimeError as exc:
            if world_size() == 1 or not active() or not _PEER_GONE.search(str(exc)):
                raise
            raise PeerFailedError(f"stopped in {collective.__name__}() because another rank ended (its error "
                                  f"message is the one to read; here: {str(exc).splitlines()[0][:160]})") from exc
    return guarded


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return launch().rank


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return launch().world_size


def is_main() -> bool:
    """Rank 0: the rank that writes the run's shared files."""
    return rank() == 0


def active() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def rank_device(device: str | torch.device = "auto") -> torch.device:
    """``--device`` resolved for this rank: under torchrun ``cuda``/``auto`` on a GPU node means ``cuda:LOCAL_RANK``.

    Outside torchrun this is :func:`utils.device.resolve_device`. Under torchrun an explicit
    ``cuda:N`` is refused (every rank would use the same GPU), and so is a node with fewer
    GPUs than processes.
    """
    info = launch()
    resolved = resolve_device(device)
    if not info.distributed or resolved.type != "cuda":
        return resolved
    if resolved.index is not None:
        raise ConfigError(f"--device {device}: under torchrun each rank uses the GPU cuda:LOCAL_RANK; "
                          f"pass --device cuda (or auto)")
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise DeviceUnavailableError(f"LOCAL_RANK {info.local_rank}: this node has {count} CUDA device(s); start "
                                     f"at most {count} processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", info.local_rank)


@contextlib.contextmanager
def session(device: torch.device, backend: Optional[str] = None,
            timeout: Optional[datetime.timedelta] = None) -> Iterator[bool]:
    """Join torchrun's process group for the body (module docstring); yields whether the run is distributed.

    ``backend`` defaults to ``nccl`` for a CUDA ``device`` and ``gloo`` otherwise; ``timeout`` is
    the collectives' timeout (torch's default when None). Nested sessions reuse the group.
    """
    if not launch().distributed:
        yield False
        return
    if active():
        yield True
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **({} if timeout is None else {"timeout": timeout}))
    yield True
    dist.destroy_process_group()


def _require_group() -> None:
    if not active():
        raise RuntimeError("a collective of a distributed run was called outside utils.distributed.session()")


@_peer_guard
def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a picklable object)."""
    if world_size() == 1:
        return obj
    _require_group()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@_peer_guard
def gather(obj: Any, dst: int = 0) -> Optional[list]:
    """Every rank's ``obj``, in rank order, on rank ``dst`` (None on the other ranks)."""
    if world_size() == 1:
        return [obj]
    _require_group()
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


@_peer_guard
def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (a new tensor, on every rank; on the rank's device for NCCL)."""
    if world_size() == 1:
        return value
    _require_group()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


@_peer_guard
def barrier() -> None:
    """Wait for every rank."""
    if world_size() > 1:
        _require_group()
        dist.barrier()


@contextlib.contextmanager
def local_rank_first() -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on the node's other ranks.

    For work whose result the other ranks reuse (a file cache): one rank builds it, the
    others find it done. Every rank passes one barrier.
    """
    if world_size() == 1:
        yield
        return
    first = launch().local_rank == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()
