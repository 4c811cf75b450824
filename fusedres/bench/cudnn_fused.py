"""Baseline: cuDNN's own per-convolution fusion after BN folding (inference only).

Every conv + BN (+ ReLU) becomes one `torch.cudnn_convolution_relu` call with the BN
folded into the weight and bias; a block's last conv also takes the shortcut through
`torch.cudnn_convolution_add_relu`. This is what a careful user gets from PyTorch and
cuDNN alone, without fusedres: the strongest non-compiler baseline on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet


def _conv_relu_reference(x, w, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def _conv_add_relu_reference(x, w, z, alpha, b, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)


class _FoldedConv:
    """A conv with its BN folded: weight and bias in the target dtype and memory format."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> None:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        self.weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
        self.bias = bias.to(dtype)
        self.args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)


class CudnnFusedResNet(nn.Module):
    """An eval-only copy of a torchvision ResNet running folded convs through cuDNN's fusions.

    `conv_relu` / `conv_add_relu` default to the cuDNN ops; tests pass plain-PyTorch
    equivalents to check the folding on a CPU.
    """

    def __init__(self, model: tv_resnet.ResNet, dtype: torch.dtype,
                 conv_relu: Callable | None = None, conv_add_relu: Callable | None = None) -> None:
        super().__init__()
        self.conv_relu = conv_relu or torch.cudnn_convolution_relu
        self.conv_add_relu = conv_add_relu or torch.cudnn_convolution_add_relu
        self.dtype = dtype
        with torch.no_grad():
            self.stem = _FoldedConv(model.conv1, model.bn1, dtype)
            self.maxpool = model.maxpool
            self.blocks = [self._fold_block(b) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                           for b in layer]
            self.fc_weight = model.fc.weight.detach().to(dtype)
            self.fc_bias = model.fc.bias.detach().to(dtype)

    def _fold_block(self, block: nn.Module) -> tuple[list[_FoldedConv], _FoldedConv | None]:
        if isinstance(block, tv_resnet.Bottleneck):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
        elif isinstance(block, tv_resnet.BasicBlock):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        else:
            raise TypeError(f"cuDNN baseline: unsupported block {type(block).__name__}")
        downsample = None
        if block.downsample is not None:
            conv, bn = block.downsample
            downsample = _FoldedConv(conv, bn, self.dtype)
        return [_FoldedConv(c, b, self.dtype) for c, b in pairs], downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.conv_relu(x, self.stem.weight, self.stem.bias, *self.stem.args))
        for convs, downsample in self.blocks:
            identity = x
            if downsample is not None:
                identity = F.conv2d(x, downsample.weight, downsample.bias, *downsample.args)
            out = x
            for conv in convs[:-1]:
                out = self.conv_relu(out, conv.weight, conv.bias, *conv.args)
            last = convs[-1]
            x = self.conv_add_relu(out, last.weight, identity, 1.0, last.bias, *last.args)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.fc_weight, self.fc_bias)


def reference_ops() -> dict[str, Callable]:
    """Plain-PyTorch stand-ins for the cuDNN ops (same signatures), for CPU tests."""
    return {"conv_relu": _conv_relu_reference, "conv_add_relu": _conv_add_relu_reference}


__all__ = ["CudnnFusedResNet", "reference_ops"]
