"""fusedres::conv_bias_act: an eval-mode convolution with BN folded in, residual and ReLU.

Semantics: `fusedres.reference.conv_bias_act`. The autograd formula lets eval-mode
models be differentiated (input gradients, fine-tuning with frozen BN).
"""

from typing import Optional

import torch

from fusedres import reference
from fusedres.backends import select_backend


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("fusedres::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    shortcut_x: Optional[torch.Tensor],
    shortcut_weight: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shortcut_stride: list[int],
    relu: bool,
    backend: str,
) -> torch.Tensor:
    args = (x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
            shortcut_stride, relu)
    impl = select_backend(backend, "conv_bias_act", args[:6], args=args)
    return impl.conv_bias_act(*args)


@conv_bias_act.register_fake
def _(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
      shortcut_stride, relu, backend):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    shape = (
        n,
        weight.shape[0],
        _conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        _conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    )
    memory_format = reference.conv_output_memory_format(x, weight)
    return x.new_empty(shape).contiguous(memory_format=memory_format)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
     shortcut_stride, relu, _backend) = inputs
    ctx.save_for_backward(x, weight, shortcut_x, shortcut_weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups, shortcut_stride, relu)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad):
    x, weight, shortcut_x, shortcut_weight, out = ctx.saved_tensors
    stride, padding, dilation, groups, shortcut_stride, relu = ctx.conv_args
    needs = ctx.needs_input_grad
    g = grad.masked_fill(out <= 0, 0) if relu else grad
    g = g.to(x.dtype)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [needs[0], needs[1], False])
    grad_bias = grad_residual = grad_sx = grad_sw = None
    if needs[2]:
        grad_bias = g.to(reference.accumulation_dtype(g.dtype)).sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    if needs[3]:
        grad_residual = g.to(ctx.residual_dtype)
    if shortcut_x is not None and (needs[4] or needs[5]):
        grad_sx, grad_sw, _ = torch.ops.aten.convolution_backward(
            g, shortcut_x, shortcut_weight, None, shortcut_stride, [0, 0], [1, 1], False, [0, 0], 1,
            [needs[4], needs[5], False])
    return grad_x, grad_w, grad_bias, grad_residual, grad_sx, grad_sw, None, None, None, None, None, None, None


conv_bias_act.register_autograd(_backward, setup_context=_setup_context)
