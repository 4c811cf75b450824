"""The `triton` backend: fused implicit-GEMM Triton kernels.

Implemented:

* `conv_bias_act` (eval-mode conv + folded BN + residual / projection shortcut + ReLU),
  through the `fusedres::triton_conv_bias_act` op (`fusedres.triton.ops`);
* the train-mode BatchNorm ops `bn_stats` and `scale_bias_act` and their backward
  (`fusedres.triton.bn`); the backward kernels run through the opaque custom ops
  `fusedres::triton_bn_stats_backward` / `fusedres::triton_scale_bias_act_backward` so
  that torch.compile can trace the autograd formula. (In train mode the convolutions
  themselves still run through F.conv2d.)
* the elementwise passes of `conv_bn_stats`' backward (`conv_bn_stats_grad_y`, `prologue`,
  `prologue_backward`; `fusedres.triton.prologue`), through the opaque custom ops
  `fusedres::triton_conv_bn_stats_grad_y` / `triton_prologue` / `triton_prologue_backward`.
  Inputs the kernels do not take (float64, other devices) get the PyTorch defaults.

The backend targets CUDA: `auto` considers it for CUDA tensors only. An explicit
`backend="triton"` also runs CPU tensors when the Triton interpreter is on
(TRITON_INTERPRET=1 before fusedres is imported), which is how CI tests the kernels.
Triton is imported on first use, so `auto` on a CPU never imports it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from fusedres import reference
from fusedres.backends import tuning
from fusedres.backends.base import Backend, bn_shape_reasons

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BN_OPS = ("bn_stats", "scale_bias_act")
_PYTORCH_OPS = ("bn_finalize",)  # per-channel math: Backend's PyTorch default


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(fusedres.triton.ops, "") or (None, why triton cannot be imported)."""
    try:
        from fusedres.triton import ops
    except Exception as e:  # ImportError, or a broken triton install failing at import
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    return ops, ""


def _interpreting() -> bool:
    from fusedres.triton import conv

    return conv._INTERPRET


def _main_dtype_reasons(x: torch.Tensor) -> list[str]:
    if x.dtype == torch.float64:
        return ["float64 is not supported by the Triton kernels (float16, bfloat16 and float32 are; "
                "use backend='torch' for float64)"]
    if x.dtype not in _DTYPES:
        return [f"dtype {x.dtype} is not supported by the Triton kernels (float16, bfloat16 and float32 are)"]
    return []


def _dtype_reasons(tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """conv_bias_act's (x, weight, bias, residual, shortcut_x, shortcut_weight)."""
    x, weight, bias, residual, shortcut_x, shortcut_weight = (*tensors, None, None, None, None, None)[:6]
    reasons = _main_dtype_reasons(x)
    if reasons:
        return reasons
    # The weights and the projection shortcut meet x in tl.dot, so they need x's dtype; the
    # bias and the residual are read in fp32 and may be any floating dtype.
    for name, t in (("weight", weight), ("shortcut_x", shortcut_x), ("shortcut_weight", shortcut_weight)):
        if t is not None and t.dtype != x.dtype:
            reasons.append(f"mixed dtypes: x is {x.dtype} but {name} is {t.dtype} (the Triton kernel multiplies "
                           f"them in one dtype)")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and not t.is_floating_point():
            reasons.append(f"{name} is {t.dtype}, not floating point")
    return reasons


def _bn_reasons(tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """bn_stats's (y,) or scale_bias_act's (y, scale, bias, residual, residual_scale, residual_bias)."""
    reasons = bn_shape_reasons(tensors)
    if reasons and tensors[0].dim() != 4:
        return reasons
    return _main_dtype_reasons(tensors[0]) + reasons


def _on_device(t: torch.Tensor, fn, *args):
    """fn(*args) with t's CUDA device current: Triton launches on the current device and
    custom ops get no device guard."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            return fn(*args)
    return fn(*args)


def _kernel_ok(main: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the elementwise backward kernels take these tensors (else: the defaults)."""
    if main.dim() != 4 or main.dtype not in _DTYPES or _load()[0] is None:
        return False
    tensors = [main, *[t for t in others if t is not None]]
    if any(not t.is_floating_point() for t in tensors):
        return False
    return all(t.is_cuda or (t.device.type == "cpu" and _interpreting()) for t in tensors)


# Who computes the conv backward of train-mode convs on this backend: "auto" (on CUDA the
# faster of ATen/cuDNN and the Triton dgrad/wgrad kernels, measured once per shape by the
# never-slower tuner; ATen elsewhere and while tracing), or "aten" / "triton" to force one.
CONV_BACKWARD = os.environ.get("FUSEDRES_TRITON_CONV_BACKWARD", "auto")


class _AtenConvBackward:
    name = "aten"

    def conv_backward(self, *args):
        return Backend.conv_backward(self, *args)


class _TritonConvBackward:
    name = "triton"

    def conv_backward(self, grad, a, weight, stride, padding, dilation, groups, need_input, need_weight):
        from fusedres.triton import conv_backward as tcb

        grad_a = grad_w = None
        if need_input:
            grad_a = tcb.conv_dgrad(grad, weight, a.shape, stride, padding, dilation, groups)
        if need_weight:
            grad_w = tcb.conv_wgrad(grad, a, weight.shape, stride, padding, dilation, groups, out_dtype=weight.dtype)
        return grad_a, grad_w


_CONV_BACKWARDS = {"aten": _AtenConvBackward(), "triton": _TritonConvBackward()}


def _tracing(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return isinstance(t, FakeTensor) or (is_compiling is not None and is_compiling())


class TritonBackend(Backend):
    name = "triton"

    def device_types(self) -> tuple[str, ...]:
        return ("cuda",)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        ops, import_error = _load()
        reasons = self._device_reasons(tensors, interpreting=ops is not None and _interpreting())
        if import_error:
            reasons.append(import_error)
        if op in ("conv_bias_act", "conv_bn_stats"):
            if tensors and tensors[0] is not None:
                reasons += _dtype_reasons(tensors[:2])
        elif op in _BN_OPS:
            if tensors and tensors[0] is not None:
                reasons += _bn_reasons(tensors)
        elif op not in _PYTORCH_OPS:
            reasons.append(f"no Triton kernel for {op}")
        return reasons

    def _device_reasons(self, tensors: Sequence[torch.Tensor | None], interpreting: bool) -> list[str]:
        reasons = []
        for device_type in sorted({t.device.type for t in tensors if t is not None}):
            if device_type == "cuda" or (device_type == "cpu" and interpreting):
                continue
            if device_type == "cpu":
                reasons.append("inputs are on cpu; the triton backend runs on cuda, and on the CPU only through "
                               "the Triton interpreter: set TRITON_INTERPRET=1 before importing fusedres")
            else:
                reasons.append(f"inputs are on {device_type}; the triton backend runs on cuda")
        return reasons

    def conv_bias_act(self, x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding,
                      dilation, groups, shortcut_stride, relu):
        ops, _ = _load()
        args = (x, weight, bias, residual, shortcut_x, shortcut_weight, list(stride), list(padding),
                list(dilation), groups, list(shortcut_stride), relu)
        out = _on_device(x, ops.conv_bias_act, *args)
        # The kernel writes channels_last; give what PyTorch's convolution would (the op's fake).
        if reference.conv_output_memory_format(x, weight) != torch.channels_last:
            out = out.contiguous()
        return out

    def conv_bn_stats(self, x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation, groups):
        """The train-mode conv in one kernel: the previous BN + ReLU in its prologue, the
        per-channel statistics of its (rounded) output in its epilogue, then a tiny combine."""
        from fusedres.triton import conv as tconv

        conv_with_stats = functools.partial(tconv.conv_bias_act, stats=True)
        y, mean, var = _on_device(x, conv_with_stats, x, weight, None, None, None, None, list(stride), list(padding),
                                  list(dilation), groups, (1, 1), False, in_scale, in_shift, prologue_relu)
        if reference.conv_output_memory_format(x, weight) != torch.channels_last:
            y = y.contiguous()
        return y, mean, var

    def conv_backward(self, grad, a, weight, stride, padding, dilation, groups, need_input, need_weight):
        args = (grad, a, weight, list(stride), list(padding), list(dilation), groups, need_input, need_weight)
        mode = CONV_BACKWARD
        if mode not in _CONV_BACKWARDS:  # "auto"
            mode = "aten"
            if grad.is_cuda and grad.dtype == a.dtype == weight.dtype and not _tracing(grad) \
                    and tuning.wants_tuning("cuda"):
                return tuning.TUNER.choose("conv_backward", list(_CONV_BACKWARDS.values()), args).conv_backward(*args)
        if mode == "triton" and _tracing(grad):
            mode = "aten"  # Triton launches cannot take fake tensors
        return _on_device(grad, _CONV_BACKWARDS[mode].conv_backward, *args)

    # Train-mode BatchNorm. The forward kernels run inside the public (opaque) ops; the
    # backward ones through their own custom ops (see fusedres.triton.ops).

    def bn_stats(self, y):
        ops, _ = _load()
        return _on_device(y, ops.tbn.bn_stats, y)

    def scale_bias_act(self, y, scale, bias, residual, residual_scale, residual_bias, relu):
        ops, _ = _load()
        return _on_device(y, ops.tbn.scale_bias_act, y, scale, bias, residual, residual_scale, residual_bias, relu)

    def bn_stats_backward(self, y, mean, grad_mean, grad_var):
        ops, _ = _load()
        return _on_device(y, ops.bn_stats_backward, y, mean, grad_mean, grad_var)

    def scale_bias_act_backward(self, grad, out, y, scale, residual, residual_scale, needs, mask=None):
        ops, _ = _load()
        return _on_device(y, ops.sba_backward_from_op, grad, out, y, scale, residual, residual_scale, needs)

    # The elementwise passes of conv_bn_stats' backward (fusedres.ops.conv_train), called
    # from its autograd formula: through custom ops (fusedres.triton.ops) so that
    # torch.compile can trace it. float64 (never run by this backend's forward) and
    # anything else the kernels do not take keep the PyTorch defaults.

    def conv_bn_stats_grad_y(self, grad_y, y, mean, grad_mean, grad_var):
        if mean.dtype != torch.float32 or not _kernel_ok(y, grad_y, mean, grad_mean, grad_var):
            return super().conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)
        ops, _ = _load()
        return _on_device(y, ops.conv_bn_stats_grad_y, grad_y, y, mean, grad_mean, grad_var)

    def prologue(self, x, scale, shift, relu):
        if not _kernel_ok(x, scale, shift):
            return super().prologue(x, scale, shift, relu)
        ops, _ = _load()
        return _on_device(x, ops.prologue, x, scale, shift, relu)

    def prologue_backward(self, grad_a, x, scale, shift, relu, needs):
        if not _kernel_ok(x, grad_a, scale, shift):
            return super().prologue_backward(grad_a, x, scale, shift, relu, needs)
        ops, _ = _load()
        return _on_device(x, ops.prologue_backward, grad_a, x, scale, shift, relu, needs)
