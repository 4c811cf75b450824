"""fusedres::conv_bn_stats: one train-mode convolution of a block, with its BN statistics.

(y, mean, var) = conv(P(x), weight), batch statistics of y; P = relu?(x*in_scale+in_shift)
applies the previous BatchNorm while the conv loads its input. Semantics:
`fusedres.reference.conv_bn_stats`.

Backward saves only x, the weight, the raw conv output y and the mean (no normalised
activation): the statistics' gradient is folded into dy, the prologue is recomputed for
the weight gradient (one cheap elementwise pass), its ReLU mask comes from the recomputed
pre-activation, and dgrad/wgrad run through ATen's convolution_backward.
"""

from typing import Optional

import torch

from fusedres import reference
from fusedres.backends import select_backend
from fusedres.ops.conv import _conv_output_size


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


@torch.library.custom_op("fusedres::conv_bn_stats", mutates_args=())
def conv_bn_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_scale: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    prologue_relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(backend, "conv_bn_stats", (x, weight, in_scale, in_shift))
    y, mean, var = impl.conv_bn_stats(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation,
                                      groups)
    return y, mean, var


@conv_bn_stats.register_fake
def _(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, backend):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    shape = (n, weight.shape[0], _conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
             _conv_output_size(w, kw, stride[1], padding[1], dilation[1]))
    y = x.new_empty(shape).contiguous(memory_format=reference.conv_output_memory_format(x, weight))
    acc = reference.accumulation_dtype(x.dtype)
    return y, x.new_empty(weight.shape[0], dtype=acc), x.new_empty(weight.shape[0], dtype=acc)


def _setup_context(ctx, inputs, output):
    x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, _backend = inputs
    y, mean, _var = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y, mean)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.prologue_relu = prologue_relu


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    needs = ctx.needs_input_grad
    acc = mean.dtype
    # 1/count as a 0-d tensor: a Python float made from symbolic sizes trips AOT autograd's
    # dynamic-shape tracing when the sizes are those of an output (torch 2.14).
    count = torch.full((), y.numel() // y.shape[1], dtype=acc, device=y.device)
    # The statistics' gradient joins the conv output's: one tensor for convolution_backward.
    g = torch.zeros((), dtype=acc, device=y.device) if grad_y is None else grad_y.to(acc)
    if grad_mean is not None:
        g = g + _channel_view(grad_mean.to(acc)) / count
    if grad_var is not None:
        g = g + (y.to(acc) - _channel_view(mean)) * _channel_view(grad_var.to(acc)) * (2 / count)
    g = g.expand(y.shape).to(y.dtype).contiguous(memory_format=reference.suggest_memory_format(y))

    has_prologue = in_scale is not None
    a = reference.prologue(x, in_scale, in_shift, ctx.prologue_relu) if has_prologue else x
    want_input = needs[0] or (has_prologue and (needs[2] or needs[3]))
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        g, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [want_input, needs[1], False])
    grad_x = grad_scale = grad_shift = None
    if grad_a is not None and not has_prologue:
        grad_x = grad_a
    elif grad_a is not None:
        ga = grad_a.to(acc)
        if ctx.prologue_relu:
            pre = x.to(acc) * _channel_view(in_scale.to(acc)) + _channel_view(in_shift.to(acc))
            ga = ga.masked_fill(pre <= 0, 0)
        dims = (0, 2, 3)
        if needs[0]:
            grad_x = (ga * _channel_view(in_scale.to(acc))).to(x.dtype)
            grad_x = grad_x.contiguous(memory_format=reference.suggest_memory_format(x))
        if needs[2]:
            grad_scale = (ga * x.to(acc)).sum(dim=dims).to(in_scale.dtype)
        if needs[3]:
            grad_shift = ga.sum(dim=dims).to(in_shift.dtype)
    return grad_x, grad_w, grad_scale, grad_shift, None, None, None, None, None, None


conv_bn_stats.register_autograd(_backward, setup_context=_setup_context)
