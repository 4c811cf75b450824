"""The parameter-free "option A" shortcut of the CIFAR ResNets (He et al. 2016, sec. 4.2).

Identity where the block keeps its shape; where it changes, the block input subsampled at
the block's stride, its channels followed by zero channels up to the block's output
channels (`fusedres.reference.zero_pad_shortcut`). A module, so that a block built with
`shortcut="A"` keeps torchvision's structure (`downsample` computes the shortcut) and
state_dict keys (it has no parameters or buffers).
"""

from __future__ import annotations

import torch
from torch import nn

from fusedres import reference


def check_option_a(in_channels: int, out_channels: int, stride: int, where: str) -> None:
    """Option A needs out_channels >= in_channels (it pads, never drops) and stride 1 or 2."""
    if out_channels < in_channels:
        raise ValueError(f"{where}: shortcut='A' pads the input's {in_channels} channels with zeros, so it needs "
                         f"out_channels >= in_channels; got out_channels={out_channels}")
    if stride not in (1, 2):
        raise ValueError(f"{where}: shortcut='A' supports stride 1 or 2, got stride={stride}")


class ZeroPadShortcut(nn.Module):
    """x[:, :, ::stride, ::stride] followed by out_channels - in_channels zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        check_option_a(in_channels, out_channels, stride, "ZeroPadShortcut")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.extra_repr()}: expects an input (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        return reference.zero_pad_shortcut(x, self.out_channels, self.stride)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"
