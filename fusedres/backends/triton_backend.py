"""The `triton` backend: fused implicit-GEMM Triton kernels.

Implemented:

* `conv_bias_act` (eval-mode conv + folded BN + residual / projection shortcut + ReLU),
  through the `fusedres::triton_conv_bias_act` op (registered in `fusedres.triton.conv`);
* `conv_bn_stats` (train-mode conv with the previous BN + ReLU in its prologue and the
  batch statistics in its epilogue; `fusedres.triton.conv.conv_bn_stats`);
* the train-mode BatchNorm ops `bn_stats` and `scale_bias_act` and their backward
  (`fusedres.triton.bn`); the backward kernels run through the opaque custom op
  `fusedres::triton_scale_bias_act_backward` so that torch.compile can trace the autograd
  formula (bn_stats' backward is the statistics gradient below with no grad_y);
* the elementwise passes of `conv_bn_stats`' backward (`conv_bn_stats_grad_y`, `prologue`,
  `prologue_backward`; `fusedres.triton.prologue`), through the opaque custom ops
  `fusedres::triton_conv_bn_stats_grad_y` / `triton_prologue` / `triton_prologue_backward`.
  Inputs the kernels do not take (float64, other devices) get the PyTorch formulas, logged
  once on the `fusedres` logger;
* the conv backward of train-mode convs: ATen's or the Triton dgrad/wgrad kernels (see
  `CONV_BACKWARD`).

What it takes is declared per op in `TritonBackend.SUPPORT`.

The backend targets CUDA: `auto` considers it for CUDA tensors only. An explicit
`backend="triton"` also runs CPU tensors when the Triton interpreter is on
(TRITON_INTERPRET=1 before fusedres is imported), which is how CI tests the kernels.
Triton is imported on first use, so `auto` on a CPU never imports it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from fusedres import reference
from fusedres.backends import tuning
from fusedres.backends.base import Backend, UnsupportedInputError, aten_conv_backward
from fusedres.backends.inputs import (
    ConvBackwardInputs,
    ConvInputs,
    ConvStatsInputs,
    FinalizeInputs,
    StatsInputs,
    Support,
    TailInputs,
)
from fusedres.backends.log import log_once

# The Triton kernels' dtypes (fusedres.triton.common.DTYPES; not imported from there, which
# would import Triton: `auto` on a CPU never does).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS = dict(kernels="the Triton kernels", kernel="the Triton kernel", dtypes=_DTYPES,
                hint={torch.float64: "; use backend='torch' for float64"})


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(fusedres.triton.ops, "") or (None, why triton cannot be imported)."""
    try:
        from fusedres.triton import ops
    except Exception as e:  # ImportError, or a broken triton install failing at import
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    return ops, ""


# The two answers below do not change while a program runs: torch.compile takes them as
# constants instead of tracing the import (dispatch runs in the traced Python).

@torch.compiler.assume_constant_result
def _import_error() -> str:
    """Why Triton cannot be imported ("" when it can)."""
    return _load()[1]


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter (fixed when they were imported)."""
    if _load()[0] is None:
        return False
    from fusedres.triton import common

    return common.INTERPRET


def _on_device(t: torch.Tensor, fn, *args):
    """fn(*args) with t's CUDA device current: Triton launches on the current device and
    custom ops get no device guard."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            return fn(*args)
    return fn(*args)


def _kernel_reasons(main: torch.Tensor, *others: torch.Tensor | None) -> list[str]:
    """Why the elementwise backward kernels cannot take these tensors (then: PyTorch ops)."""
    tensors = [main, *[t for t in others if t is not None]]
    if main.dim() != 4 or main.dtype not in _DTYPES:
        return [f"a {main.dim()}-D {main.dtype} activation"]
    if any(not t.is_floating_point() for t in tensors):
        return ["a tensor that is not floating point"]
    if not all(t.is_cuda or (t.device.type == "cpu" and _interpreting()) for t in tensors):
        return ["a tensor off the GPU"]
    return []


def _kernels_take(what: str, main: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the Triton kernel for `what` takes these tensors; where it does not, log once
    that PyTorch ops run instead."""
    reasons = _kernel_reasons(main, *others)
    if reasons:
        log_once(f"fusedres: the triton backend computes {what} with PyTorch ops for {reasons[0]}")
    return not reasons


# Who computes the conv backward of train-mode convs on this backend: "auto" (on CUDA the
# faster of ATen/cuDNN and the Triton dgrad/wgrad kernels, measured once per shape by the
# never-slower tuner; ATen elsewhere and while tracing), or "aten" / "triton" to force one.
CONV_BACKWARD = os.environ.get("FUSEDRES_TRITON_CONV_BACKWARD", "auto")


class _AtenConvBackward:
    name = "aten"

    def conv_backward(self, inputs: ConvBackwardInputs):
        return aten_conv_backward(inputs)


class _TritonConvBackward:
    name = "triton"

    def conv_backward(self, inputs: ConvBackwardInputs):
        from fusedres.triton import conv_backward as tcb

        i = inputs
        grad_a = grad_w = None
        if i.need_input:
            grad_a = tcb.conv_dgrad(i.grad, i.weight, i.a.shape, i.stride, i.padding, i.dilation, i.groups)
        if i.need_weight:
            grad_w = tcb.conv_wgrad(i.grad, i.a, i.weight.shape, i.stride, i.padding, i.dilation, i.groups,
                                    out_dtype=i.weight.dtype)
        return grad_a, grad_w


_CONV_BACKWARDS = {"aten": _AtenConvBackward(), "triton": _TritonConvBackward()}


def _conv_backward_choice(inputs: ConvBackwardInputs):
    """The conv-backward implementation FUSEDRES_TRITON_CONV_BACKWARD asks for (see CONV_BACKWARD)."""
    mode, grad = CONV_BACKWARD, inputs.grad
    if mode not in (*_CONV_BACKWARDS, "auto"):
        raise ValueError(f"fusedres: FUSEDRES_TRITON_CONV_BACKWARD={mode!r}; expected auto, aten or triton")
    if mode == "triton" and tuning.tracing(grad):
        raise UnsupportedInputError("FUSEDRES_TRITON_CONV_BACKWARD=triton cannot run while torch.compile traces "
                                     "(Triton launches cannot take fake tensors): unset it or use 'auto'")
    if mode != "auto":
        return _CONV_BACKWARDS[mode]
    if grad.is_cuda and grad.dtype == inputs.a.dtype == inputs.weight.dtype and not tuning.tracing(grad) \
            and tuning.wants_tuning("cuda"):
        return tuning.TUNER.choose(list(_CONV_BACKWARDS.values()), inputs)
    return _CONV_BACKWARDS["aten"]  # off CUDA, while tracing, mixed dtypes, tuning off


class TritonBackend(Backend):
    name = "triton"
    kernel_family = "Triton"
    SUPPORT = {
        ConvInputs: Support(**_KERNELS, same_dtype=True, floating=True),
        ConvStatsInputs: Support(**_KERNELS, same_dtype=True, floating=True),
        StatsInputs: Support(**_KERNELS, floating=True, shapes=True),
        TailInputs: Support(**_KERNELS, floating=True, shapes=True),
        FinalizeInputs: Support(),  # per-channel math: Backend's PyTorch formula
    }

    def device_types(self) -> tuple[str, ...]:
        return ("cuda",)

    def backend_reasons(self, inputs) -> list[str]:
        import_error, interpreting = _import_error(), _interpreting()
        reasons = []
        for device_type in inputs.device_types():
            if device_type == "cuda" or (device_type == "cpu" and interpreting):
                continue
            if device_type == "cpu":
                reasons.append("inputs are on cpu; the triton backend runs on cuda, and on the CPU only through "
                               "the Triton interpreter: set TRITON_INTERPRET=1 before importing fusedres")
            else:
                reasons.append(f"inputs are on {device_type}; the triton backend runs on cuda")
        if import_error:
            reasons.append(import_error)
        return reasons

    def conv_bias_act(self, inputs):
        from fusedres.triton import conv as tconv

        out = _on_device(inputs.x, tconv.conv_bias_act_op, *inputs.args())
        # The kernel writes channels_last; give what PyTorch's convolution would (the op's fake).
        if reference.conv_output_memory_format(inputs.x, inputs.weight) != torch.channels_last:
            out = out.contiguous()
        return out

    def conv_bn_stats(self, inputs):
        """The train-mode conv in one kernel: the previous BN + ReLU in its prologue, the
        per-channel statistics of its (rounded) output in its epilogue, then a tiny combine."""
        from fusedres.triton import conv as tconv

        i = inputs
        y, mean, var = _on_device(i.x, tconv.conv_bn_stats, *i.args())
        if reference.conv_output_memory_format(i.x, i.weight) != torch.channels_last:
            y = y.contiguous()
        return y, mean, var

    def conv_backward(self, inputs):
        return _on_device(inputs.grad, _conv_backward_choice(inputs).conv_backward, inputs)

    # Train-mode BatchNorm. The forward kernels run inside the public (opaque) ops; the
    # backward ones through their own custom ops (see fusedres.triton.ops).

    def bn_stats(self, inputs):
        ops, _ = _load()
        return _on_device(inputs.y, ops.tbn.bn_stats, inputs.y)

    def scale_bias_act(self, inputs):
        ops, _ = _load()
        out = _on_device(inputs.y, ops.tbn.scale_bias_act, *inputs.args())
        return out, inputs.y.new_empty(0, dtype=torch.uint8)

    def scale_bias_act_backward(self, grad, out, y, scale, residual, residual_scale, needs, mask=None):
        ops, _ = _load()
        return _on_device(y, ops.sba_backward_from_op, grad, out, y, scale, residual, residual_scale, needs)

    # The elementwise passes of conv_bn_stats' and bn_stats' backward (fusedres.ops), called
    # from their autograd formulas: through custom ops (fusedres.triton.ops) so that
    # torch.compile can trace them. float64 (never run by this backend's forward) and
    # anything else the kernels do not take get the PyTorch formulas, logged once.

    def conv_bn_stats_grad_y(self, grad_y, y, mean, grad_mean, grad_var):
        if mean.dtype != torch.float32 or not _kernels_take("the statistics' gradient", y, grad_y, mean, grad_mean,
                                                             grad_var):
            return super().conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)
        ops, _ = _load()
        return _on_device(y, ops.conv_bn_stats_grad_y, grad_y, y, mean, grad_mean, grad_var)

    def prologue(self, x, scale, shift, relu):
        if not _kernels_take("the recomputed prologue", x, scale, shift):
            return super().prologue(x, scale, shift, relu)
        ops, _ = _load()
        return _on_device(x, ops.prologue, x, scale, shift, relu)

    def prologue_backward(self, grad_a, x, scale, shift, relu, needs):
        if not _kernels_take("the prologue's backward", x, grad_a, scale, shift):
            return super().prologue_backward(grad_a, x, scale, shift, relu, needs)
        ops, _ = _load()
        return _on_device(x, ops.prologue_backward, grad_a, x, scale, shift, relu, needs)
