"""Synchronised batch statistics for fused blocks whose BatchNorms are nn.SyncBatchNorm.

In train mode a fused block computes each BN's local per-channel (mean, biased var) with
its backend's kernels (`bn_stats`, or the statistics epilogue of `conv_bn_stats`); for an
nn.SyncBatchNorm, `global_stats` then turns them into the statistics of the whole batch
across the BN's process group, and the finalize and running-statistics update run on
those, with the global count (unbiased variance var * N / (N - 1)), as nn.SyncBatchNorm.

Forward: one `all_gather` of the per-rank (count, mean, M2 = var * count) per channel, all
of it in float64, combined in rank order with Chan's parallel formula: exact for unequal
per-rank batch sizes (a rank with an empty batch contributes count 0) and safe for large
means (no E[y^2] - E[y]^2). Backward: one `all_reduce` (sum) of the two per-channel
gradients of the global (mean, var), the equivalent of nn.SyncBatchNorm's all-reduce of
sum(dy) and sum(dy * x_hat); each rank's local statistics then get their share.

Synchronisation happens exactly where nn.SyncBatchNorm synchronises: in training, with
torch.distributed initialised and more than one rank in the BN's group (default: the
world); otherwise the BN behaves as nn.BatchNorm2d (no communication).

No host syncs: the global count stays a tensor (the running variance's N / (N - 1) is
computed with it on the device), except on a rank whose own batch has at most one value
per channel, which reads it to refuse a group total of one value (nn.BatchNorm2d's error;
nn.SyncBatchNorm would return NaN running variances) and to skip an empty group batch.
Under torch.compile the collectives trace (dynamo turns them into functional collectives)
and a synchronised BN adds no graph break.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def needs_sync(bn: nn.Module) -> bool:
    """Whether `bn`'s batch statistics are reduced over its process group (nn.SyncBatchNorm's rule)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(_group(bn)) > 1


def _group(bn: nn.SyncBatchNorm):
    return bn.process_group if bn.process_group is not None else dist.group.WORLD


def global_stats(mean: torch.Tensor, var: torch.Tensor, count: int,
                 bn: nn.SyncBatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, count) of the whole batch over `bn`'s process group, from this
    rank's; differentiable in mean and var (see the module doc). The count is a float64
    0-dim tensor on mean's device: reading it would cost a host sync (and a graph break
    under torch.compile)."""
    return _GlobalStats.apply(mean, var, count, _group(bn))


class _GlobalStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, var, count, group):
        n = float(count)
        f64 = torch.float64
        zeros = torch.zeros_like(mean, dtype=f64)
        # An empty local batch has NaN statistics: it contributes count 0 and nothing else.
        local = torch.stack([torch.full_like(mean, n, dtype=f64), mean.to(f64) if count else zeros,
                             var.to(f64) * n if count else zeros])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        total = sum(p[0] for p in parts)  # per channel, all equal
        g_mean, g_m2 = _chan_combine(parts, total)
        ctx.group, ctx.dtype = group, mean.dtype
        ctx.save_for_backward(local[1], g_mean, n / total)
        ctx.mark_non_differentiable(total)
        # copy=True: under torch.compile, torch 2.11 dropped the gradients of outputs that are
        # the forward's own intermediates (a float64 .to(float64) returns its input): measured,
        # zero gradients for mean and var; torch 2.14 was right either way.
        return g_mean.to(mean.dtype, copy=True), (g_m2 / total).to(var.dtype, copy=True), total[0]

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_total):
        local_mean, g_mean, share = ctx.saved_tensors
        grads = torch.stack([torch.zeros_like(g_mean) if grad_mean is None else grad_mean.to(torch.float64),
                             torch.zeros_like(g_mean) if grad_var is None else grad_var.to(torch.float64)])
        dist.all_reduce(grads, group=ctx.group)  # every rank's loss depends on the global statistics
        g_mu, g_var = grads
        # mean = sum n_i mean_i / N, var = sum (n_i var_i + n_i (mean_i - mean)^2) / N: the
        # (mean_i - mean) terms' derivative through `mean` sums to zero over the ranks.
        d_mean = share * (g_mu + 2 * g_var * (local_mean - g_mean))
        d_var = share * g_var
        return d_mean.to(ctx.dtype), d_var.to(ctx.dtype), None, None


def _chan_combine(parts: list[torch.Tensor], total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2) of the union from per-rank (count, mean, M2) rows, in rank order, in float64
    (NaN when every rank's batch is empty)."""
    mean = sum(p[0] * p[1] for p in parts) / total
    m2 = sum(p[2] + p[0] * (p[1] - mean) ** 2 for p in parts)
    return mean, m2
