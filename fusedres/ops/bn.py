"""Train-mode BatchNorm ops: batch statistics and the scale/bias/residual/ReLU pass.

A train-mode conv+BN(+add)+ReLU is `y = conv(x)`, `mean, var = bn_stats(y)`, scale and
bias from them (plain differentiable tensor math in `fusedres.batchnorm`), then
`scale_bias_act(y, scale, bias, ...)`. The autograd of the two ops below, composed by
PyTorch's autograd with that math, is exactly nn.BatchNorm2d's backward.
Semantics: `fusedres.reference.bn_stats` and `fusedres.reference.scale_bias_act`.
"""

from typing import Optional

import torch

from fusedres import reference
from fusedres.backends import select_backend


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


@torch.library.custom_op("fusedres::bn_stats", mutates_args=())
def bn_stats(y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return select_backend(backend, "bn_stats", (y,)).bn_stats(y)


@bn_stats.register_fake
def _(y, backend):
    channels = y.shape[1]
    dtype = reference.accumulation_dtype(y.dtype)
    return y.new_empty(channels, dtype=dtype), y.new_empty(channels, dtype=dtype)


def _bn_stats_setup(ctx, inputs, output):
    y, _backend = inputs
    ctx.save_for_backward(y, output[0])


def _bn_stats_backward(ctx, grad_mean, grad_var):
    y, mean = ctx.saved_tensors
    count = y.numel() // y.shape[1]
    acc = mean.dtype
    grad = torch.zeros((), dtype=acc, device=y.device)
    if grad_mean is not None:
        grad = grad + _channel_view(grad_mean.to(acc)) / count
    if grad_var is not None:
        centered = y.to(acc) - _channel_view(mean)
        grad = grad + centered * _channel_view(grad_var.to(acc)) * (2.0 / count)
    grad = grad.expand(y.shape)
    return grad.to(y.dtype).contiguous(memory_format=reference.suggest_memory_format(y)), None


bn_stats.register_autograd(_bn_stats_backward, setup_context=_bn_stats_setup)


@torch.library.custom_op("fusedres::scale_bias_act", mutates_args=())
def scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    residual_bias: Optional[torch.Tensor],
    relu: bool,
    backend: str,
) -> torch.Tensor:
    impl = select_backend(backend, "scale_bias_act", (y, scale, bias, residual, residual_scale, residual_bias))
    return impl.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu)


@scale_bias_act.register_fake
def _(y, scale, bias, residual, residual_scale, residual_bias, relu, backend):
    return torch.empty_like(y, memory_format=reference.suggest_memory_format(y))


def _sba_setup(ctx, inputs, output):
    y, scale, bias, residual, residual_scale, residual_bias, relu, _backend = inputs
    ctx.save_for_backward(y, scale, residual, residual_scale, output if relu else None)
    ctx.relu = relu
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, residual_bias))


def _sba_backward(ctx, grad):
    y, scale, residual, residual_scale, out = ctx.saved_tensors
    needs = ctx.needs_input_grad
    bias_dtype, residual_bias_dtype = ctx.dtypes
    acc = reference.accumulation_dtype(y.dtype)
    g = grad.masked_fill(out <= 0, 0) if ctx.relu else grad
    g = g.to(acc)
    dims = (0, 2, 3)
    grads = [None] * 8
    if needs[0]:
        grads[0] = (g * _channel_view(scale.to(acc))).to(y.dtype)
    if needs[1]:
        grads[1] = (g * y.to(acc)).sum(dim=dims).to(scale.dtype)
    if needs[2]:
        grads[2] = g.sum(dim=dims).to(bias_dtype)
    if residual is not None:
        if residual_scale is None:
            if needs[3]:
                grads[3] = g.to(residual.dtype)
        else:
            if needs[3]:
                grads[3] = (g * _channel_view(residual_scale.to(acc))).to(residual.dtype)
            if needs[4]:
                grads[4] = (g * residual.to(acc)).sum(dim=dims).to(residual_scale.dtype)
            if needs[5]:
                grads[5] = g.sum(dim=dims).to(residual_bias_dtype)
    for i in (0, 3):
        if grads[i] is not None:
            grads[i] = grads[i].contiguous(memory_format=reference.suggest_memory_format(y if i == 0 else residual))
    return tuple(grads)


scale_bias_act.register_autograd(_sba_backward, setup_context=_sba_setup)
