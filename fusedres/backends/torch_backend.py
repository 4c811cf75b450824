"""The `torch` backend: the reference semantics, on every device.

On the CPU, eval-mode convolutions use oneDNN's fused convolution with post-ops
(`torch.ops.mkldnn._convolution_pointwise`: bias + ReLU, and its `.binary` form:
bias + residual add + ReLU) where this PyTorch build exposes them for the dtype;
everything else runs `fusedres.reference` as written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedres import reference
from fusedres.backends.base import Backend


def _mkldnn_pointwise_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_convolution_pointwise")
        and "binary" in mkldnn._convolution_pointwise.overloads()
    )


_MKLDNN_POINTWISE = _mkldnn_pointwise_available()


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """One summing pass per tensor: a NaN or an Inf anywhere makes the sum non-finite.
    (A finite tensor whose sum overflows reads as non-finite too: that only costs the
    slower path, never a wrong answer.)"""
    return all(t is None or bool(torch.isfinite(t.sum())) for t in tensors)


def _use_mkldnn(x: torch.Tensor, weight: torch.Tensor, relu: bool, *others: torch.Tensor | None) -> bool:
    if not (
        _MKLDNN_POINTWISE
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
    ):
        return False
    # oneDNN's fused ReLU maps NaN to 0 where torch.relu keeps it: inputs with NaN or Inf
    # (which can make NaN inside the conv) take the reference path, so NaN propagates.
    return not relu or _all_finite(x, weight, *others)


def _mkldnn_conv(x, weight, bias, stride, padding, dilation, groups, relu, other=None):
    pointwise = torch.ops.mkldnn._convolution_pointwise
    if other is None:
        return pointwise(x, weight, bias, padding, stride, dilation, groups,
                         "relu" if relu else "none", [], "")
    return pointwise.binary(x, other, weight, bias, padding, stride, dilation, groups,
                            "add", 1.0, "relu" if relu else None, [], "")


class TorchBackend(Backend):
    name = "torch"

    def device_types(self) -> tuple[str, ...]:
        return ("*",)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> list[str]:
        return []

    def conv_bias_act(self, x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding,
                      dilation, groups, shortcut_stride, relu):
        if not _use_mkldnn(x, weight, relu, residual, shortcut_x, shortcut_weight):
            return reference.conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride,
                                           padding, dilation, groups, shortcut_stride, relu)
        memory_format = reference.conv_output_memory_format(x, weight)
        bias = None if bias is None else bias.to(torch.float32)
        if shortcut_x is not None:
            # The projection shortcut becomes the residual that the main conv adds in its post-op.
            residual = _mkldnn_conv(shortcut_x.to(torch.float32), shortcut_weight.to(torch.float32), None,
                                    shortcut_stride, [0, 0], [1, 1], 1, False)
        if residual is None:
            out = _mkldnn_conv(x, weight, bias, stride, padding, dilation, groups, relu)
        else:
            residual = residual.to(torch.float32).contiguous(memory_format=memory_format)
            out = _mkldnn_conv(x, weight, bias, stride, padding, dilation, groups, relu, residual)
        return out.contiguous(memory_format=memory_format)

    def bn_stats(self, y):
        return reference.bn_stats(y)

    def scale_bias_act(self, y, scale, bias, residual, residual_scale, residual_bias, relu):
        return reference.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu)
