"""When a fused ReLU may replace torch.relu without changing what NaN and Inf do.

oneDNN's and cuDNN's fused ReLUs map NaN to 0 where torch.relu keeps it. A fused path is
exact, NaN semantics included, wherever no NaN can arise, and that is decided from bounds:

* |x| <= X for the block's input (X finite: no NaN or Inf in it);
* every folded weight and bias finite, with G = the largest L1 norm of one output
  channel's weights and b = the largest |bias| (both once per fold);
* then |conv(x) + bias| <= X * G + b, chained through the block's convolutions (a ReLU or
  an add of a bounded residual keeps a bound), and while every bound stays far below the
  dtype's largest value no sum overflows, so every value is finite and a fused ReLU
  equals torch.relu. Otherwise the caller takes the reference path, which is always right.

The input's X costs one reading pass per block input (`max_abs`), and none where the input
is the output of a fused block that recorded its bound (`remember`) and that has not been
written to since (its version counter says so; under torch.inference_mode tensors have no
version counter, so every block input is read once).

FUSEDRES_CHECK_FINITE=0 skips the check (`checks_enabled`): then a NaN or Inf in an input
may come out as 0 after a fused ReLU.
"""

from __future__ import annotations

import math
import os

import torch

CHECK_ENV = "FUSEDRES_CHECK_FINITE"
_ATTR = "_fusedres_max_abs"  # (version, bound) on a tensor a fused block returned
# Margin below the dtype's largest value: covers the rounding of fp32 accumulation over
# any realistic reduction length (relative error <= K * 2**-24) and of the stored output.
_MARGIN = 16.0


def checks_enabled() -> bool:
    """False when FUSEDRES_CHECK_FINITE=0 (read on every call, as the backend variable is)."""
    return os.environ.get(CHECK_ENV, "1").strip() != "0"


def limit(dtype: torch.dtype) -> float:
    """The largest bound for which a fused path in `dtype` is certain not to overflow."""
    return torch.finfo(dtype).max / _MARGIN


def weight_gain(weight: torch.Tensor) -> float:
    """Largest L1 norm of one output channel's weights (inf or nan if any weight is not finite)."""
    w = weight.detach()
    return float(w.to(torch.float64).abs().sum(dim=tuple(range(1, w.dim()))).max()) if w.numel() else 0.0


def bias_bound(bias: torch.Tensor | None) -> float:
    """Largest |bias| (0 without one; inf or nan if any entry is not finite)."""
    if bias is None or bias.numel() == 0:
        return 0.0
    return float(bias.detach().to(torch.float64).abs().max())


def _flat(x: torch.Tensor) -> torch.Tensor | None:
    """x as a 1-D view of its memory, when it is dense in NCHW or channels_last order."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)  # a view: channels_last is NHWC in memory
    return None


def max_abs(x: torch.Tensor) -> float:
    """An upper bound on max |x| from one reading pass: inf when x holds a NaN or an Inf."""
    if x.numel() == 0:
        return 0.0
    flat = _flat(x)
    if flat is None:
        bound = float(x.abs().amax())
    elif flat.dtype == torch.float32:
        # ||x||_2 >= max|x|; a BLAS dot is the fastest fp32 reduction here. A square that
        # overflows gives inf: the slower path, never a wrong answer.
        bound = math.sqrt(float(torch.dot(flat, flat)))
    else:
        low, high = (float(v) for v in torch.aminmax(flat))  # the fastest reduction for 16-bit floats
        if math.isnan(low) or math.isnan(high):
            return math.inf
        bound = max(-low, high)
    return bound if math.isfinite(bound) else math.inf


def input_bound(x: torch.Tensor) -> tuple[float, bool]:
    """(bound on max |x|, whether it was remembered rather than measured)."""
    known = known_bound(x)
    return (known, True) if known is not None else (max_abs(x), False)


def known_bound(x: torch.Tensor) -> float | None:
    """The bound a fused op recorded on `x`, if `x` has not been written to since."""
    known = x.__dict__.get(_ATTR)
    return known[1] if known is not None and known[0] == x._version else None


def remember(out: torch.Tensor, bound: float) -> None:
    """Record that |out| <= bound, valid until `out` is next written to. Inference tensors
    (torch.inference_mode) have no version counter to tell a later write: nothing is kept."""
    if not out.is_inference():
        out.__dict__[_ATTR] = (out._version, bound)
