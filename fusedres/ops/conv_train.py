"""fusedres::conv_bn_stats: one train-mode convolution of a block, with its BN statistics.

(y, mean, var) = conv(P(x), weight) (+ residual), batch statistics of y; P =
relu?(x*in_scale+in_shift) applies the previous BatchNorm while the conv loads its input.
The residual is a pre-activation block's shortcut: the block's output and the statistics
its successor's first BN needs, in one pass. With a residual, y is a block's output (which
its user may change in place), so it is not saved: the statistics are then returned
without a gradient, and their consumer gives them one with `fusedres.ops.bn_stats_of(y,
mean, var)` (bn_stats' backward, saving y where that consumer needs it). Semantics:
`fusedres.reference.conv_bn_stats`. `conv_bn_stats` below chooses the backend once and
passes its name to the op; the backward runs on that backend.

Backward saves only x, the weight, the raw conv output y and the mean (no normalised
activation): the statistics' gradient is folded into dy, the prologue is recomputed for
the weight gradient (one cheap elementwise pass), its ReLU mask comes from the recomputed
pre-activation, and dgrad/wgrad run through the backend's `conv_backward` (ATen's
convolution_backward, or on the triton backend the faster of it and the Triton kernels,
measured per shape on a GPU).
"""

from __future__ import annotations

import torch

from fusedres import capture, reference
from fusedres.backends import chosen_backend, select_backend
from fusedres.backends.inputs import ConvBackwardInputs, ConvStatsInputs
from fusedres.ops.conv import conv_output_like, conv_output_shape, prologue_grads

Tensor = torch.Tensor
_SCHEMA = ("(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, bool prologue_relu, int[] stride, "
           "int[] padding, int[] dilation, int groups, Tensor? residual, str backend) -> (Tensor, Tensor, Tensor)")


def conv_bn_stats(x: Tensor, weight: Tensor, in_scale: Tensor | None, in_shift: Tensor | None, prologue_relu: bool,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  backend: str, residual: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): `reference.conv_bn_stats` on `backend` (see `fusedres.backends`)."""
    if residual is not None:
        _check_residual(x, weight, stride, padding, dilation, residual)
    if capture.onnx_exporting():  # standard operators only (fusedres.ops.decompositions)
        return reference.conv_bn_stats(x, weight, in_scale, in_shift, prologue_relu, list(stride), list(padding),
                                       list(dilation), groups, residual)
    inputs = ConvStatsInputs(x, weight, in_scale, in_shift, prologue_relu, list(stride), list(padding),
                             list(dilation), groups, residual)
    return _op(*inputs.args(), select_backend(backend, inputs).name)


def _check_residual(x: Tensor, weight: Tensor, stride, padding, dilation, residual: Tensor) -> None:
    """The residual has the conv output's shape: no backend broadcasts it."""
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    if tuple(residual.shape) != shape:
        raise ValueError(f"conv_bn_stats: residual has shape {tuple(residual.shape)}, expected the conv output's "
                         f"{shape}")


@torch.library.custom_op("fusedres::conv_bn_stats", mutates_args=(), schema=_SCHEMA)
def _op(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, residual, backend):
    inputs = ConvStatsInputs(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups,
                             residual)
    y, mean, var = chosen_backend(backend, "conv_bn_stats").conv_bn_stats(inputs)
    return y, mean, var


@_op.register_fake
def _(x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, residual, backend):
    acc = reference.accumulation_dtype(x.dtype)
    return (conv_output_like(x, weight, stride, padding, dilation), x.new_empty(weight.shape[0], dtype=acc),
            x.new_empty(weight.shape[0], dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups, residual, backend = inputs
    y, mean, var = output
    ctx.residual_dtype = None if residual is None else residual.dtype
    if residual is None:
        ctx.save_for_backward(x, weight, in_scale, in_shift, y, mean)
    else:
        # y is a block's output, which its user may change in place: not saved, so the
        # statistics carry no gradient here (their consumer, `bn_stats_of`, gives it).
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, in_scale, in_shift, None, None)
        ctx.y_layout = (y.dtype, reference.suggest_memory_format(y))
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.prologue_relu = prologue_relu
    ctx.backend = backend  # the backward's passes run on the backend that ran the forward


def _backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    needs = ctx.needs_input_grad
    impl = chosen_backend(ctx.backend, "conv_bn_stats")
    if ctx.residual_dtype is None:
        # The statistics' gradient joins the conv output's: one tensor for convolution_backward.
        g = impl.conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)
    else:
        dtype, memory_format = ctx.y_layout
        g = grad_y.to(dtype).contiguous(memory_format=memory_format)
    has_prologue = in_scale is not None
    a = impl.prologue(x, in_scale, in_shift, ctx.prologue_relu) if has_prologue else x
    want_input = needs[0] or (has_prologue and (needs[2] or needs[3]))
    grad_a, grad_w = impl.conv_backward(ConvBackwardInputs(g, a, weight, *ctx.conv_args, want_input, needs[1]))
    grad_x = grad_scale = grad_shift = None
    if grad_a is not None and not has_prologue:
        grad_x = grad_a
    elif grad_a is not None:
        grad_x, grad_scale, grad_shift = prologue_grads(impl.prologue_backward, grad_a, x, in_scale, in_shift,
                                                        ctx.prologue_relu, (needs[0], needs[2], needs[3]))
    # The residual meets y in a plain add: its gradient is y's whole gradient.
    grad_residual = g.to(ctx.residual_dtype) if ctx.residual_dtype is not None and needs[9] else None
    return grad_x, grad_w, grad_scale, grad_shift, None, None, None, None, None, grad_residual, None


_op.register_autograd(_backward, setup_context=_setup_context)
