"""BatchNorm over the global batch of a data-parallel run: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on CPU.

With data parallelism each rank holds a share of the batch, and a plain BatchNorm layer
would normalise with the statistics of that share only. PyTorch's ``SyncBatchNorm`` fixes
this on GPUs but refuses CPU tensors. :class:`GlobalBatchNorm` does the same maths on any
backend, gloo included:

* forward (training mode, a process group of more than one rank): all-reduce of the
  per-channel element count and sum (float64), then of the sum of squared deviations from
  that global mean, so every rank normalises with the mean and the biased variance of the
  global batch; the running statistics are updated with the global mean and unbiased
  variance, exactly as one process holding the whole batch updates them;
* backward: all-reduce of the per-channel sums of ``dy`` and ``dy * x_hat``, which gives
  each rank the input gradient of the global batch; the weight and bias gradients stay the
  rank's own sums, and DistributedDataParallel averages them with the other parameters.

So N ranks with equal shares, whose per-rank mean losses DDP averages, compute the gradient
of the global batch's mean loss: the same as one process with the whole batch, up to float
rounding (sums in float64, normalisation in the input's dtype). In eval mode, or without a
process group, :class:`GlobalBatchNorm` is ``nn.BatchNorm``. Its parameters and buffers keep
their names, so a state_dict is that of the plain layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel values ``t`` (C,) shaped to broadcast against ``x`` (N, C, ...), in ``x``'s dtype."""
    return t.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch normalisation with statistics and input gradients over every rank of ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group):
        dims = _reduce_dims(x)
        channels = x.shape[1]
        local_count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        stats = torch.cat([x.sum(dims, dtype=torch.float64), local_count])
        dist.all_reduce(stats, group=group)
        count = stats[-1]
        mean = stats[:-1] / count
        centred = x - _channel_view(mean, x)
        squares = centred.square().sum(dims, dtype=torch.float64)
        dist.all_reduce(squares, group=group)
        var = squares / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centred * _channel_view(invstd, x)
        out = x_hat if weight is None else x_hat * _channel_view(weight, x) + _channel_view(bias, x)
        if running_mean is not None:
            unbiased = var * (count / (count - 1)) if count > 1 else var
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean)
            running_var.copy_((1 - momentum) * running_var.double() + momentum * unbiased)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.count, ctx.group = count, group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_hat, invstd, weight = ctx.saved_tensors
        dims = _reduce_dims(dy)
        local = torch.cat([dy.sum(dims, dtype=torch.float64), (dy * x_hat).sum(dims, dtype=torch.float64)])
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)
        sum_dy, sum_dy_xhat = total.chunk(2)
        scale = invstd if weight is None else invstd * weight.double()
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = (dy - _channel_view(sum_dy / ctx.count, dy)
                          - x_hat * _channel_view(sum_dy_xhat / ctx.count, dy)) * _channel_view(scale, dy)
        grad_weight = local[dy.shape[1]:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = local[:dy.shape[1]].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (any of 1d/2d/3d) whose training statistics span every rank of ``process_group`` (module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def _synchronised(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronised():
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        running_mean = running_var = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:                       # cumulative average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
            running_mean, running_var = self.running_mean, self.running_var
        group = self.process_group or dist.group.WORLD
        return _GlobalBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, momentum,
                                              self.eps, group)


def to_global_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding the same
    parameter and buffer tensors (so optimisers and state_dict keys are unchanged)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        layer = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
        layer.train(module.training)
        for name in ("weight", "bias"):
            setattr(layer, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(layer, name, getattr(module, name))
        return layer
    for name, child in module.named_children():
        setattr(module, name, to_global_batchnorm(child, process_group))
    return module


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` over the global batch: ``nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` elsewhere (module docstring)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return to_global_batchnorm(module)
