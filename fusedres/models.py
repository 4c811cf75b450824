"""ResNet constructors that mirror torchvision's, built from fused blocks and a fused stem;
and the CIFAR-10 networks of He et al. 2016 (`fusedres.cifar`).

Random initialisation only: nothing is downloaded. To use pretrained torchvision
weights, load them with `model.load_state_dict(...)` (the keys are identical), or call
`fusedres.convert` on a torchvision model.
"""

from __future__ import annotations

from typing import Any

from torchvision.models.resnet import ResNet

from fusedres.backends import check_backend_name
from fusedres.blocks import BasicBlock, Bottleneck, FusedBlockMixin
from fusedres.cifar import CifarPreActResNet, CifarResNet
from fusedres.stem import fuse_stem

__all__ = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    *(f"cifar_{kind}{depth}" for kind in ("resnet", "plain") for depth in (20, 32, 44, 56, 110)),
    "cifar_preact_resnet110", "cifar_preact_resnet164",
]


def _resnet(block: type, layers: list[int], backend: str, kwargs: dict[str, Any],
            **defaults: Any) -> ResNet:
    check_backend_name(backend)
    if "weights" in kwargs or "pretrained" in kwargs:
        raise TypeError("fusedres.models builds randomly initialised models; load torchvision weights with "
                        "model.load_state_dict(...) or use fusedres.convert(torchvision_model)")
    model = ResNet(block, layers, **{**defaults, **kwargs})
    for module in model.modules():
        if isinstance(module, FusedBlockMixin):
            module.backend = backend
    fuse_stem(model, backend)
    return model


def resnet18(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], backend, kwargs)


def resnet34(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], backend, kwargs)


def resnet50(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], backend, kwargs)


def resnet101(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], backend, kwargs)


def resnet152(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], backend, kwargs)


def resnext50_32x4d(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], backend, kwargs, groups=32, width_per_group=4)


def resnext101_32x8d(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], backend, kwargs, groups=32, width_per_group=8)


def wide_resnet50_2(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], backend, kwargs, width_per_group=128)


def wide_resnet101_2(*, backend: str = "auto", **kwargs: Any) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], backend, kwargs, width_per_group=128)


# The CIFAR networks: depth 6n + 2. ResNet: option-A shortcuts; plain: none.

def cifar_resnet20(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, backend=backend, num_classes=num_classes)


def cifar_resnet32(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(5, backend=backend, num_classes=num_classes)


def cifar_resnet44(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(7, backend=backend, num_classes=num_classes)


def cifar_resnet56(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(9, backend=backend, num_classes=num_classes)


def cifar_resnet110(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(18, backend=backend, num_classes=num_classes)


def cifar_plain20(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, plain=True, backend=backend, num_classes=num_classes)


def cifar_plain32(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(5, plain=True, backend=backend, num_classes=num_classes)


def cifar_plain44(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(7, plain=True, backend=backend, num_classes=num_classes)


def cifar_plain56(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(9, plain=True, backend=backend, num_classes=num_classes)


def cifar_plain110(*, backend: str = "auto", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(18, plain=True, backend=backend, num_classes=num_classes)


def cifar_preact_resnet110(*, backend: str = "auto", num_classes: int = 10) -> CifarPreActResNet:
    """Pre-activation ResNet-110: 18 basic blocks per stage."""
    return CifarPreActResNet(18, backend=backend, num_classes=num_classes)


def cifar_preact_resnet164(*, backend: str = "auto", num_classes: int = 10) -> CifarPreActResNet:
    """Pre-activation ResNet-164: 18 bottleneck blocks per stage."""
    return CifarPreActResNet(18, bottleneck=True, backend=backend, num_classes=num_classes)
