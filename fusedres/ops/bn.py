"""Train-mode BatchNorm ops: batch statistics and the scale/bias/residual/ReLU pass.

A train-mode conv+BN(+add)+ReLU is `y = conv(x)`, `mean, var = bn_stats(y)`, scale and
bias from them (plain differentiable tensor math in `fusedres.batchnorm`), then
`scale_bias_act(y, scale, bias, ...)`. The autograd of the two ops below, composed by
PyTorch's autograd with that math, is exactly nn.BatchNorm2d's backward.
Semantics: `fusedres.reference.bn_stats` and `fusedres.reference.scale_bias_act`; the
gradient formulas are `Backend.bn_stats_backward` / `Backend.scale_bias_act_backward`
(fusedres.backends.base), run by the backend that ran the forward (its name is kept in
ctx: the triton backend runs Triton kernels, the others PyTorch ops).
"""

from typing import Optional

import torch

from fusedres import reference
from fusedres.backends import get_backend, select_backend


@torch.library.custom_op("fusedres::bn_stats", mutates_args=())
def bn_stats(y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return select_backend(backend, "bn_stats", (y,)).bn_stats(y)


@bn_stats.register_fake
def _(y, backend):
    channels = y.shape[1]
    dtype = reference.accumulation_dtype(y.dtype)
    return y.new_empty(channels, dtype=dtype), y.new_empty(channels, dtype=dtype)


def _bn_stats_setup(ctx, inputs, output):
    y, backend = inputs
    ctx.save_for_backward(y, output[0])
    ctx.backend = select_backend(backend, "bn_stats", (y,)).name  # the backend that ran the forward


def _bn_stats_backward(ctx, grad_mean, grad_var):
    y, mean = ctx.saved_tensors
    return get_backend(ctx.backend).bn_stats_backward(y, mean, grad_mean, grad_var), None


bn_stats.register_autograd(_bn_stats_backward, setup_context=_bn_stats_setup)


@torch.library.custom_op("fusedres::scale_bias_act", mutates_args=())
def _scale_bias_act(
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    residual_bias: Optional[torch.Tensor],
    relu: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _sba_backend(backend, y, scale, bias, residual, residual_scale, residual_bias)
    return impl.scale_bias_act_with_mask(y, scale, bias, residual, residual_scale, residual_bias, relu)


def scale_bias_act(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
                   residual_scale: Optional[torch.Tensor], residual_bias: Optional[torch.Tensor], relu: bool,
                   backend: str) -> torch.Tensor:
    """act(y*scale + bias + r): `reference.scale_bias_act` (the block tail)."""
    return _scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu, backend)[0]


def _sba_backend(backend, y, scale, bias, residual, residual_scale, residual_bias):
    return select_backend(backend, "scale_bias_act", (y, scale, bias, residual, residual_scale, residual_bias))


@_scale_bias_act.register_fake
def _(y, scale, bias, residual, residual_scale, residual_bias, relu, backend):
    # The mask's size depends on the backend (1 bit per element where it makes one).
    impl = _sba_backend(backend, y, scale, bias, residual, residual_scale, residual_bias)
    mask_bytes = (y.numel() + 7) // 8 if relu and impl.relu_mask else 0
    out = torch.empty_like(y, memory_format=reference.suggest_memory_format(y))
    return out, y.new_empty(mask_bytes, dtype=torch.uint8)


def _sba_setup(ctx, inputs, output):
    y, scale, bias, residual, residual_scale, residual_bias, relu, backend = inputs
    out, mask = output
    has_mask = mask.numel() > 0
    # The ReLU's backward needs the output's sign: the 1-bit mask where the backend made
    # one, else the output itself (which the next layer keeps anyway).
    ctx.save_for_backward(y, scale, residual, residual_scale, out if relu and not has_mask else None,
                          mask if has_mask else None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (scale, bias, residual_scale, residual_bias))
    # The backend that ran the forward runs the backward.
    ctx.backend = _sba_backend(backend, y, scale, bias, residual, residual_scale, residual_bias).name


def _sba_backward(ctx, grad, _grad_mask):
    y, scale, residual, residual_scale, out, mask = ctx.saved_tensors
    grads = list(get_backend(ctx.backend).scale_bias_act_backward(
        grad, out, y, scale, residual, residual_scale, ctx.needs_input_grad[:6], mask=mask))
    # Per-channel grads come in the accumulation dtype: give each its input's dtype.
    for i, dtype in zip((1, 2, 4, 5), ctx.dtypes):
        if grads[i] is not None:
            grads[i] = grads[i].to(dtype)
    if grads[2] is not None and grads[5] is grads[2]:
        grads[5] = grads[5].clone()  # bias and residual_bias must not share one gradient tensor
    return (*grads, None, None)


_scale_bias_act.register_autograd(_sba_backward, setup_context=_sba_setup)
