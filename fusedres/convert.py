"""Swap the residual blocks of torchvision and timm models for fused ones, and back.

The fused block shares the original's conv/BN/downsample modules (so parameters,
buffers and state_dict keys are unchanged). Blocks that cannot be fused are left as
they are and named in one warning.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn
from torchvision.models import resnet as tv_resnet

from fusedres import preact
from fusedres.backends import check_backend_name
from fusedres.blocks import BasicBlock, Bottleneck, FusedBlockMixin, inactive
from fusedres.stem import fuse_stem, unfuse_stem

_TORCHVISION_TO_FUSED: dict[type, type] = {tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck}
_FUSED_TO_TORCHVISION: dict[type, type] = {v: k for k, v in _TORCHVISION_TO_FUSED.items()}
_TIMM_MODULE = "timm.models.resnet"
_SOURCE_ATTR = "_fusedres_source"  # the timm block a fused block was made from (not a submodule)
_FUSED_ATTRS = ("backend", "_fold_cache", "_warned_fallback", _SOURCE_ATTR)


def _is_timm_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == _TIMM_MODULE and cls.__name__ in ("BasicBlock", "Bottleneck")


def _copy_module_dict(module: nn.Module) -> dict:
    """A shallow copy of a module's __dict__ whose registries (parameters, hooks, ...) are new dicts."""
    return {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}


def _timm_reasons(block: nn.Module) -> list[str]:
    reasons = []
    for name in ("act1", "act2", "act3"):
        act = getattr(block, name, None)
        if act is not None and type(act) is not nn.ReLU:
            reasons.append(f"{name} is {type(act).__name__}, not nn.ReLU")
    for name in ("se", "aa", "drop_block", "drop_path"):
        if not inactive(getattr(block, name, None)):
            reasons.append(f"{name} ({type(getattr(block, name)).__name__}) is in effect")
    return reasons


def _fused_from_torchvision(block: nn.Module, backend: str) -> FusedBlockMixin:
    cls = _TORCHVISION_TO_FUSED[type(block)]
    fused = cls.__new__(cls)
    fused.__dict__.update(_copy_module_dict(block))
    fused._init_fused(backend)
    return fused


def _fused_from_timm(block: nn.Module, backend: str) -> FusedBlockMixin:
    cls = Bottleneck if type(block).__name__ == "Bottleneck" else BasicBlock
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for conv_name, bn_name in cls._conv_bn_names:
        setattr(fused, conv_name, getattr(block, conv_name))
        setattr(fused, bn_name, getattr(block, bn_name))
    fused.relu = nn.ReLU(inplace=True)
    fused.downsample = block.downsample
    fused.stride = block.stride
    fused.training = block.training  # not .train(): that would reset each BN's own mode
    fused._init_fused(backend)
    object.__setattr__(fused, _SOURCE_ATTR, block)
    return fused


def _to_fused(module: nn.Module, backend: str) -> tuple[nn.Module | None, list[str]]:
    """(fused block, []) or (None, reasons); (None, []) when `module` is not a block at all."""
    if type(module) in _TORCHVISION_TO_FUSED:
        fused = _fused_from_torchvision(module, backend)
    elif preact.is_timm_preact_block(module):
        fused = preact.from_timm(module, backend)
        object.__setattr__(fused, _SOURCE_ATTR, module)
    elif _is_timm_block(module):
        reasons = _timm_reasons(module)
        if reasons:
            return None, reasons
        fused = _fused_from_timm(module, backend)
    else:
        return None, []
    reasons = fused.unfusable_reasons()
    return (None, reasons) if reasons else (fused, [])


def _to_plain(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, (FusedBlockMixin, preact.PreActBlockMixin)):
        return None
    source = module.__dict__.get(_SOURCE_ATTR)
    if source is not None:
        plain = copy.copy(source)
        plain.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in source.__dict__.items()})
        for name in module.shared_module_names():
            setattr(plain, name, getattr(module, name))
        plain.training = module.training  # not .train(): that would reset each BN's own mode
        return plain
    cls = _FUSED_TO_TORCHVISION.get(type(module))
    if cls is None:
        return None
    plain = cls.__new__(cls)
    state = _copy_module_dict(module)
    for attr in _FUSED_ATTRS:
        state.pop(attr, None)
    plain.__dict__.update(state)
    return plain


def _replace_blocks(model: nn.Module, swap) -> tuple[nn.Module, list[str]]:
    root, reasons = swap(model)
    if root is not None:
        return root, []
    if reasons:
        return model, [f"<root>: {'; '.join(reasons)}"]
    skipped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new, reasons = swap(child)
            if new is not None:
                setattr(parent, child_name, new)
            elif reasons:
                full_name = f"{parent_name}.{child_name}" if parent_name else child_name
                skipped.append(f"{full_name}: {'; '.join(reasons)}")
    return model, skipped


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the nn.SyncBatchNorm process groups (which cannot be copied)."""
    groups = {id(m.process_group): m.process_group for m in model.modules()
              if isinstance(m, nn.SyncBatchNorm) and m.process_group is not None}
    return copy.deepcopy(model, memo=groups)


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every torchvision / timm BasicBlock and Bottleneck, and every timm pre-activation
    block (`resnetv2_*`: PreActBasic, PreActBottleneck), in `model` with a fused block, and
    fuse the stem (conv1 + bn1 + ReLU) of a torchvision or timm ResNet (fusedres.stem).

    The fused blocks share the original parameters and buffers. With `inplace=False`
    (the default) `model` is deep-copied first and left untouched (nn.SyncBatchNorm process
    groups are shared, not copied). Blocks whose BNs are nn.SyncBatchNorm are fused too, their
    train-mode statistics reduced over the BN's process group (`fusedres.sync_bn`).
    """
    check_backend_name(backend)
    if not inplace:
        model = _copy(model)
    model, skipped = _replace_blocks(model, lambda m: _to_fused(m, backend))
    for module in model.modules():
        fuse_stem(module, backend)
    if skipped:
        warnings.warn(f"fusedres.convert left {len(skipped)} block(s) unfused: " + " | ".join(skipped),
                      RuntimeWarning, stacklevel=2)
    return model


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fused block with the plain torchvision (or original timm) block (a block
    that has none, fusedres.PlainBlock, a PreAct block not made from timm's, stays)."""
    if not inplace:
        model = _copy(model)
    for module in model.modules():
        unfuse_stem(module)
    model, _ = _replace_blocks(model, lambda m: (_to_plain(m), []))
    return model
