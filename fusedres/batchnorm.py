"""Train-mode BatchNorm as fusedres ops: batch statistics, then scale and shift.

`batch_norm_scale_bias(y, bn, backend)` returns per-channel (scale, bias) such that
`y * scale + bias == bn(y)` with batch statistics, updating `bn`'s running statistics
exactly as nn.BatchNorm2d does (momentum, momentum=None cumulative average,
num_batches_tracked, unbiased running variance). The finalize step (statistics to scale
and shift, and the running-statistics update, an op on the BN's tensors) runs on the
backend that `select_backend` picks for it: extension kernels on the `cuda` backend,
`fusedres.reference`'s PyTorch ops elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres import ops
from fusedres.backends import select_backend
from fusedres.backends.inputs import FinalizeInputs


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
    return scale_bias_from_stats(mean, var, count, bn, backend)


def scale_bias_from_stats(mean: torch.Tensor, var: torch.Tensor, count: int, bn: nn.BatchNorm2d,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of a train-mode BatchNorm from batch statistics over `count` values per
    channel, updating `bn`'s running statistics (differentiable in mean, var and bn's affine)."""
    inputs = FinalizeInputs(mean, var, bn.weight, bn.bias, bn.eps)
    impl = select_backend(backend, inputs)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        impl.bn_update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean.detach(),
                                     var.detach(), bn.momentum, count)
    return impl.bn_finalize(inputs)
