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
* batch statistics (training): conv1, bn1 and the ReLU modules as they are; an
  nn.SyncBatchNorm bn1: conv1, then its statistics (reduced over its process group,
  `fusedres.sync_bn`) and one `scale_bias_act` (BN + ReLU).

Forward hooks on conv1, bn1 and the ReLU do not fire on the fused paths, as on a fused
block's own convolutions.

On the CPU plan the stem's NaN/Inf bound (fusedres.finite_guard: one reading pass of the
image) is handed from block to block through layer1..layer4 (`_layers`), so the guard
reads an activation again only where a chained bound has grown too loose; that needs each
layer to be a hook-free Sequential of fused blocks (else the layers are called as usual).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from fusedres import capture, cpu_plan, finite_guard, ops
from fusedres.backends import resolve_backend_name
from fusedres.batchnorm import batch_norm_scale_bias
from fusedres.folding import FoldCache, cache_key, fold, uses_batch_stats

BACKEND_ATTR = "_fusedres_backend"  # the backend convert() was given
CACHE_ATTR = "_fusedres_stem_cache"
_TIMM_MODULE = "timm.models.resnet"


def _stem_modules(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module] | None:
    act = getattr(model, "relu", None) if isinstance(model, tv_resnet.ResNet) else getattr(model, "act1", None)
    conv, bn = getattr(model, "conv1", None), getattr(model, "bn1", None)
    if type(conv) is not nn.Conv2d or type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d) or (
            type(act) is not nn.ReLU):
        return None  # e.g. timm's deep stems (conv1 is a Sequential)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return conv, bn, act


def _fused_stem(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """relu(bn1(conv1(x))), fused where the module doc says, and a bound on it (or None)."""
    conv, bn, act = _stem_modules(model)
    if not isinstance(x, torch.Tensor) or capture.onnx_exporting():
        return act(bn(conv(x))), None  # torch.fx or ONNX: the three modules, as the original model's trace has them
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64
    if type(bn) is nn.SyncBatchNorm and uses_batch_stats(bn):
        # nn.SyncBatchNorm's own forward refuses CPU tensors once torch.distributed is up
        return _synced_stem(model, conv, bn, x), None
    if uses_batch_stats(bn) or x.dim() != 4 or (
            x.dtype != conv.weight.dtype and not autocast) or x.device != conv.weight.device:
        return act(bn(conv(x))), None  # training, or an input PyTorch's own error messages should name
    backend = resolve_backend_name(model.__dict__.get(BACKEND_ATTR, "auto"))
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    cache = model.__dict__.get(CACHE_ATTR)
    if cache is None:
        cache = model.__dict__[CACHE_ATTR] = FoldCache()
    if not autocast and cpu_plan.applies(x, backend, dtype, (conv, bn)):
        out, bound = _planned(cache, conv, bn, x)
        if out is not None:
            return out, bound
    weight, bias = cache.folded("conv1", conv, bn, dtype)
    return ops.conv_bias_act(x.to(dtype), weight, bias, None, None, None, list(conv.stride), list(conv.padding),
                             list(conv.dilation), conv.groups, [1, 1], True, backend), None


def _synced_stem(model: nn.Module, conv: nn.Conv2d, bn: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """relu(bn1(conv1(x))) with bn1's batch statistics, reduced over its process group when
    it has more than one rank (fusedres.sync_bn)."""
    backend = resolve_backend_name(model.__dict__.get(BACKEND_ATTR, "auto"))
    y = conv(x)
    scale, bias = batch_norm_scale_bias(y, bn, backend, "the stem's bn1: ")
    return ops.scale_bias_act(y, scale, bias, None, None, None, True, backend)


def _planned(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d,
             x: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
    key = cache_key(conv, bn, x.dtype)
    if key is None:
        return None, None
    entry = cache.plan
    if entry is None or entry[0] != key:
        entry = cache.plan = (key, cpu_plan.packed_conv(conv, *fold(conv, bn, x.dtype)))
    packed = entry[1]
    bound = None
    if finite_guard.checks_enabled():
        bound = packed.bound(finite_guard.max_abs(x))
        if not bound < finite_guard.limit(x.dtype):
            return None, None
    return packed(x.contiguous(memory_format=torch.channels_last), relu=True), bound


def _pool(model: nn.Module, x: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, float | None]:
    """The stem's max pool, and its bound (a max pool never raises |x|)."""
    out = model.maxpool(x)
    return out, (bound if type(model.maxpool) is nn.MaxPool2d else None)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hook_free(module: nn.Module) -> bool:
    """No hook can see or change what this module gets or returns."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _chainable(layer: nn.Module) -> bool:
    """A Sequential of fused blocks that can be run block by block with bounds passed along:
    no hooks anywhere (a hook could change a tensor between blocks)."""
    from fusedres.blocks import FusedBlockMixin

    if type(layer) is not nn.Sequential or not _hook_free(layer):
        return False
    return all(isinstance(b, FusedBlockMixin) and _hook_free(b) for b in layer)


def _layers(layers: tuple[nn.Module, ...], x: torch.Tensor, bound: float | None) -> torch.Tensor:
    """layer4(layer3(layer2(layer1(x)))): on the CPU plan, block by block with each block's
    output bound handed to the next, so the NaN/Inf guard reads an activation only where a
    chained bound grows too loose (under inference_mode too, where tensors cannot carry one)."""
    global_hooks = any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)
    if bound is None or global_hooks or torch.compiler.is_compiling():
        for layer in layers:
            x = layer(x)
        return x
    for layer in layers:
        if not _chainable(layer):
            x, bound = layer(x), None
            continue
        for block in layer:
            x, bound = block.forward_with_bound(x, bound)
    return x


class FusedResNet(tv_resnet.ResNet):
    """torchvision.models.ResNet with its stem fused (fusedres.stem); made by convert()."""

    def __prepare_scriptable__(self) -> nn.Module:
        capture.refuse_scripting(self)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = _layers((self.layer1, self.layer2, self.layer3, self.layer4), *_pool(self, *_fused_stem(self, x)))
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

            def __prepare_scriptable__(self) -> nn.Module:
                capture.refuse_scripting(self)

            def forward_features(self, x: torch.Tensor) -> torch.Tensor:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    return super().forward_features(x)
                layers = (self.layer1, self.layer2, self.layer3, self.layer4)
                return _layers(layers, *_pool(self, *_fused_stem(self, x)))

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
