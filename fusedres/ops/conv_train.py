"""fusedres::conv_bn_stats: one train-mode convolution of a block, with its BN statistics.

(y, mean, var) = conv(P(x), weight), batch statistics of y; P = relu?(x*in_scale+in_shift)
applies the previous BatchNorm while the conv loads its input. Semantics:
`fusedres.reference.conv_bn_stats`.

Backward saves only x, the weight, the raw conv output y and the mean (no normalised
activation): the statistics' gradient is folded into dy, the prologue is recomputed for
the weight gradient (one cheap elementwise pass), its ReLU mask comes from the recomputed
pre-activation, and dgrad/wgrad run through the backend's `conv_backward` (ATen's
convolution_backward, or on the triton backend the faster of it and the Triton kernels,
measured per shape on a GPU).
"""

from typing import Optional

import torch

from fusedres import reference
from fusedres.backends import get_backend, select_backend
from fusedres.ops.conv import _conv_output_size


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
    x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, backend = inputs
    y, mean, _var = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y, mean)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.prologue_relu = prologue_relu
    # The backward's elementwise passes run on the backend that ran the forward.
    ctx.backend = select_backend(backend, "conv_bn_stats", (x, weight, in_scale, in_shift)).name


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    needs = ctx.needs_input_grad
    impl = get_backend(ctx.backend)
    # The statistics' gradient joins the conv output's: one tensor for convolution_backward.
    g = impl.conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)
    has_prologue = in_scale is not None
    a = impl.prologue(x, in_scale, in_shift, ctx.prologue_relu) if has_prologue else x
    want_input = needs[0] or (has_prologue and (needs[2] or needs[3]))
    grad_a, grad_w = impl.conv_backward(g, a, weight, stride, padding, dilation, groups, want_input, needs[1])
    grad_x = grad_scale = grad_shift = None
    if grad_a is not None and not has_prologue:
        grad_x = grad_a
    elif grad_a is not None:
        grad_x, grad_scale, grad_shift = impl.prologue_backward(grad_a, x, in_scale, in_shift, ctx.prologue_relu,
                                                                (needs[0], needs[2], needs[3]))
        grad_scale = None if grad_scale is None else grad_scale.to(in_scale.dtype)
        grad_shift = None if grad_shift is None else grad_shift.to(in_shift.dtype)
    return grad_x, grad_w, grad_scale, grad_shift, None, None, None, None, None, None


conv_bn_stats.register_autograd(_backward, setup_context=_setup_context)
