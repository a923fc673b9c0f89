"""utils/global_batchnorm.py: two gloo ranks with half a batch each equal one process with the whole batch.

The reference is ``nn.BatchNorm1d`` in one process on the concatenated batch, in float64: the
outputs, the running statistics, the input gradients and the DDP-averaged parameter gradients
of GlobalBatchNorm agree to 1e-12 relative. Plain BatchNorm layers under DDP (per-rank
statistics) miss by more than 1e-2, so the comparison can fail.
"""
import numpy as np
import pytest
import torch
from torch import nn

from tests.launcher import launch_local
from utils import distributed
from utils.global_batchnorm import GlobalBatchNorm, synchronise_batchnorm, to_global_batchnorm

N, POINTS = 8, 20
# Per-channel shifts that the next BatchNorm removes: their gradients are zero in exact arithmetic
# (rounding noise in both runs), so they are checked to be ~0 rather than compared.
SHIFTS = ("conv.bias", "bn1.bias", "fc.bias")


class PointNetLike(nn.Module):
    """Conv -> BN -> ReLU -> max over points -> Linear -> BN -> ReLU -> Linear: both BN input shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 6)
        self.bn2 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv(x))).amax(dim=2)
        return self.out(torch.relu(self.bn2(self.fc(h))))


def net_and_batch():
    torch.manual_seed(0)
    net = PointNetLike().double()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(N, 3, POINTS, generator=g, dtype=torch.float64) * 2 + 1)
    target = torch.randn(N, 1, generator=g, dtype=torch.float64)
    return net, x, target


def step(net, x, target):
    """Two forward/backward passes (running statistics updated twice); output, input grad, grads, buffers."""
    x = x.clone().requires_grad_(True)
    for _ in range(2):
        net.zero_grad()
        x.grad = None
        out = net(x)
        ((out - target) ** 2).mean().backward()
    module = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    return dict(out=out.detach(), xgrad=x.grad, grads={n: p.grad.clone() for n, p in module.named_parameters()},
                buffers={n: b.clone() for n, b in module.named_buffers()})


def rank_shares() -> dict:
    """Runs in each spawned rank: its half of the batch through DDP, with GlobalBatchNorm (True) and without."""
    torch.set_num_threads(1)
    r, w = distributed.rank(), distributed.world_size()
    out = {}
    with distributed.session(torch.device("cpu")):
        for synchronised in (True, False):
            net, x, target = net_and_batch()
            if synchronised:
                synchronise_batchnorm(net, torch.device("cpu"))
            ddp = nn.parallel.DistributedDataParallel(net)
            share = slice(r * N // w, (r + 1) * N // w)
            out[synchronised] = step(ddp, x[share], target[share])
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def single():
    net, x, target = net_and_batch()
    return step(net, x, target)


@pytest.fixture(scope="module")
def two_ranks():
    return launch_local(rank_shares)


@pytest.mark.parametrize("synchronised", [True, False])
def test_two_ranks_equal_one_process(single, two_ranks, synchronised):
    ranks = [r[synchronised] for r in two_ranks]
    out = torch.cat([r["out"] for r in ranks])
    # rank r's loss is the mean over N/2 samples: its input gradient is 2x that of the global mean
    xgrad = torch.cat([r["xgrad"] for r in ranks]) / 2
    errors = [rel(out, single["out"]), rel(xgrad, single["xgrad"])]
    for name, g in single["grads"].items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])    # DDP: the same on both ranks
        if name not in SHIFTS:
            errors.append(rel(ranks[0]["grads"][name], g))
    for name, b in single["buffers"].items():
        if b.is_floating_point():
            errors.append(rel(ranks[0]["buffers"][name], b))
        else:
            assert int(ranks[0]["buffers"][name]) == int(b) == 2
    if synchronised:
        assert max(errors) < 1e-12, errors
        assert all(torch.equal(ranks[0]["buffers"][n], ranks[1]["buffers"][n]) for n in single["buffers"])
        for name in SHIFTS:
            assert ranks[0]["grads"][name].abs().max() < 1e-12 and single["grads"][name].abs().max() < 1e-12
    else:                                                  # per-rank statistics: not the global batch's
        assert max(errors) > 1e-2, errors


def test_without_a_process_group_it_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4))
    converted = to_global_batchnorm(PointNetLike())
    assert isinstance(converted.bn1, GlobalBatchNorm) and isinstance(converted.bn2, GlobalBatchNorm)
    same = to_global_batchnorm(nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)))
    same.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3, 7)
    for mode in (True, False):
        plain.train(mode)
        same.train(mode)
        assert torch.equal(plain(x), same(x))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))


def test_conversion_keeps_tensors_and_names():
    net = PointNetLike()
    params = {n: p for n, p in net.named_parameters()}
    buffers = {n: b for n, b in net.named_buffers()}
    keys = list(net.state_dict())
    synchronise_batchnorm(net, torch.device("cpu"))
    assert list(net.state_dict()) == keys                  # a checkpoint has the plain model's keys
    assert all(p is params[n] for n, p in net.named_parameters())   # optimisers keep working
    assert all(b is buffers[n] for n, b in net.named_buffers())
    assert np.all([isinstance(m, GlobalBatchNorm) for m in (net.bn1, net.bn2)])
