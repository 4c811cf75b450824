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
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(conv(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)),
    P(x) = prologue(x, in_scale, in_shift, relu=True) when they are given (a pre-activation
    block's BN + ReLU of the conv input), else x.

    This is one eval-mode convolution with its BatchNorm folded into `weight` and `bias`.
    `residual` is an identity shortcut; `shortcut_x`/`shortcut_weight` is a projection
    shortcut (1x1 conv, stride `shortcut_stride`, no padding) whose folded BN shift is
    already part of `bias`; `shortcut_x` without `shortcut_weight` is the option-A shortcut
    (`zero_pad_shortcut(shortcut_x, out_channels, stride)`). At most one shortcut form is given.
    """
    if in_scale is not None:
        x = prologue(x, in_scale, in_shift, True)
    acc = accumulation_dtype(x.dtype)
    out = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
    if bias is not None:
        out = out + _channel_view(bias.to(acc))
    if residual is not None:
        out = out + residual.to(acc)
    if shortcut_x is not None and shortcut_weight is None:  # option A: zero-padded identity
        out = out + zero_pad_shortcut(shortcut_x, out.shape[1], shortcut_stride).to(acc)
    elif shortcut_x is not None:
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
    batch statistics), plus the block's residual add and ReLU: the block tail. Without a
    residual scale the residual may have fewer channels than y: it is added to the first
    ones and the rest get 0 (the option-A shortcut, given as the subsampled view
    `x[:, :, ::s, ::s]` of the block input: no zero-padded tensor is made).
    """
    acc = accumulation_dtype(y.dtype)
    out = y.to(acc) * _channel_view(scale.to(acc)) + _channel_view(bias.to(acc))
    if residual is not None:
        r = residual.to(acc)
        if residual_scale is not None:
            assert residual_bias is not None
            r = r * _channel_view(residual_scale.to(acc)) + _channel_view(residual_bias.to(acc))
        if r.shape[1] < out.shape[1]:
            out[:, :r.shape[1]] += r  # out is this function's own fresh tensor
        else:
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
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv(P(x), weight) (+ residual) and the batch statistics of y (see
    `bn_stats`).

    P is the previous BatchNorm (+ ReLU) as a `prologue` when `in_scale`/`in_shift` are
    given, else the identity; the conv pads P(x) with zeros. This is one train-mode
    conv of a block: the normalised input is never materialised, and the statistics the
    next BatchNorm needs come out with the conv output (the cuDNN "genstats" scheme). A
    residual (of y's shape) is added in the accumulation dtype before y is rounded: a
    pre-activation block's last conv and shortcut, whose sum's statistics are the next
    block's first BN's.
    """
    a = x if in_scale is None else prologue(x, in_scale, in_shift, prologue_relu)
    y = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    if residual is not None:
        acc = accumulation_dtype(y.dtype)
        y = (y.to(acc) + residual.to(acc)).to(y.dtype)
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


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """One spatial side of a convolution's output, as ATen computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# ---------------------------------------------------------------------------------------
# Train-mode BatchNorm: finalize and running statistics (the forward of the per-channel math).

def bn_finalize(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a train-mode BatchNorm from its batch statistics: weight *
    rsqrt(var + eps) and bias - mean * scale, in the statistics' dtype; differentiable."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift


def zero_pad_shortcut(x: torch.Tensor, out_channels: int, stride: int | list[int]) -> torch.Tensor:
    """The CIFAR ResNets' option-A shortcut: x at the block's stride (an int, or (h, w)), its
    channels first and zeros after, up to out_channels."""
    s_h, s_w = (stride, stride) if isinstance(stride, int) else stride
    sub = x[:, :, ::s_h, ::s_w]
    return F.pad(sub, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


def bn_update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                            num_batches_tracked: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                            momentum: float | None, count: int | torch.Tensor) -> None:
    """nn.BatchNorm2d's update, in place: num_batches_tracked += 1, then (count > 0) the
    running mean and unbiased running variance move by momentum, or by 1 /
    num_batches_tracked when momentum is None (cumulative average). A tensor count (a
    synchronised BN's group count, 0-dim, at least 2) is used on the device, unread."""
    with torch.no_grad():
        num_batches_tracked.add_(1)
        if isinstance(count, int) and count == 0:
            return  # nn.BatchNorm2d leaves the running statistics alone for an empty batch
        factor = 1.0 / num_batches_tracked.to(torch.float64) if momentum is None else momentum
        unbiased_var = var * (count / (count - 1))
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(unbiased_var.to(running_var.dtype) * factor)


# ---------------------------------------------------------------------------------------
# Backward formulas: the one definition of these gradients, which every kernel must match
# (the backends' defaults run them; fusedres.ops' autograd calls the backend that ran the
# forward).

def conv_bn_stats_grad_y(grad_y: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor,
                         grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None) -> torch.Tensor:
    """The total gradient of y when (mean, biased var) = bn_stats(y) are outputs too:
    grad_y + grad_mean/count + (y - mean)*grad_var*2/count per channel (count = N*H*W; a
    None grad adds nothing, so grad_y=None is bn_stats' own backward), computed in mean's
    dtype (the accumulation dtype), returned in y's dtype and memory format."""
    acc = mean.dtype
    # 1/count as a 0-d tensor: a Python float made from symbolic sizes trips AOT
    # autograd's dynamic-shape tracing when the sizes are those of an op's output.
    count = torch.full((), y.numel() // y.shape[1], dtype=acc, device=y.device)
    g = torch.zeros((), dtype=acc, device=y.device) if grad_y is None else grad_y.to(acc)
    if grad_mean is not None:
        g = g + _channel_view(grad_mean.to(acc)) / count
    if grad_var is not None:
        g = g + (y.to(acc) - _channel_view(mean)) * _channel_view(grad_var.to(acc)) * (2 / count)
    return g.expand(y.shape).to(y.dtype).contiguous(memory_format=suggest_memory_format(y))


def prologue_backward(grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      relu: bool, needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(dx, dscale, dshift) of a = prologue(x, scale, shift, relu) given da: the ReLU mask
    from the recomputed pre-activation, dx = da*scale (x's dtype and memory format), dscale
    = sum da*x and dshift = sum da per channel (accumulation dtype). `needs` says which of
    the three are wanted; the others are None."""
    acc = accumulation_dtype(x.dtype)
    ga = grad_a.to(acc)
    if relu:
        pre = x.to(acc) * _channel_view(scale.to(acc)) + _channel_view(shift.to(acc))
        ga = ga.masked_fill(pre <= 0, 0)
    dims = (0, 2, 3)
    dx = dscale = dshift = None
    if needs[0]:
        dx = (ga * _channel_view(scale.to(acc))).to(x.dtype).contiguous(memory_format=suggest_memory_format(x))
    if needs[1]:
        dscale = (ga * x.to(acc)).sum(dim=dims)
    if needs[2]:
        dshift = ga.sum(dim=dims)
    return dx, dscale, dshift


def scale_bias_act_backward(grad: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor, scale: torch.Tensor,
                            residual: torch.Tensor | None, residual_scale: torch.Tensor | None,
                            needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """(dy, dscale, dbias, dresidual, dresidual_scale, dresidual_bias) of `scale_bias_act`,
    given the saved forward output `out` when it applied ReLU (else None) and `needs`,
    which of its first six inputs want a gradient.

    g = grad masked where out <= 0 (a NaN output passes its gradient), in the accumulation
    dtype; dy = g*scale (y's dtype and memory format), dresidual = g, or g*residual_scale
    for a projection shortcut (residual's dtype and memory format); per channel over
    (N, H, W), in the accumulation dtype (the op casts each to its input's dtype): dscale =
    sum g*y, dbias = dresidual_bias = sum g, dresidual_scale = sum g*residual. None for what
    is not needed, and for a residual's (scale's) grads without a residual (scale). A
    residual with fewer channels than y gets the first channels of g.
    """
    acc = accumulation_dtype(y.dtype)
    g = (grad.masked_fill(out <= 0, 0) if out is not None else grad).to(acc)
    dims = (0, 2, 3)
    grads: list[torch.Tensor | None] = [None] * 6
    if needs[0]:
        grads[0] = (g * _channel_view(scale.to(acc))).to(y.dtype).contiguous(memory_format=suggest_memory_format(y))
    if needs[1]:
        grads[1] = (g * y.to(acc)).sum(dim=dims)
    if needs[2]:
        grads[2] = g.sum(dim=dims)
    if residual is not None:
        if needs[3]:
            dres = g if residual_scale is None else g * _channel_view(residual_scale.to(acc))
            dres = dres[:, :residual.shape[1]]  # a narrower (option-A) residual met only the first channels
            grads[3] = dres.to(residual.dtype).contiguous(memory_format=suggest_memory_format(residual))
        if residual_scale is not None and needs[4]:
            grads[4] = (g * residual.to(acc)).sum(dim=dims)
        if residual_scale is not None and needs[5]:
            grads[5] = g.sum(dim=dims)
    return tuple(grads)
