"""Eval-mode BatchNorm folding and its cache.

Folded weights are a cache, never a second source of truth: each entry is keyed by the
identity, storage address, version counter and dtype of every tensor it was computed
from and of the BN's batch counter (a move to another device, layout or shape gives new
storage), so in-place edits, load_state_dict, optimizer steps, train-mode forwards, .to()
and .half() all rebuild it. (Writes made through `tensor.data` bypass version counters; after such a
write, call `fusedres.clear_fold_cache(model)`.)

One writer bypasses them on its own: DistributedDataParallel (torch 2.14) broadcasts the
authoritative rank's buffers at each forward under `_unsafe_preserve_version_counter`. So
inside the forward of a DDP module that broadcasts buffers to this rank, nothing is cached
or reused (BN is folded afresh, as it is on torch 2.11, whose broadcast bumps the versions),
and every fold cached before is dropped (`_broadcast_epoch` is part of each key): after such
a forward, the buffers may hold another rank's statistics.

The cache is used only when autograd records nothing (torch.no_grad / torch.inference_mode,
or no parameter of the pair requires a gradient: a frozen layer) and nothing records a graph
(torch.jit.trace, ONNX export: the graph folds from the parameters). When autograd records,
folding is recomputed each call as differentiable tensor math, so gradients reach the conv
and BN parameters; under torch.compile it is traced into the
graph, where inductor constant-folds it (e.g. with freezing).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fusedres import reference


def is_frozen(bn: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (which timm uses too) or timm's FrozenBatchNormAct2d: a BN
    whose weight, bias and running statistics are buffers, used in train mode as in eval."""
    cls = type(bn)
    return cls is FrozenBatchNorm2d or (cls.__name__ == "FrozenBatchNormAct2d" and cls.__module__.startswith("timm."))


def uses_batch_stats(bn: nn.Module) -> bool:
    """True when `bn` normalises with batch statistics (the rule nn.BatchNorm2d uses; a frozen
    BN never does)."""
    if is_frozen(bn):
        return False
    return bn.training or bn.running_mean is None or bn.running_var is None


def needs_autograd(x: torch.Tensor | None, modules: tuple[nn.Module, ...]) -> bool:
    """Whether autograd records a computation on `x` with these modules' parameters: grad mode
    is on and x or a parameter requires a gradient. (A frozen backbone stage in training, e.g.
    a detector's layer1 with FrozenBatchNorm2d, records nothing: it may run as in eval.)"""
    if not torch.is_grad_enabled():
        return False
    if x is not None and x.requires_grad:
        return True
    return any(p.requires_grad for m in modules for p in m.parameters())


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight (in `dtype`) and bias (float32, float64 for float64) with `bn`'s running statistics folded in."""
    weight, bias = reference.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                     bn.running_var, bn.eps)
    return weight.to(dtype), bias


try:
    from torch.nn.parallel import DistributedDataParallel as _DDP
except ImportError:  # torch built without distributed support
    _DDP = None

# Bumped whenever a fold is asked for inside a buffer-broadcasting DDP forward: part of every
# cache key, so folds cached before that broadcast are never reused after it.
_broadcast_epoch = 0


def inside_buffer_broadcast() -> bool:
    """True inside the forward of a DDP module whose buffer broadcast may overwrite this
    rank's buffers: it broadcasts them (`broadcast_buffers=True`, the default) and this
    rank is not the source (group rank 0, or any rank when DDP's join mode is on).
    (`_active_ddp_module` and the rest are DDP internals, as of torch 2.11-2.14; if they
    are missing, assume the worst.)"""
    ddp = _DDP._active_ddp_module if _DDP is not None else None
    if ddp is None:
        return False
    try:
        if not ddp.will_sync_module_buffers():
            return False
        return ddp._join_config.enable or ddp.process_group.rank() != 0
    except AttributeError:
        return True


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, t.dtype)


_warned_inference_params = False


def cache_key(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple | None:
    """What a folded weight depends on: equal keys mean the cached fold is still right.
    None when a parameter is an inference tensor (made under torch.inference_mode): it has
    no version counter, so nothing can tell when it changes and nothing may be cached;
    None too inside a buffer-broadcasting DDP forward (see the module docstring).
    (Read from the modules' registries, not through nn.Module.__getattr__: this runs on
    every eval call, and at batch 1 its cost shows.)"""
    if inside_buffer_broadcast():
        global _broadcast_epoch
        _broadcast_epoch += 1
        return None
    params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers
    # A frozen BN keeps its weight and bias as buffers.
    bn_weight = bn_params["weight"] if "weight" in bn_params else buffers.get("weight")
    bn_bias = bn_params["bias"] if "bias" in bn_params else buffers.get("bias")
    # num_batches_tracked too: nn.BatchNorm2d's training forward updates the running stats
    # inside the batch_norm kernel, which leaves their version counters alone, and counts the
    # batch with an in-place add, which does not.
    tensors = (params.get("weight"), params.get("bias"), bn_weight, bn_bias,
               buffers.get("running_mean"), buffers.get("running_var"), buffers.get("num_batches_tracked"))
    try:
        return (dtype, bn.eps, _broadcast_epoch, *(_tensor_key(t) for t in tensors))
    except RuntimeError:  # "Inference tensors do not track version counter"
        global _warned_inference_params
        if not _warned_inference_params:
            _warned_inference_params = True
            warnings.warn("fusedres: the model's parameters are inference tensors (made or converted under "
                          "torch.inference_mode), which have no version counter: BN is folded again on every "
                          "call instead of cached. Build and convert the model outside inference_mode.",
                          RuntimeWarning, stacklevel=4)
        return None


class FoldCache:
    """Folded (weight, bias) per conv/BN pair of one block, and the block's CPU plan
    (`fusedres.cpu_plan`: the same folds, prepacked; it carries its own key)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self.plan = None

    def clear(self) -> None:
        self._entries.clear()
        self.plan = None

    def __len__(self) -> int:
        return len(self._entries)

    def folded(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight (in `dtype`) and bias (float32, float64 for float64) with `bn` folded in."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or needs_autograd(None, (conv, bn)):
            return fold(conv, bn, dtype)  # traced: the graph folds from the parameters, as it would read them
        key = cache_key(conv, bn, dtype)
        if key is None:
            return fold(conv, bn, dtype)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1], entry[2]
        weight, bias = fold(conv, bn, dtype)
        self._entries[name] = (key, weight, bias)
        return weight, bias

    # The cache is derived state: copies and pickles start empty.
    def __deepcopy__(self, memo) -> FoldCache:
        return FoldCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}
        self.plan = None
