"""fusedres::conv_bias_act: an eval-mode convolution with BN folded in, residual and ReLU
(and, for pre-activation blocks, the BN + ReLU of its input as a prologue).

Semantics: `fusedres.reference.conv_bias_act`. `conv_bias_act` below chooses the backend
(once per call; `auto` may tune) and runs the registered op with that backend's name. The
autograd formula lets eval-mode models be differentiated (input gradients, fine-tuning
with frozen BN).
"""

from __future__ import annotations

import torch

from fusedres import capture, reference
from fusedres.backends import chosen_backend, select_backend
from fusedres.backends.inputs import ConvInputs

_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? shortcut_x, Tensor? shortcut_weight, "
           "int[] stride, int[] padding, int[] dilation, int groups, int[] shortcut_stride, bool relu, "
           "Tensor? in_scale, Tensor? in_shift, str backend) -> Tensor")


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                  shortcut_x: torch.Tensor | None, shortcut_weight: torch.Tensor | None, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, shortcut_stride: list[int], relu: bool,
                  backend: str, in_scale: torch.Tensor | None = None,
                  in_shift: torch.Tensor | None = None) -> torch.Tensor:
    """act(conv(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)) on `backend`
    ("auto", "triton", "cuda" or "torch"; see `fusedres.backends`); P(x) = relu(x*in_scale +
    in_shift) per input channel when they are given (the triton kernel applies it while
    loading x; the other backends write it first), else x."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError("conv_bias_act: in_scale and in_shift must be given together")
    if capture.onnx_exporting():  # standard operators only (fusedres.ops.decompositions)
        return reference.conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, list(stride),
                                       list(padding), list(dilation), groups, list(shortcut_stride), relu, in_scale,
                                       in_shift)
    inputs = ConvInputs(x, weight, bias, residual, shortcut_x, shortcut_weight, list(stride), list(padding),
                        list(dilation), groups, list(shortcut_stride), relu, in_scale, in_shift)
    impl = select_backend(backend, inputs, tune=True)
    return _op(*inputs.args(), impl.name)


@torch.library.custom_op("fusedres::conv_bias_act", mutates_args=(), schema=_SCHEMA)
def _op(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
        shortcut_stride, relu, in_scale, in_shift, backend):
    inputs = ConvInputs(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                        shortcut_stride, relu, in_scale, in_shift)
    return chosen_backend(backend, "conv_bias_act").conv_bias_act(inputs)


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                      dilation: list[int]) -> tuple[int, int, int, int]:
    """(N, OC, P, Q) of PyTorch's convolution output."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    return (n, weight.shape[0], reference.conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
            reference.conv_output_size(w, kw, stride[1], padding[1], dilation[1]))


def conv_output_like(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                     dilation: list[int]) -> torch.Tensor:
    """An empty tensor shaped, typed and laid out as PyTorch's convolution output (the fakes)."""
    shape = conv_output_shape(x, weight, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=reference.conv_output_memory_format(x, weight))


@_op.register_fake
def _(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
      shortcut_stride, relu, in_scale, in_shift, backend):
    return conv_output_like(x, weight, stride, padding, dilation)


def prologue_grads(prologue_backward, grad_a: torch.Tensor, x: torch.Tensor, in_scale: torch.Tensor,
                   in_shift: torch.Tensor, relu: bool, needs: tuple[bool, bool, bool]) -> tuple:
    """(dx, dscale, dshift) of a conv input prologue from the gradient of its output, by
    `prologue_backward` (a backend's, or the reference's), in in_scale's and in_shift's dtypes."""
    dx, dscale, dshift = prologue_backward(grad_a, x, in_scale, in_shift, relu, needs)
    return (dx, None if dscale is None else dscale.to(in_scale.dtype),
            None if dshift is None else dshift.to(in_shift.dtype))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
     shortcut_stride, relu, in_scale, in_shift, _backend) = inputs
    ctx.save_for_backward(x, weight, shortcut_x, shortcut_weight, output if relu else None, in_scale, in_shift)
    ctx.conv_args = (stride, padding, dilation, groups, shortcut_stride, relu)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad):
    x, weight, shortcut_x, shortcut_weight, out, in_scale, in_shift = ctx.saved_tensors
    stride, padding, dilation, groups, shortcut_stride, relu = ctx.conv_args
    needs = ctx.needs_input_grad
    g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad  # one pass, as torch.relu's backward
    g = g.to(x.dtype)
    has_prologue = in_scale is not None
    # The prologue is recomputed (one elementwise pass), not saved.
    a = reference.prologue(x, in_scale, in_shift, True) if has_prologue else x
    want_a = needs[0] or (has_prologue and (needs[12] or needs[13]))
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [want_a, needs[1], False])
    grad_scale = grad_shift = None
    if has_prologue and grad_x is not None:
        grad_x, grad_scale, grad_shift = prologue_grads(reference.prologue_backward, grad_x, x, in_scale, in_shift,
                                                        True, (needs[0], needs[12], needs[13]))
    grad_bias = grad_residual = grad_sx = grad_sw = None
    if needs[2]:
        grad_bias = g.to(reference.accumulation_dtype(g.dtype)).sum(dim=(0, 2, 3)).to(ctx.bias_dtype)
    if needs[3]:
        grad_residual = g.to(ctx.residual_dtype)
    if shortcut_x is not None and shortcut_weight is None and needs[4]:  # option A: the first channels, strided
        s_h, s_w = shortcut_stride
        grad_sx = torch.zeros_like(shortcut_x)
        grad_sx[:, :, ::s_h, ::s_w] = g[:, :shortcut_x.shape[1]].to(shortcut_x.dtype)
    elif shortcut_x is not None and (needs[4] or needs[5]):
        grad_sx, grad_sw, _ = torch.ops.aten.convolution_backward(
            g, shortcut_x, shortcut_weight, None, shortcut_stride, [0, 0], [1, 1], False, [0, 0], 1,
            [needs[4], needs[5], False])
    return (grad_x, grad_w, grad_bias, grad_residual, grad_sx, grad_sw, None, None, None, None, None, None,
            grad_scale, grad_shift, None)


_op.register_autograd(_backward, setup_context=_setup_context)
