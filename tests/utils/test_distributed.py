"""utils/distributed.py: a plain process never touches torch.distributed; two gloo ranks exchange objects."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.launcher import launch_local
from utils import distributed
from utils.device import resolve_device
from utils.errors import ConfigError


@pytest.fixture
def plain(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_plain_process(plain):
    device = distributed.rank_device("cpu")
    assert device == resolve_device("cpu")
    with distributed.session(device) as on:
        assert on is False and not dist.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        obj = {"a": [1, 2]}
        assert distributed.broadcast(obj) is obj and distributed.gather(obj) == [obj]
        t = torch.tensor([1.5])
        assert distributed.mean_over_ranks(t) is t
        distributed.barrier()
        with distributed.local_rank_first():
            pass
    assert not dist.is_initialized()


def test_explicit_gpu_index_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "resolve_device", lambda d: torch.device(str(d)))   # as on a GPU node
    with pytest.raises(ConfigError, match=r"--device cuda:1: under torchrun each rank uses the GPU cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:1")
    assert distributed.rank_device("cpu") == torch.device("cpu")


def collectives(folder: str) -> dict:
    """One rank's view of every collective (runs in the spawned ranks)."""
    torch.set_num_threads(1)
    r = distributed.rank()
    with distributed.session(torch.device("cpu")) as on:
        out = dict(on=on, backend=dist.get_backend(), active=distributed.active())
        out["broadcast"] = distributed.broadcast({"from": r} if r == 0 else None)
        out["gather"] = distributed.gather((r, 10 * r))
        out["mean"] = distributed.mean_over_ranks(torch.tensor([float(r), 4.0 * r], dtype=torch.float64)).tolist()
        with distributed.local_rank_first():
            out["seen"] = sorted(p.name for p in Path(folder).iterdir())
            (Path(folder) / f"rank{r}").write_text("done")
    out["active_after"] = distributed.active()
    return out


def test_two_ranks_exchange_objects(tmp_path):
    r0, r1 = launch_local(collectives, str(tmp_path))
    for r in (r0, r1):
        assert r["on"] is True and r["backend"] == "gloo" and r["active"] and not r["active_after"]
        assert r["broadcast"] == {"from": 0} and r["mean"] == [0.5, 2.0]
    assert r0["gather"] == [(0, 0), (1, 10)] and r1["gather"] is None
    assert r0["seen"] == [] and r1["seen"] == ["rank0"]          # local rank 0 first, then the others
