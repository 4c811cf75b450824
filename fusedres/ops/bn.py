"""Train-mode BatchNorm ops: batch statistics and the scale/bias/residual/ReLU pass.

A train-mode conv+BN(+add)+ReLU is `y = conv(x)`, `mean, var = bn_stats(y)`, scale and
bias from them (plain differentiable tensor math in `fusedres.batchnorm`), then
`scale_bias_act(y, scale, bias, ...)`. The autograd of the two ops below, composed by
PyTorch's autograd with that math, is exactly nn.BatchNorm2d's backward.
Semantics: `fusedres.reference.bn_stats` / `scale_bias_act`; the gradient formulas are
`reference.conv_bn_stats_grad_y` (with grad_y None) / `reference.scale_bias_act_backward`,
run by the backend that ran the forward: the public functions choose it once and pass
its name to the op, whose fake, autograd context and backward use that name.
"""

from __future__ import annotations

import torch

from fusedres import capture, reference
from fusedres.backends import chosen_backend, select_backend
from fusedres.backends.inputs import StatsInputs, TailInputs

Tensor = torch.Tensor


def bn_stats(y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of y over (N, H, W), in the accumulation dtype."""
    if capture.onnx_exporting():
        return reference.bn_stats(y)
    return _stats_op(y, select_backend(backend, StatsInputs(y)).name)


@torch.library.custom_op("fusedres::bn_stats", mutates_args=(), schema="(Tensor y, str backend) -> (Tensor, Tensor)")
def _stats_op(y, backend):
    return chosen_backend(backend, "bn_stats").bn_stats(StatsInputs(y))


@_stats_op.register_fake
def _(y, backend):
    channels = y.shape[1]
    dtype = reference.accumulation_dtype(y.dtype)
    return y.new_empty(channels, dtype=dtype), y.new_empty(channels, dtype=dtype)


def _stats_setup(ctx, inputs, output):
    y, backend = inputs
    ctx.save_for_backward(y, output[0])
    ctx.backend = backend


def _stats_backward(ctx, grad_mean, grad_var):
    y, mean = ctx.saved_tensors
    return chosen_backend(ctx.backend, "bn_stats").conv_bn_stats_grad_y(None, y, mean, grad_mean, grad_var), None


_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


def bn_stats_of(y: Tensor, mean: Tensor, var: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(mean, var) already computed for y (by `conv_bn_stats`' epilogue, without a gradient),
    made differentiable in y as `bn_stats(y)` is: the forward copies them (no pass over y)."""
    if capture.onnx_exporting():
        return mean, var
    return _known_stats_op(y, mean, var, select_backend(backend, StatsInputs(y)).name)


@torch.library.custom_op("fusedres::bn_stats_of", mutates_args=(),
                         schema="(Tensor y, Tensor mean, Tensor var, str backend) -> (Tensor, Tensor)")
def _known_stats_op(y, mean, var, backend):
    return mean.clone(), var.clone()


@_known_stats_op.register_fake
def _(y, mean, var, backend):
    return torch.empty_like(mean), torch.empty_like(var)


def _known_stats_setup(ctx, inputs, output):
    y, _mean, _var, backend = inputs
    ctx.save_for_backward(y, output[0])
    ctx.backend = backend


def _known_stats_backward(ctx, grad_mean, grad_var):
    return (*_stats_backward(ctx, grad_mean, grad_var)[:1], None, None, None)


_known_stats_op.register_autograd(_known_stats_backward, setup_context=_known_stats_setup)


def scale_bias_act(y: Tensor, scale: Tensor, bias: Tensor, residual: Tensor | None, residual_scale: Tensor | None,
                   residual_bias: Tensor | None, relu: bool, backend: str) -> Tensor:
    """act(y*scale + bias + r): `reference.scale_bias_act` (the block tail)."""
    if capture.onnx_exporting():
        return reference.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu)
    inputs = TailInputs(y, scale, bias, residual, residual_scale, residual_bias, relu)
    return _tail_op(*inputs.args(), select_backend(backend, inputs).name)[0]


_TAIL_SCHEMA = ("(Tensor y, Tensor scale, Tensor bias, Tensor? residual, Tensor? residual_scale, "
                "Tensor? residual_bias, bool relu, str backend) -> (Tensor, Tensor)")


@torch.library.custom_op("fusedres::scale_bias_act", mutates_args=(), schema=_TAIL_SCHEMA)
def _tail_op(y, scale, bias, residual, residual_scale, residual_bias, relu, backend):
    inputs = TailInputs(y, scale, bias, residual, residual_scale, residual_bias, relu)
    return chosen_backend(backend, "scale_bias_act").scale_bias_act(inputs)


@_tail_op.register_fake
def _(y, scale, bias, residual, residual_scale, residual_bias, relu, backend):
    out = torch.empty_like(y, memory_format=reference.suggest_memory_format(y))
    return out, y.new_empty(tail_mask_bytes(y, relu, backend), dtype=torch.uint8)


def tail_mask_bytes(y: Tensor, relu: bool, backend: str) -> int:
    """The size of scale_bias_act's second output, the ReLU mask: 1 bit per element where the
    backend makes one, else empty."""
    return (y.numel() + 7) // 8 if relu and chosen_backend(backend, "scale_bias_act").relu_mask else 0


def _tail_setup(ctx, inputs, output):
    y, scale, bias, residual, residual_scale, residual_bias, relu, backend = inputs
    out, mask = output
    has_mask = mask.numel() > 0
    # The ReLU's backward needs the output's sign: the 1-bit mask where the backend made
    # one, else the output itself (which the next layer keeps anyway).
    ctx.save_for_backward(y, scale, residual, residual_scale, out if relu and not has_mask else None,
                          mask if has_mask else None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (scale, bias, residual_scale, residual_bias))
    ctx.backend = backend


def _tail_backward(ctx, grad, _grad_mask):
    y, scale, residual, residual_scale, out, mask = ctx.saved_tensors
    grads = list(chosen_backend(ctx.backend, "scale_bias_act").scale_bias_act_backward(
        grad, out, y, scale, residual, residual_scale, tuple(ctx.needs_input_grad[:6]), mask=mask))
    # Per-channel grads come in the accumulation dtype: give each its input's dtype.
    for i, dtype in zip((1, 2, 4, 5), ctx.dtypes):
        if grads[i] is not None:
            grads[i] = grads[i].to(dtype)
    if grads[2] is not None and grads[5] is grads[2]:
        grads[5] = grads[5].clone()  # bias and residual_bias must not share one gradient tensor
    return (*grads, None, None)


_tail_op.register_autograd(_tail_backward, setup_context=_tail_setup)
