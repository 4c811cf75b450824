"""The CPU inference path: a block's convolutions as prepacked oneDNN calls, planned once per fold.

In eval mode on the CPU (autograd off, not under torch.compile), a fused block does per
call what oneDNN must do and little else:

* BN is folded and every weight reordered into oneDNN's blocked layout once per fold and
  input shape (`torch.ops.mkldnn._reorder_convolution_weight`); the plan is rebuilt on the
  fold cache's invalidation rules (`fusedres.folding`), so no call reorders a weight;
* one `mkldnn._convolution_pointwise` per convolution with bias + ReLU, the last one with
  the residual add + ReLU as a binary post-op (a projection shortcut's 1x1 conv becomes
  that residual, its bias merged into the last conv's);
* no custom-op dispatch, backend selection or per-convolution checks: one NaN/Inf bound
  per block input (`fusedres.finite_guard`), and none where the input is a fused block's
  output.

float32, bfloat16 and float16 (where this oneDNN build supports them) run here, in
channels_last; an NCHW input is converted once on entry and the output converted back
(NCHW float32 with activations larger than its weights instead runs NCHW with the plain
folded weights: ATen's layout copies cost more there than oneDNN's own reorders), so the
layout the block returns is PyTorch's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fusedres import ext, finite_guard, reference
from fusedres.backends.torch_backend import _MKLDNN_POINTWISE
from fusedres.folding import needs_autograd

logger = logging.getLogger("fusedres")
_PACKED_SHAPES = 4  # prepacked weights kept per conv (one per input shape seen; oldest dropped)


def _supported_dtypes() -> frozenset[torch.dtype]:
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return frozenset(dtypes)


DTYPES: frozenset[torch.dtype] = _supported_dtypes() if _MKLDNN_POINTWISE else frozenset()
_BACKENDS = ("auto", "torch", "cuda")  # whose CPU eval convolution is the torch backend's oneDNN call


def _backend_runs_here(backend: str) -> bool:
    # An explicit `cuda` without the extension's CPU kernels must raise as its ops do.
    return backend in _BACKENDS and (backend != "cuda" or ext.has_kernels("cpu"))


def applies(x: torch.Tensor, backend: str, dtype: torch.dtype, modules: tuple[nn.Module, ...]) -> bool:
    """Whether a call of `modules` (a block, or the stem's conv and BN) can take the plan: the
    caller also needs every BN in eval mode (or frozen). Autograd must record nothing: grad
    mode off, or neither x nor a parameter requires a gradient (a frozen stage in training)."""
    return (
        x.dtype in DTYPES
        and dtype == x.dtype
        and x.device.type == "cpu"
        and type(x) is torch.Tensor  # no subclasses (fake, functional) and no tracing
        and _backend_runs_here(backend)
        and not needs_autograd(x, modules)
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()  # a traced graph keeps the ops (and their NaN checks), not oneDNN calls
        and x.numel() > 0
    )


class PackedConv:
    """One folded convolution: its bias, its guard terms and oneDNN's weight per input shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int) -> None:
        self.weight = weight.detach()
        # fp32 bias for the plain call (oneDNN adds it before rounding); the binary call
        # insists on the input's dtype.
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.binary_bias = None if bias is None else bias.detach().to(weight.dtype)
        self.conv_args = (list(padding), list(stride), list(dilation), groups)
        self.gain = finite_guard.weight_gain(weight)
        self.bias_max = finite_guard.bias_bound(bias)
        self.finite = math.isfinite(self.gain) and math.isfinite(self.bias_max)
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def bound(self, input_bound: float) -> float:
        """A bound on |conv(x) + bias| given |x| <= input_bound; inf where a NaN may arise
        (a non-finite weight or input: even 0 * inf is NaN)."""
        if not self.finite or math.isinf(input_bound):
            return math.inf
        return input_bound * self.gain + self.bias_max

    def packed_weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        weight = self._packed.get(shape)
        if weight is None:
            if len(self._packed) >= _PACKED_SHAPES:
                del self._packed[next(iter(self._packed))]
            padding, stride, dilation, groups = self.conv_args
            weight = torch.ops.mkldnn._reorder_convolution_weight(self.weight, padding, stride, dilation, groups,
                                                                 list(shape))
            self._packed[shape] = weight
        return weight

    def __call__(self, x: torch.Tensor, relu: bool, other: torch.Tensor | None = None,
                 dense: bool = False) -> torch.Tensor:
        """relu?(conv(x) + bias (+ other)), x in the weight's dtype: channels_last with the
        prepacked weight, or (dense=True) NCHW float32 with the plain weight, in NCHW out."""
        weight = self.weight if dense else self.packed_weight(tuple(x.shape))
        pointwise = torch.ops.mkldnn._convolution_pointwise
        if other is None:
            return pointwise(x, weight, self.bias, *self.conv_args, "relu" if relu else "none", [], "")
        return pointwise.binary(x, other, weight, self.binary_bias, *self.conv_args, "add", 1.0,
                                "relu" if relu else None, [], "")


def packed_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedConv:
    return PackedConv(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass
class Shortcut:
    """How a block's residual is made: identity (conv and module None), a packed 1x1
    projection after `pre` modules (timm's avg-down pool), an opaque downsample module, or
    none at all (a plain block)."""

    pre: Sequence[nn.Module] = ()
    conv: PackedConv | None = None
    module: Callable[[torch.Tensor], torch.Tensor] | None = None
    none: bool = False  # a plain block: no residual at all


class BlockPlan:
    """relu(conv_k(... relu(conv_1(x)) ...) + shortcut(x)) as prepacked oneDNN calls."""

    def __init__(self, key: tuple, convs: list[PackedConv], shortcut: Shortcut, dtype: torch.dtype,
                 where: str) -> None:
        self.key = key
        self.convs = convs
        self.shortcut = shortcut
        self.dtype = dtype
        self.where = where
        self.limit = finite_guard.limit(dtype)
        # What PyTorch's convolutions would return: channels_last if the input or a weight is.
        self.channels_last_weights = any(reference.suggest_memory_format(c.weight) == torch.channels_last
                                         for c in convs)
        self._refused: set[tuple[int, ...]] = set()
        self.weight_numel = sum(c.weight.numel() for c in convs) + (
            shortcut.conv.weight.numel() if shortcut.conv is not None else 0)
        stride = 1
        for c in convs:
            stride *= c.conv_args[1][0] * c.conv_args[1][1]
        # Output elements per input element: channels out / channels in, over the stride.
        self.out_per_in = convs[-1].weight.shape[0] / (convs[0].weight.shape[1] * convs[0].conv_args[3] * stride)

    def run(self, x: torch.Tensor, known_bound: float | None = None) -> tuple[torch.Tensor | None, float | None]:
        """(the block's output, a bound on |output|, None when unchecked), or (None, None) where
        the caller must take the general path (an input whose bounds allow a NaN, or a shape
        this oneDNN build refused). `known_bound` is a bound on |x| the caller vouches for (a
        remembered one, or fusedres.stem's chain); without one, x is read once."""
        shape = tuple(x.shape)
        if self._refused and shape in self._refused:
            return None, None
        checking = finite_guard.checks_enabled()
        bound = 0.0
        if checking:
            if known_bound is not None:
                bound, remembered = known_bound, True
            else:
                bound, remembered = finite_guard.input_bound(x)
            if remembered and not self._within_limit(bound):
                bound = finite_guard.max_abs(x)  # a loose remembered bound: measure the real one
            if not self._within_limit(bound):
                return None, None
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        # NCHW float32 with large activations stays NCHW: ATen's layout copies there cost more
        # than oneDNN's own reorders inside the call plus a reorder of the plain weights (when
        # input + output have over 4 elements per weight element, measured on ResNet-18/50
        # blocks). 16-bit dtypes always convert: oneDNN's fused add+ReLU there needs channels_last.
        dense = not channels_last and x.dtype == torch.float32 and x.is_contiguous() \
            and not self.channels_last_weights and x.numel() * (1 + self.out_per_in) > 4 * self.weight_numel
        xc = x if channels_last or dense else x.contiguous(memory_format=torch.channels_last)
        try:
            residual, residual_bound = self._residual(xc, bound, checking, dense)
            peak, out_bound = self._bounds(bound, residual_bound)
            if checking and not peak < self.limit:
                return None, None
            out = xc
            for conv in self.convs[:-1]:
                out = conv(out, relu=True, dense=dense)
            out = self.convs[-1](out, relu=True, other=residual, dense=dense)
        except RuntimeError as e:  # e.g. torch 2.11's oneDNN and a 3x3 channels_last weight on a 1x1 map
            # Logged, not warned: the general path warns itself if its oneDNN call refuses too.
            self._refused.add(shape)
            logger.info("%s: oneDNN's prepacked convolution failed for input %s (%s); this shape takes the "
                        "general path from now on", self.where, shape, str(e).splitlines()[0])
            return None, None
        if not channels_last and not self.channels_last_weights:
            out = out.contiguous()
        return out, (out_bound if checking else None)

    def _within_limit(self, bound: float) -> bool:
        return self._bounds(bound, 0.0)[0] < self.limit

    def _bounds(self, bound: float, residual_bound: float) -> tuple[float, float]:
        """(the largest bound on any value the block computes, the bound on its output), given
        |x| <= bound and |residual| <= residual_bound."""
        peak = max(bound, residual_bound)
        for conv in self.convs:
            bound = conv.bound(bound)
            peak = max(peak, bound)
        out = bound + residual_bound
        return max(peak, out), out

    def _residual(self, x: torch.Tensor, bound: float, checking: bool,
                  dense: bool) -> tuple[torch.Tensor | None, float]:
        shortcut = self.shortcut
        if shortcut.none:
            return None, 0.0
        layout = torch.contiguous_format if dense else torch.channels_last
        if shortcut.module is not None:
            residual = shortcut.module(x).to(self.dtype).contiguous(memory_format=layout)
            return residual, (finite_guard.max_abs(residual) if checking else 0.0)
        if shortcut.conv is None:
            return x, bound
        for module in shortcut.pre:
            x = module(x)
        pre_bound = finite_guard.max_abs(x) if checking and shortcut.pre else bound
        residual = shortcut.conv(x.contiguous(memory_format=layout), relu=False, dense=dense)
        return residual, shortcut.conv.bound(pre_bound)
