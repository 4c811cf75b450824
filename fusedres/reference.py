"""Reference semantics of every fusedres op, in plain PyTorch.

Each function here *defines* what the op of the same name computes. The `torch`
backend runs these (with a faster CPU path where oneDNN offers one), the tests
compare every backend against them, and later Triton/CUDA kernels must match them.

Conventions shared by all ops:

* Activations are 4-D (N, C, H, W); any memory format. Outputs take the memory format
  PyTorch's own convolution would give (see `conv_output_memory_format`).
* Elementwise epilogues are computed in `accumulation_dtype` (float32, or float64 for
  float64 inputs) and cast to the activation dtype once, at the end.
* Batch statistics are per channel over (N, H, W): the mean and the *biased* variance,
  returned in `accumulation_dtype`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """ATen's Tensor::suggest_memory_format for 4-D tensors (is_channels_last_strides_2d)."""
    if t.dim() != 4:
        return torch.contiguous_format
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return torch.contiguous_format
        if d == 0 and smallest == strides[1]:
            return torch.contiguous_format
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return torch.channels_last


def conv_output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format ATen's convolution picks: channels_last if input or weight is."""
    if torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    shortcut_x: torch.Tensor | None,
    shortcut_weight: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shortcut_stride: list[int],
    relu: bool,
) -> torch.Tensor:
    """act(conv(x, weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)).

    This is one eval-mode convolution with its BatchNorm folded into `weight` and `bias`.
    `residual` is an identity shortcut; `shortcut_x`/`shortcut_weight` is a projection
    shortcut (1x1 conv, stride `shortcut_stride`, no padding) whose folded BN shift is
    already part of `bias`. At most one of the two shortcut forms is given.
    """
    acc = accumulation_dtype(x.dtype)
    out = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
    if bias is not None:
        out = out + _channel_view(bias.to(acc))
    if residual is not None:
        out = out + residual.to(acc)
    if shortcut_x is not None:
        assert shortcut_weight is not None
        out = out + F.conv2d(shortcut_x, shortcut_weight, None, shortcut_stride).to(acc)
    if relu:
        out = torch.relu(out)
    return out.to(x.dtype).contiguous(memory_format=conv_output_memory_format(x, weight))


def bn_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), in accumulation dtype.

    Two-pass (mean first, then the mean of squared deviations) so that large means do
    not cancel catastrophically, as E[y^2] - E[y]^2 would.
    """
    y = y.to(accumulation_dtype(y.dtype))
    mean = y.mean(dim=(0, 2, 3))
    var = (y - _channel_view(mean)).square().mean(dim=(0, 2, 3))
    return mean, var


def scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    residual_scale: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """act(y*scale + bias + r), with r = residual*residual_scale + residual_bias when a
    residual scale is given (the projection shortcut's own BN) and r = residual otherwise.

    This is train-mode BatchNorm applied to a conv output (`scale`, `bias` come from the
    batch statistics), plus the block's residual add and ReLU: the block tail.
    """
    acc = accumulation_dtype(y.dtype)
    out = y.to(acc) * _channel_view(scale.to(acc)) + _channel_view(bias.to(acc))
    if residual is not None:
        r = residual.to(acc)
        if residual_scale is not None:
            assert residual_bias is not None
            r = r * _channel_view(residual_scale.to(acc)) + _channel_view(residual_bias.to(acc))
        out = out + r
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype).contiguous(memory_format=suggest_memory_format(y))


def prologue(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    """relu?(x*scale + shift) per channel in accumulation dtype, cast to x.dtype: a BatchNorm
    (with statistics already turned into scale and shift) applied while loading a conv input."""
    acc = accumulation_dtype(x.dtype)
    a = x.to(acc) * _channel_view(scale.to(acc)) + _channel_view(shift.to(acc))
    if relu:
        a = torch.relu(a)
    return a.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))


def conv_bn_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    prologue_relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv(P(x), weight) and the batch statistics of y (see `bn_stats`).

    P is the previous BatchNorm (+ ReLU) as a `prologue` when `in_scale`/`in_shift` are
    given, else the identity; the conv pads P(x) with zeros. This is one train-mode
    conv of a block: the normalised input is never materialised, and the statistics the
    next BatchNorm needs come out with the conv output (the cuDNN "genstats" scheme).
    """
    a = x if in_scale is None else prologue(x, in_scale, in_shift, prologue_relu)
    y = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    y = y.contiguous(memory_format=conv_output_memory_format(x, weight))
    mean, var = bn_stats(y)
    return y, mean, var


def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm into the preceding conv: returns (weight, bias).

    bn(conv(x) + b) = conv(x) * s + (b - mean) * s + beta with s = gamma / sqrt(var + eps).
    Computed in float32 (float64 for float64 weights) and returned in that dtype; callers
    cast to the compute dtype afterwards, so low-precision models fold without rounding
    the scale twice.
    """
    acc = accumulation_dtype(conv_weight.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc)
    if conv_bias is not None:
        shift = shift + conv_bias.to(acc)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    weight = conv_weight.to(acc) * scale.reshape(-1, 1, 1, 1)
    weight = weight.contiguous(memory_format=suggest_memory_format(conv_weight))
    return weight, shift
