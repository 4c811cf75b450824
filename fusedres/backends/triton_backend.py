"""The `triton` backend: fused implicit-GEMM Triton kernels.

Implemented: `conv_bias_act` (eval-mode conv + folded BN + residual / projection shortcut
+ ReLU), through the `fusedres::triton_conv_bias_act` op (`fusedres.triton.ops`).
Training ops (`bn_stats`, `scale_bias_act`) are not implemented yet (issue 5).

The backend targets CUDA: `auto` considers it for CUDA tensors only. An explicit
`backend="triton"` also runs CPU tensors when the Triton interpreter is on
(TRITON_INTERPRET=1 before fusedres is imported), which is how CI tests the kernels.
Triton is imported on first use, so `auto` on a CPU never imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch

from fusedres import reference
from fusedres.backends.base import Backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NOT_YET = {
    "bn_stats": "no Triton kernel for bn_stats yet (training on the triton backend is issue 5)",
    "scale_bias_act": "no Triton kernel for scale_bias_act yet (training on the triton backend is issue 5)",
}


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


def _dtype_reasons(tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """conv_bias_act's (x, weight, bias, residual, shortcut_x, shortcut_weight)."""
    x, weight, bias, residual, shortcut_x, shortcut_weight = (*tensors, None, None, None, None, None)[:6]
    if x.dtype == torch.float64:
        return ["float64 is not supported by the Triton kernels (float16, bfloat16 and float32 are; "
                "use backend='torch' for float64)"]
    if x.dtype not in _DTYPES:
        return [f"dtype {x.dtype} is not supported by the Triton kernels (float16, bfloat16 and float32 are)"]
    reasons = []
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


class TritonBackend(Backend):
    name = "triton"

    def device_types(self) -> tuple[str, ...]:
        return ("cuda",)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        ops, import_error = _load()
        reasons = self._device_reasons(tensors, interpreting=ops is not None and _interpreting())
        if import_error:
            reasons.append(import_error)
        if op != "conv_bias_act":
            reasons.append(_NOT_YET.get(op, f"no Triton kernel for {op}"))
        elif tensors and tensors[0] is not None:
            reasons += _dtype_reasons(tensors)
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
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            # Triton launches on the current device; custom ops get no device guard.
            with torch.cuda.device(x.device):
                out = ops.conv_bias_act(*args)
        else:
            out = ops.conv_bias_act(*args)
        # The kernel writes channels_last; give what PyTorch's convolution would (the op's fake).
        if reference.conv_output_memory_format(x, weight) != torch.channels_last:
            out = out.contiguous()
        return out
