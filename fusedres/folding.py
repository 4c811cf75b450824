"""Eval-mode BatchNorm folding and its cache.

Folded weights are a cache, never a second source of truth: each entry is keyed by the
identity, storage, version counter, device and dtype of every tensor it was computed
from, so in-place edits, load_state_dict, optimizer steps, .to() and .half() all
rebuild it. (Writes made through `tensor.data` bypass version counters; after such a
write, call `fusedres.clear_fold_cache(model)`.)

The cache is used only when autograd is off (torch.no_grad / torch.inference_mode).
With autograd on, folding is recomputed each call as differentiable tensor math, so
gradients reach the conv and BN parameters; under torch.compile it is traced into the
graph, where inductor constant-folds it (e.g. with freezing).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres import reference


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """True when `bn` normalises with batch statistics (the rule nn.BatchNorm2d uses)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = reference.fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                     bn.running_var, bn.eps)
    return weight.to(dtype), bias


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, t.device, t.dtype, t.shape, t.stride())


def _cache_key(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple:
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return (dtype, float(bn.eps), *(_tensor_key(t) for t in tensors))


class FoldCache:
    """Folded (weight, bias) per conv/BN pair of one block."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def folded(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight (in `dtype`) and bias (float32, float64 for float64) with `bn` folded in."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return _fold(conv, bn, dtype)
        key = _cache_key(conv, bn, dtype)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1], entry[2]
        weight, bias = _fold(conv, bn, dtype)
        self._entries[name] = (key, weight, bias)
        return weight, bias

    # The cache is derived state: copies and pickles start empty.
    def __deepcopy__(self, memo) -> FoldCache:
        return FoldCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}
