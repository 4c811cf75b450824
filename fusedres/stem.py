"""The fused stem: conv 7x7 + BN + ReLU of a torchvision or timm ResNet as one convolution.

`convert()` gives a torchvision `ResNet` (or a timm `ResNet` with a plain 7x7 stem) the
class here that subclasses it and overrides only the forward: no module is added, moved
or renamed, so parameters, buffers and state_dict keys are the model's own, and
`revert()` gives the original class back. The stem then runs, as the blocks do:

* eval mode on the CPU (autograd off, not compiling): BN folded and the weight prepacked
  once per fold (`fusedres.cpu_plan`), one oneDNN convolution with bias + ReLU, in
  channels_last (an NCHW image is converted once here, and the network stays channels_last
  from then on: the logits are the same, intermediate layouts are not);
* running statistics elsewhere: `fusedres.ops.conv_bias_act` with the folded weight;
* batch statistics (training): conv1, bn1 and the ReLU modules as they are.

Forward hooks on conv1, bn1 and the ReLU do not fire on the fused paths, as on a fused
block's own convolutions.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from fusedres import cpu_plan, finite_guard, ops
from fusedres.backends import resolve_backend_name
from fusedres.folding import FoldCache, cache_key, fold, uses_batch_stats

BACKEND_ATTR = "_fusedres_backend"  # the backend convert() was given
CACHE_ATTR = "_fusedres_stem_cache"
_TIMM_MODULE = "timm.models.resnet"


def _stem_modules(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module] | None:
    act = getattr(model, "relu", None) if isinstance(model, tv_resnet.ResNet) else getattr(model, "act1", None)
    conv, bn = getattr(model, "conv1", None), getattr(model, "bn1", None)
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or type(act) is not nn.ReLU:
        return None  # e.g. timm's deep stems (conv1 is a Sequential)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return conv, bn, act


def _fused_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(bn1(conv1(x))), fused where the module doc says."""
    conv, bn, act = _stem_modules(model)
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    if uses_batch_stats(bn) or not isinstance(x, torch.Tensor) or x.dim() != 4 or (
            x.dtype != conv.weight.dtype and not autocast) or x.device != conv.weight.device:
        return act(bn(conv(x)))  # training, or an input PyTorch's own error messages should name
    backend = resolve_backend_name(model.__dict__.get(BACKEND_ATTR, "auto"))
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    cache = model.__dict__.get(CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[CACHE_ATTR] = FoldCache()
    if not autocast and cpu_plan.applies(x, backend, dtype):
        out = _planned(cache, conv, bn, x)
        if out is not None:
            return out
    weight, bias = cache.folded("conv1", conv, bn, dtype)
    return ops.conv_bias_act(x.to(dtype), weight, bias, None, None, None, list(conv.stride), list(conv.padding),
                             list(conv.dilation), conv.groups, [1, 1], True, backend)


def _planned(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor | None:
    key = cache_key(conv, bn, x.dtype)
    if key is None:
        return None
    entry = cache.plan
    if entry is None or entry[0] != key:
        entry = cache.plan = (key, cpu_plan.packed_conv(conv, *fold(conv, bn, x.dtype)))
    packed = entry[1]
    checking = finite_guard.checks_enabled()
    if checking:
        bound = packed.bound(finite_guard.max_abs(x))
        if not bound < finite_guard.limit(x.dtype):
            return None
    out = packed(x.contiguous(memory_format=torch.channels_last), relu=True)
    if checking:
        finite_guard.remember(out, bound)
    return out


def _pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stem's max pool, carrying the stem's bound (a max pool never raises |x|)."""
    if torch.compiler.is_compiling():
        return model.maxpool(x)
    known = finite_guard.known_bound(x)
    out = model.maxpool(x)
    if known is not None and type(model.maxpool) is nn.MaxPool2d:
        finite_guard.remember(out, known)
    return out


class FusedResNet(tv_resnet.ResNet):
    """torchvision.models.ResNet with its stem fused (fusedres.stem); made by convert()."""

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = _pool(self, _fused_stem(self, x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_timm_class: type | None = None


def _fused_timm_class() -> type:
    """FusedTimmResNet, defined on first use (timm is optional)."""
    global _timm_class
    if _timm_class is None:
        timm_resnet = sys.modules[_TIMM_MODULE]

        class FusedTimmResNet(timm_resnet.ResNet):
            """timm.models.resnet.ResNet with its stem fused (fusedres.stem); made by convert()."""

            def forward_features(self, x: torch.Tensor) -> torch.Tensor:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    return super().forward_features(x)
                x = _pool(self, _fused_stem(self, x))
                x = self.layer1(x)
                x = self.layer2(x)
                x = self.layer3(x)
                return self.layer4(x)

        FusedTimmResNet.__module__ = __name__
        _timm_class = FusedTimmResNet
    return _timm_class


def __getattr__(name: str) -> Any:  # lets pickle find FusedTimmResNet in a new process
    if name == "FusedTimmResNet":
        import timm.models.resnet  # noqa: F401

        return _fused_timm_class()
    raise AttributeError(name)


def fuse_stem(model: nn.Module, backend: str) -> bool:
    """Give `model` the fused-stem class when it is exactly a torchvision or timm ResNet with
    a plain conv/BN/ReLU stem; True if it did."""
    cls = type(model)
    if cls is tv_resnet.ResNet:
        fused = FusedResNet
    elif cls.__module__ == _TIMM_MODULE and cls.__name__ == "ResNet":
        fused = _fused_timm_class()
    else:
        return False
    if _stem_modules(model) is None:
        return False
    model.__class__ = fused
    model.__dict__[BACKEND_ATTR] = backend
    model.__dict__[CACHE_ATTR] = FoldCache()
    return True


def unfuse_stem(model: nn.Module) -> None:
    """Undo fuse_stem (no-op for any other model)."""
    if type(model) in (FusedResNet, _timm_class):
        model.__class__ = type(model).__mro__[1]
        model.__dict__.pop(BACKEND_ATTR, None)
        model.__dict__.pop(CACHE_ATTR, None)
