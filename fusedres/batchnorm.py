"""Train-mode BatchNorm as fusedres ops plus differentiable scale/shift math.

`batch_norm_scale_bias(y, bn)` returns per-channel (scale, bias) such that
`y * scale + bias == bn(y)` with batch statistics, updating `bn`'s running statistics
exactly as nn.BatchNorm2d does (momentum, momentum=None cumulative average,
num_batches_tracked, unbiased running variance).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres import ops


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        if count == 0:
            return  # nn.BatchNorm2d leaves the running statistics alone for an empty batch
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked.to(torch.float64)  # cumulative moving average
        else:
            factor = bn.momentum
        unbiased_var = var * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
        bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype) * factor)


def check_count(count: int, shape: tuple[int, ...], where: str = "") -> None:
    if count == 1:
        raise ValueError(f"{where}Expected more than 1 value per channel when training, got input size {shape}")


def batch_norm_scale_bias(y: torch.Tensor, bn: nn.BatchNorm2d, backend: str,
                          where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    count = y.numel() // y.shape[1]
    check_count(count, tuple(y.shape), where)
    if count == 0:
        # Empty batch: nothing to normalise; nn.BatchNorm2d only counts the batch.
        mean = y.new_zeros(y.shape[1], dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)
        var = torch.ones_like(mean)
    else:
        mean, var = ops.bn_stats(y, backend)
    return scale_bias_from_stats(mean, var, count, bn)


def scale_bias_from_stats(mean: torch.Tensor, var: torch.Tensor, count: int,
                          bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of a train-mode BatchNorm from batch statistics over `count` values per
    channel, updating `bn`'s running statistics (differentiable in mean, var and bn's affine)."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        _update_running_stats(bn, mean.detach(), var.detach(), count)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(scale.dtype)
    bias = -mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(scale.dtype)
    return scale, bias
