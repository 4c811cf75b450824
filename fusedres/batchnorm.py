"""Train-mode BatchNorm as fusedres ops: batch statistics, then scale and shift.

`batch_norm_scale_bias(y, bn, backend)` returns per-channel (scale, bias) such that
`y * scale + bias == bn(y)` with batch statistics, updating `bn`'s running statistics
exactly as nn.BatchNorm2d does (momentum, momentum=None cumulative average,
num_batches_tracked, unbiased running variance). The finalize step (statistics to scale
and shift, and the running-statistics update, an op on the BN's tensors) runs on the
backend that `select_backend` picks for it: extension kernels on the `cuda` backend,
`fusedres.reference`'s PyTorch ops elsewhere. An nn.SyncBatchNorm reduces its statistics
over its process group first (`fusedres.sync_bn`).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres import ops, reference, sync_bn
from fusedres.backends import select_backend
from fusedres.backends.inputs import FinalizeInputs


def check_count(count: int, shape: tuple[int, ...], where: str = "", bn: nn.Module | None = None) -> None:
    """nn.BatchNorm2d's refusal of one value per channel; a synchronised BN counts the whole
    group's batch instead (checked after the reduction)."""
    if count == 1 and not (bn is not None and sync_bn.needs_sync(bn)):
        raise ValueError(f"{where}Expected more than 1 value per channel when training, got input size {shape}")


def batch_norm_scale_bias(y: torch.Tensor, bn: nn.BatchNorm2d, backend: str,
                          where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    count = y.numel() // y.shape[1]
    check_count(count, tuple(y.shape), where, bn)
    if count == 0:
        # Empty batch: nothing to normalise; nn.BatchNorm2d only counts the batch (a
        # synchronised BN still takes part in the reduction, with count 0).
        mean = y.new_zeros(y.shape[1], dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)
        if sync_bn.needs_sync(bn):
            mean = mean + y.sum(dim=(0, 2, 3)).to(mean.dtype)  # zeros in y's graph: the backward's
            # all-reduce must run on this rank too
        var = mean + 1
    else:
        mean, var = ops.bn_stats(y, backend)
    return scale_bias_from_stats(mean, var, count, bn, backend, where)


def scale_bias_from_stats(mean: torch.Tensor, var: torch.Tensor, count: int, bn: nn.BatchNorm2d,
                          backend: str, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of a train-mode BatchNorm from batch statistics over `count` values per
    channel, updating `bn`'s running statistics (differentiable in mean, var and bn's affine).
    For an nn.SyncBatchNorm in a process group, the statistics are first those of the whole
    group's batch (`fusedres.sync_bn`)."""
    group_count: torch.Tensor | int = count
    if sync_bn.needs_sync(bn):
        mean, var, group_count = sync_bn.global_stats(mean, var, count, bn)
        if count <= 1:  # only then can the group's batch have fewer than 2 values: look (a host sync)
            group_count = int(group_count.item())
            if group_count == 1:
                raise ValueError(f"{where}Expected more than 1 value per channel when training, got 1 in the "
                                 f"whole process group's batch")
    inputs = FinalizeInputs(mean, var, bn.weight, bn.bias, bn.eps)
    impl = select_backend(backend, inputs)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        stats = (bn.running_mean, bn.running_var, bn.num_batches_tracked, mean.detach(), var.detach(), bn.momentum)
        # A device tensor (a group count of at least 2, unread) takes the reference's PyTorch ops.
        update = reference.bn_update_running_stats if isinstance(group_count, torch.Tensor) \
            else impl.bn_update_running_stats
        update(*stats, group_count)
    return impl.bn_finalize(inputs)
