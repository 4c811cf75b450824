"""The CIFAR-10 networks of "Deep Residual Learning for Image Recognition" (He et al. 2016,
sec. 4.2), built from fused blocks: ResNet-20/32/44/56/110 and their plain twins; and the
pre-activation ResNet-110 and ResNet-164 of "Identity Mappings in Deep Residual Networks"
(He et al. 2016, sec. 4 and Table 3).

A 3x3 convolution to 16 channels (BN, ReLU), three stages of n blocks at 16, 32 and 64
channels on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 at stride 2),
global average pooling and a 10-way fully connected layer: 6n + 2 weighted layers. The
residual networks use the parameter-free option-A shortcut (`fusedres.shortcuts`), as the
paper's CIFAR experiments do; the plain networks (`fusedres.PlainBlock`) have the same
layers and no shortcut. Weights: He (Kaiming) normal initialisation for the convolutions,
BN weight 1 and bias 0, PyTorch's default for the linear layer.

The stem runs as its modules (conv1, bn1, relu): one layer of 6n + 2.

Pre-activation networks (`CifarPreActResNet`): conv1 (3x3, 16 channels, no BN), three
stages of n pre-activation blocks (`fusedres.preact`: basic blocks at 16/32/64 channels, or
bottlenecks at 64/128/256 out of 16/32/64 wide), a final BN + ReLU (`norm`), average
pooling, fc. A stage's first block projects (1x1 conv of its pre-activated input) where
the shape changes. Unlike the paper, which shares conv1's activation with the first block,
every block has its own norm1 (as timm's ResNetV2).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres.backends import check_backend_name
from fusedres.blocks import BasicBlock, PlainBlock
from fusedres.preact import BatchNormReLU, PreActBasicBlock, PreActBottleneck

WIDTHS = (16, 32, 64)


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal convolutions, BN weight 1 and bias 0 (the linear layers keep PyTorch's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """conv1/bn1/relu, layer1..layer3 (n blocks each), avgpool, fc: see the module doc."""

    def __init__(self, n: int, *, plain: bool = False, num_classes: int = 10, backend: str = "auto") -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"CifarResNet: n (blocks per stage) must be at least 1, got {n}")
        check_backend_name(backend)
        self.depth = 6 * n + 2
        self.plain = plain
        self.conv1 = nn.Conv2d(3, WIDTHS[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if plain:
                    blocks.append(PlainBlock(inplanes, width, stride, backend=backend))
                else:
                    blocks.append(BasicBlock(inplanes, width, stride, backend=backend, shortcut="A"))
                inplanes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, plain={self.plain}"


class CifarPreActResNet(nn.Module):
    """conv1, layer1..layer3 (n pre-activation blocks each), norm, avgpool, fc: see the module doc."""

    def __init__(self, n: int, *, bottleneck: bool = False, num_classes: int = 10, backend: str = "auto") -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"CifarPreActResNet: n (blocks per stage) must be at least 1, got {n}")
        check_backend_name(backend)
        block, expansion = (PreActBottleneck, 4) if bottleneck else (PreActBasicBlock, 1)
        self.depth = (9 if bottleneck else 6) * n + 2
        self.conv1 = nn.Conv2d(3, WIDTHS[0], kernel_size=3, padding=1, bias=False)
        in_chs = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            out_chs = width * expansion
            blocks = [block(in_chs if j == 0 else out_chs, out_chs, stride=2 if i > 0 and j == 0 else 1,
                            backend=backend) for j in range(n)]
            in_chs = out_chs
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.norm = BatchNormReLU(in_chs)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.norm(x)), 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}"
