"""fusedres: fused convolution + BatchNorm + ReLU + residual add for ResNet blocks."""

from __future__ import annotations

from torch import nn

from fusedres import backends, models, ops, reference, stem
from fusedres.backends import UnsupportedInputError
from fusedres.blocks import BasicBlock, Bottleneck, PlainBlock
from fusedres.convert import convert, revert
from fusedres.preact import PreActBasicBlock, PreActBottleneck
from fusedres.shortcuts import ZeroPadShortcut

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PlainBlock",
    "PreActBasicBlock",
    "PreActBottleneck",
    "UnsupportedInputError",
    "ZeroPadShortcut",
    "backends",
    "clear_fold_cache",
    "convert",
    "models",
    "ops",
    "reference",
    "revert",
]


def clear_fold_cache(model: nn.Module) -> None:
    """Drop every cached folded weight in `model` (needed only after writes through `.data`)."""
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)):
            module._fold_cache.clear()
        stem_cache = module.__dict__.get(stem.CACHE_ATTR)
        if stem_cache is not None:
            stem_cache.clear()
