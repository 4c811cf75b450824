"""torch.library registration of the Triton kernels: `fusedres::triton_conv_bias_act`.

The `triton` backend runs `fusedres::conv_bias_act` through this op. It is a
`torch.library.triton_op` whose body launches the kernel through
`torch.library.wrap_triton`, so that torch.compile and torch.export see the launch (and
inductor can schedule it) when the op is traced. It has no autograd: the public
`fusedres::conv_bias_act` op owns that.

`@triton.autotune(prune_configs_by={"early_config_prune": ...})` is traceable:
torch's user-defined-Triton support runs `early_config_prune` at trace time with the
traced arguments (torch >= 2.6; checked in torch 2.14's
`torch/_higher_order_ops/triton_kernel_wrap.py`, `do_prune_configs`), and our prune
function only reads ints, bools and `x_ptr.element_size()`, which fake tensors answer.

Fallbacks, each an opaque `torch.library.custom_op` with the same schema and fake:

* torch without `torch.library.triton_op` / `wrap_triton`;
* the Triton interpreter (TRITON_INTERPRET=1, how the CPU tests run): interpreted kernels
  cannot be traced, so the op just runs eagerly; under torch.compile it is opaque.
"""

from __future__ import annotations

import torch

from fusedres.triton import conv as tconv

NAME = "fusedres::triton_conv_bias_act"
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? shortcut_x, Tensor? shortcut_weight, "
    "int[] stride, int[] padding, int[] dilation, int groups, int[] shortcut_stride, bool relu) -> Tensor"
)
TRACEABLE = (not tconv._INTERPRET and hasattr(torch.library, "triton_op")
             and hasattr(torch.library, "wrap_triton"))


def _launch(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
            shortcut_stride, relu):
    """act(conv(x, weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)): a new
    channels_last tensor in x's dtype (see `fusedres.triton.conv.conv_bias_act`)."""
    wrap = torch.library.wrap_triton if TRACEABLE else None
    return tconv.conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                               groups, shortcut_stride, relu, wrap_kernel=wrap)


def _fake(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
          shortcut_stride, relu):
    n, _, h, w = x.shape
    oc, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = (tconv._pair(v, name) for v, name in
                                    ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    shape = (n, oc, tconv._conv_out_size(h, kh, sh, ph, dh), tconv._conv_out_size(w, kw, sw, pw, dw))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


if TRACEABLE:
    conv_bias_act = torch.library.triton_op(NAME, mutates_args=(), schema=SCHEMA)(_launch)
else:
    conv_bias_act = torch.library.custom_op(NAME, mutates_args=(), schema=SCHEMA)(_launch)
# triton_op already traces `_launch` as its fake; this one is cheaper and the same for both.
conv_bias_act.register_fake(_fake)
