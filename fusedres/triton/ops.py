"""torch.library registration of the Triton backward kernels: the backward ops of the
train-mode BatchNorm kernels and those of conv_bn_stats' backward. (The forward conv's op,
`fusedres::triton_conv_bias_act`, is registered in `fusedres.triton.conv`, beside its
kernel; `conv_bias_act` here is that op.)
"""

from __future__ import annotations

import torch

from fusedres import reference
from fusedres.triton import bn as tbn
from fusedres.triton import conv as tconv
from fusedres.triton import prologue as tpro

# The conv launcher's op, `fusedres::triton_conv_bias_act`, is registered beside its kernel
# (fusedres.triton.conv); re-exported here with the other registrations.
conv_bias_act = tconv.conv_bias_act_op
TRACEABLE = tconv.TRACEABLE


# ---------------------------------------------------------------------------------------
# Train-mode BatchNorm backward (fusedres.triton.bn; bn_stats' backward is
# conv_bn_stats_grad_y(None, ...) below). The triton backend's forward kernels
# run inside the public fusedres::bn_stats / fusedres::scale_bias_act ops, which are
# opaque to torch.compile; their backward runs inside the autograd formula, which
# AOTAutograd traces with fake tensors, so the backward launches need ops of their own.
# Plain custom ops (opaque under torch.compile); becoming `triton_op`s would let inductor
# see and schedule the launches.

SBA_BACKWARD = "fusedres::triton_scale_bias_act_backward"
SBA_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor? out, Tensor y, Tensor scale, Tensor? residual, Tensor? residual_scale, bool[] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _sba_backward(grad, out, y, scale, residual, residual_scale, needs):
    """tbn.scale_bias_act_backward, with an empty placeholder for each gradient it does not
    compute (an op returns tensors, not None): `sba_backward_from_op` turns them back."""
    grads = tbn.scale_bias_act_backward(grad, out, y, scale, residual, residual_scale, needs)
    return tuple(y.new_empty(0) if g is None else g for g in grads)


def _sba_backward_fake(grad, out, y, scale, residual, residual_scale, needs):
    want = tbn.sba_backward_outputs(needs, residual, residual_scale)
    channels = y.shape[1]

    def like(t):
        return torch.empty_like(t, memory_format=reference.suggest_memory_format(t))

    shapes = (like(y), None, None, like(residual) if residual is not None else None, None, None)
    return tuple(
        y.new_empty(0) if not w else shapes[i] if shapes[i] is not None else
        y.new_empty(channels, dtype=torch.float32)
        for i, w in enumerate(want)
    )


def sba_backward_from_op(grad, out, y, scale, residual, residual_scale, needs):
    """(dy, dscale, dbias, dresidual, dresidual_scale, dresidual_bias), None where not computed."""
    grads = scale_bias_act_backward(grad, out, y, scale, residual, residual_scale, [bool(n) for n in needs])
    want = tbn.sba_backward_outputs(needs, residual, residual_scale)
    return tuple(g if w else None for g, w in zip(grads, want))


scale_bias_act_backward = torch.library.custom_op(SBA_BACKWARD, mutates_args=(),
                                                  schema=SBA_BACKWARD_SCHEMA)(_sba_backward)
scale_bias_act_backward.register_fake(_sba_backward_fake)


# ---------------------------------------------------------------------------------------
# The elementwise passes of fusedres::conv_bn_stats' backward (fusedres.triton.prologue).
# They run inside that op's autograd formula, which AOTAutograd traces with fake tensors:
# opaque custom ops, like the BatchNorm backward op above. conv_bn_stats_grad_y with
# grad_y None is also bn_stats' backward.

GRAD_Y = "fusedres::triton_conv_bn_stats_grad_y"
GRAD_Y_SCHEMA = "(Tensor? grad_y, Tensor y, Tensor mean, Tensor? grad_mean, Tensor? grad_var) -> Tensor"
PROLOGUE = "fusedres::triton_prologue"
PROLOGUE_SCHEMA = "(Tensor x, Tensor scale, Tensor shift, bool relu) -> Tensor"
PROLOGUE_BACKWARD = "fusedres::triton_prologue_backward"
PROLOGUE_BACKWARD_SCHEMA = (
    "(Tensor grad_a, Tensor x, Tensor scale, Tensor shift, bool relu, bool[] needs) -> (Tensor, Tensor, Tensor)"
)


def _like_reference(t):
    return torch.empty_like(t, memory_format=reference.suggest_memory_format(t))


def _grad_y(grad_y, y, mean, grad_mean, grad_var):
    return tpro.conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)


conv_bn_stats_grad_y = torch.library.custom_op(GRAD_Y, mutates_args=(), schema=GRAD_Y_SCHEMA)(_grad_y)


@conv_bn_stats_grad_y.register_fake
def _(grad_y, y, mean, grad_mean, grad_var):
    return _like_reference(y)


def _prologue(x, scale, shift, relu):
    return tpro.prologue(x, scale, shift, relu)


prologue = torch.library.custom_op(PROLOGUE, mutates_args=(), schema=PROLOGUE_SCHEMA)(_prologue)


@prologue.register_fake
def _(x, scale, shift, relu):
    return _like_reference(x)


def _prologue_backward(grad_a, x, scale, shift, relu, needs):
    """tpro.prologue_backward with an empty placeholder for each gradient not computed."""
    grads = tpro.prologue_backward(grad_a, x, scale, shift, relu, needs)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


_prologue_backward_op = torch.library.custom_op(PROLOGUE_BACKWARD, mutates_args=(),
                                                schema=PROLOGUE_BACKWARD_SCHEMA)(_prologue_backward)


@_prologue_backward_op.register_fake
def _(grad_a, x, scale, shift, relu, needs):
    c = x.shape[1]
    return (_like_reference(x) if needs[0] else x.new_empty(0),
            x.new_empty(c, dtype=torch.float32) if needs[1] else x.new_empty(0),
            x.new_empty(c, dtype=torch.float32) if needs[2] else x.new_empty(0))


def prologue_backward(grad_a, x, scale, shift, relu, needs):
    """(dx, dscale, dshift) through the op, None where `needs` is false."""
    needs = [bool(n) for n in needs]
    grads = _prologue_backward_op(grad_a, x, scale, shift, relu, needs)
    return tuple(g if w else None for g, w in zip(grads, needs))
