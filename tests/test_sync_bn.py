"""Fused blocks with nn.SyncBatchNorm (fusedres.sync_bn) in real processes on the CPU (gloo).

PyTorch's own nn.SyncBatchNorm refuses CPU inputs, so the reference is the definition:
one process running the group's whole batch through torchvision with nn.BatchNorm2d. Each
rank runs its slice through the fused model whose BNs are nn.SyncBatchNorm, the loss is
normalised by the group's batch size and the gradients are summed over the group; outputs,
every gradient, the running statistics and, after the steps, the eval-mode output must
match the single process in float64.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torchvision.models.resnet as tv
from distributed import run_ranks
from helpers import narrow_resnet, randomize_bn
from torch import nn

import fusedres
from fusedres import ext, sync_bn

RTOL = 1e-10  # float64: the same sums in another order (two-pass statistics, Chan's merge)
# The cuda backend runs the extension's CPU kernels where fusedres._C is built (CI builds it).
BACKENDS = ["torch"] if ext.load_error() else ["torch", "cuda"]


def _reference(block: str, momentum: float | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_bn(narrow_resnet(tv.Bottleneck if block == "bottleneck" else tv.BasicBlock).double())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return model


def _fused_sync(ref: nn.Module, backend: str, group, convert_first: bool) -> nn.Module:
    """The fused model with SyncBatchNorm BNs, made in either order."""
    model = copy.deepcopy(ref)
    if convert_first:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(model, backend=backend), group)
    else:
        model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model, group), backend=backend)
    blocks = [m for m in model.modules() if isinstance(m, (tv.BasicBlock, tv.Bottleneck))]
    assert blocks and all(isinstance(b, (fusedres.BasicBlock, fusedres.Bottleneck)) for b in blocks)
    assert all(type(m) is nn.SyncBatchNorm for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item() if a.numel() else 0.0


def _parity_body(rank, world_size, groups, sizes, block, backend, momentum, steps, compile_backend=None):
    """Train the fused SyncBN model on this rank's slice and the reference on the group's
    batch; return the worst relative error per kind, and the collectives per step (with
    `compile_backend`: the model under torch.compile, and its graph breaks instead)."""
    handles = [dist.new_group(g) for g in groups]  # collective: every rank creates every group
    (members,) = [g for g in groups if rank in g]
    group = handles[groups.index(members)]
    ref = _reference(block, momentum)
    model = _fused_sync(ref, backend, group, convert_first=rank % 2 == 0)
    run = model
    if compile_backend is not None:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, backend=compile_backend)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    errors: dict[str, float] = {}
    calls = {"all_gather": 0, "all_reduce": 0}

    def counting(name):
        real = getattr(dist, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    def worst(kind, value):
        errors[kind] = max(errors.get(kind, 0.0), value)

    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        xs = [torch.randn(sizes[r], 3, 40, 40, dtype=torch.float64, generator=gen) for r in members]  # layer4: 2x2
        weights = torch.randn(10, dtype=torch.float64, generator=gen)
        total, mine = sum(sizes[r] for r in members), members.index(rank)
        with warnings.catch_warnings():
            # A block falling back to torchvision's forward warns (RuntimeWarning); torch 2.11's dynamo
            # itself warns (DeprecationWarning) when it traces an autograd.Function.
            warnings.simplefilter("error", RuntimeWarning)
            with contextlib.ExitStack() as patches:
                if compile_backend is None:  # dynamo would trace the counters, not count calls
                    patches.enter_context(mock.patch.object(sync_bn.dist, "all_gather", counting("all_gather")))
                    patches.enter_context(mock.patch.object(sync_bn.dist, "all_reduce", counting("all_reduce")))
                out = run(xs[mine])
                ((out * weights).sum() / total).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
        ref_out = ref(torch.cat(xs))
        ((ref_out * weights).sum() / total).backward()
        start = sum(sizes[r] for r in members[:mine])
        worst("output", _rel(out, ref_out[start:start + sizes[rank]]))
        for p, q in zip(model.parameters(), ref.parameters()):
            worst("gradient", _rel(p.grad, q.grad))
        for (name, b), c in zip(model.named_buffers(), ref.buffers()):
            if name.endswith("num_batches_tracked"):
                worst("num_batches_tracked", float((b != c).any()))
            else:
                worst("running stats", _rel(b, c))
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        worst("eval output", _rel(model(x), ref(x)))  # eval folds: not what the compile check is about
    if compile_backend is not None:
        return errors, {"graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
    return errors, {k: v // steps for k, v in calls.items()}


def _batch_norms(block: str) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in _reference(block, 0.1).modules())


def _check(results, block, synced_ranks):
    for rank, (errors, calls) in enumerate(results):
        for kind, value in errors.items():
            assert value <= (0 if kind == "num_batches_tracked" else RTOL), (rank, kind, value)
        if rank in synced_ranks:  # one all-gather per BN forward, one all-reduce per BN backward
            assert calls == {"all_gather": _batch_norms(block), "all_reduce": _batch_norms(block)}, (rank, calls)
        else:
            assert calls == {"all_gather": 0, "all_reduce": 0}, (rank, calls)


def _per_backend(rank, world_size, body, backends, *args):
    """body(rank, world_size, *args with backend) once per backend, in one spawn (a spawn
    costs seconds); the results by backend."""
    return {b: body(rank, world_size, *[b if a == "<backend>" else a for a in args]) for b in backends}


def test_two_ranks_unequal_batches_match_one_process():
    """BasicBlock net, batches 3 and 5, momentum 0.3, 3 steps, on the torch backend and (where
    the extension is built) the cuda backend's CPU kernels."""
    results = run_ranks(2, _per_backend, _parity_body, BACKENDS, [[0, 1]], [3, 5], "basic", "<backend>", 0.3, 3)
    for backend in BACKENDS:
        _check([r[backend] for r in results], "basic", {0, 1})


def test_three_ranks_bottleneck_empty_rank_subset_group_and_cumulative_momentum():
    """Ranks {0, 1} share a group (rank 1's batch is empty, as nn.SyncBatchNorm allows);
    rank 2 is a group of its own (world size 1: nn.BatchNorm2d's behaviour, no collective)."""
    results = run_ranks(3, _parity_body, [[0, 1], [2]], [4, 0, 3], "bottleneck", "torch", None, 2)
    _check(results, "bottleneck", {0, 1})


def test_two_ranks_compiled_without_graph_breaks():
    """torch.compile (aot_eager) of the fused SyncBN model: the collectives trace (no graph
    break: the group count stays a tensor), same numbers as the single process."""
    results = run_ranks(2, _parity_body, [[0, 1]], [3, 5], "basic", "torch", 0.3, 2, "aot_eager")
    for rank, (errors, counts) in enumerate(results):
        for kind, value in errors.items():
            assert value <= (0 if kind == "num_batches_tracked" else RTOL), (rank, kind, value)
        assert counts == {"graph_breaks": 0}, (rank, counts)


def test_without_a_process_group_syncbn_blocks_behave_as_batchnorm():
    """nn.SyncBatchNorm without torch.distributed initialised normalises like BatchNorm2d; so
    do fused blocks (fused, without a warning)."""
    assert not dist.is_initialized()
    ref = _reference("basic", 0.1)
    model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
    assert all(type(m) is nn.SyncBatchNorm for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    reverted = fusedres.revert(model)
    assert type(reverted.layer1[0]) is tv.BasicBlock and type(reverted.layer1[0].bn1) is nn.SyncBatchNorm


def _block_body(rank, world_size, sizes, backend):
    """One fused BasicBlock with SyncBatchNorm in float32 on `backend` (the Triton
    interpreter for triton) against torchvision's block with BatchNorm2d in float64 on the
    whole batch: output and input/parameter gradients."""
    torch.manual_seed(0)
    ref = randomize_bn(tv.BasicBlock(8, 8)).double()
    block = fusedres.BasicBlock(8, 8, backend=backend)
    block.load_state_dict(ref.state_dict())
    block = nn.SyncBatchNorm.convert_sync_batchnorm(block).float()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 8, 6, 6, generator=gen, dtype=torch.float64) for n in sizes]
    mine = xs[rank].float().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = block(mine)
    out.sum().backward()
    grads = [p.grad for p in block.parameters()]
    for g in grads:
        dist.all_reduce(g)
    whole = torch.cat(xs).requires_grad_()
    ref_out = ref(whole)
    ref_out.sum().backward()
    start = sum(sizes[:rank])
    piece = slice(start, start + sizes[rank])
    errors = {"output": _rel(out.double(), ref_out[piece].detach()), "input grad": _rel(mine.grad.double(),
                                                                                      whole.grad[piece])}
    errors["weight grads"] = max(_rel(g.double(), q.grad) for g, q in zip(grads, ref.parameters()))
    return errors


def test_single_block_float32_on_every_backend():
    """The triton backend (in the Triton interpreter), torch and cuda, float32. Tolerance:
    K = 8*3*3 = 72-term convs and 5*36 = 180-value statistics, two convs in sequence (four in
    the backward): 4 * 4 * sqrt(180) * eps32 ~ 3e-5 of each tensor's max."""
    backends = ["triton", *BACKENDS]
    for per_backend in run_ranks(2, _per_backend, _block_body, backends, [2, 3], "<backend>"):
        for backend, errors in per_backend.items():
            for kind, value in errors.items():
                assert value <= 4 * 4 * 180 ** 0.5 * torch.finfo(torch.float32).eps, (backend, kind, value)


def _few_values_body(rank, world_size, sizes):
    """A fused BasicBlock with SyncBatchNorm on 1x1 maps, float64: this rank's batch of
    sizes[rank] images has that many values per channel. The output against torchvision's
    block with BatchNorm2d on the whole batch, or the error the block raises."""
    torch.manual_seed(0)
    ref = randomize_bn(tv.BasicBlock(4, 4)).double()
    block = fusedres.BasicBlock(4, 4, backend="torch").double()
    block.load_state_dict(ref.state_dict())
    block = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    xs = [torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) for n in sizes]
    try:
        out = block(xs[rank])
    except ValueError as e:
        return str(e)
    start = sum(sizes[:rank])
    return _rel(out, ref(torch.cat(xs))[start:start + sizes[rank]].detach())


def test_one_value_per_channel_on_a_rank():
    """A rank with one value per channel (nn.BatchNorm2d would refuse it) is fine when the
    group has more; a group total of one value raises nn.BatchNorm2d's error on every rank
    (nn.SyncBatchNorm gives NaN running variances), the same error, without a hang."""
    assert all(e <= RTOL for e in run_ranks(2, _few_values_body, [1, 2]))
    messages = run_ranks(2, _few_values_body, [1, 0])
    assert all(isinstance(m, str) and "Expected more than 1 value per channel" in m
               and "whole process group" in m for m in messages), messages


def _gpu_ddp_body(rank, world_size, steps):
    """Fused vs torchvision, both with nn.SyncBatchNorm under DDP on NCCL, one GPU per rank."""
    torch.cuda.set_device(rank)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(_reference("basic", 0.1).float()).cuda()
    ours = fusedres.convert(ref)  # a copy sharing nothing but the (default) process group
    ddp_ref = nn.parallel.DistributedDataParallel(ref, device_ids=[rank])
    ddp_ours = nn.parallel.DistributedDataParallel(ours, device_ids=[rank])
    errors: dict[str, float] = {}
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + 10 * step + rank)
        x = torch.randn(3 + rank, 3, 40, 40, generator=gen).cuda()
        for m in (ddp_ref, ddp_ours):
            m(x).square().mean().backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            errors["gradient"] = max(errors.get("gradient", 0.0), _rel(p.grad, q.grad))
            p.grad = q.grad = None
    for b, c in zip(ours.buffers(), ref.buffers()):
        errors["buffers"] = max(errors.get("buffers", 0.0), _rel(b.double(), c.double()))
    return errors


@pytest.mark.gpu
def test_gpu_ddp_with_syncbn_matches_torchvision_syncbn():
    world = min(2, torch.cuda.device_count())  # one GPU: world size 1 (no communication)
    for errors in run_ranks(world, _gpu_ddp_body, 2, backend="nccl"):
        for kind, value in errors.items():
            assert value <= 1e-3, (kind, value)  # fp32, TF32 off, 3 convs deep per stage


def _mismatched_channels_body(rank, world_size):
    """A user error: the ranks' SyncBN blocks disagree on the channel count."""
    channels = 4 if rank == 0 else 8
    block = nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.BasicBlock(channels, channels, backend="torch"))
    block(torch.randn(2, channels, 5, 5)).sum().backward()


def test_mismatched_channel_counts_across_ranks_fail_in_bounded_time():
    import time

    from distributed import RankFailure

    start = time.monotonic()
    with pytest.raises(RankFailure):
        run_ranks(2, _mismatched_channels_body, pg_timeout=10, timeout=90, grace=5)
    assert time.monotonic() - start < 90
