"""Batch statistics handed from one pre-activation block to the next in training.

A pre-activation block starts with BN + ReLU of its input, which is the previous block's
output: the sum of its last conv and its shortcut. That block's last `conv_bn_stats`
computes the sum's per-channel statistics in its epilogue, so the next block need not read
its input once more for them (`fusedres.preact`). They come without a gradient (the
producer does not save its output, which the user may change in place); the next block
gives them bn_stats' gradient with `ops.bn_stats_of`, saving its input as its BN would.

One slot per thread holds the latest block output (a weak reference) with its version
counter and statistics (two small tensors, no autograd graph). The next block takes them
only for that very tensor, unmodified since (an in-place change bumps the version);
anything else, or running under `torch.compile` (which traces a plain `bn_stats`
instead), computes them afresh.
"""

from __future__ import annotations

import threading
import weakref

import torch

_slot = threading.local()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def remember(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Record (mean, var) as the batch statistics of `out` (a block's output)."""
    if _compiling() or out.is_inference():  # an inference tensor has no version counter
        return
    _slot.entry = (weakref.ref(out), out._version, mean, var)


def recall(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, var) of x if they were remembered for this tensor and it is unchanged, else None.
    The slot is emptied either way: a block output feeds one next block."""
    entry = getattr(_slot, "entry", None)
    if entry is None or _compiling() or x.is_inference():
        return None
    _slot.entry = None
    ref, version, mean, var = entry
    if ref() is not x or x._version != version:
        return None
    return mean, var


def forget() -> None:
    """Empty this thread's slot (tests; a caller that must not hand statistics on)."""
    _slot.entry = None
