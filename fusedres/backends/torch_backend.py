"""The `torch` backend: the reference semantics, on every device.

Eval-mode convolutions with ReLU take the fused convolution the platform library offers,
with the same folded weights:

* CPU, float32: oneDNN's convolution with post-ops (`torch.ops.mkldnn._convolution_pointwise`:
  bias + ReLU, and its `.binary` form: bias + residual add + ReLU), also without ReLU;
* CUDA, float16/bfloat16/float32: cuDNN's conv-bias-activation through ATen
  (`torch.cudnn_convolution_relu`, and `torch.cudnn_convolution_add_relu` for the residual
  or projection shortcut), the "cuDNN with the best fusion" that the triton backend must beat.

Both fused ReLUs map NaN to 0 where torch.relu keeps it, so inputs with a NaN or an Inf
take the reference path: one summing pass per activation input to find out (one host sync
on CUDA, and the reference path while a CUDA graph is being captured), while a weight is
checked once per version of it (the folded weights are cached tensors). With
FUSEDRES_CHECK_FINITE=0 there is no check, no sync, and the cuDNN path can be captured;
a NaN or an Inf in an input may then come out as 0 after a fused ReLU. (On the CPU, eval
blocks usually take `fusedres.cpu_plan`, whose check is one bound per block.)
Everything else runs `fusedres.reference` as written.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from fusedres import finite_guard, reference
from fusedres.backends.base import Backend
from fusedres.backends.inputs import ConvInputs, ConvStatsInputs, FinalizeInputs, StatsInputs, Support, TailInputs
from fusedres.backends.log import log_once


def _mkldnn_pointwise_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_convolution_pointwise")
        and "binary" in mkldnn._convolution_pointwise.overloads()
    )


_MKLDNN_POINTWISE = _mkldnn_pointwise_available()
_CUDNN_FUSED = hasattr(torch, "cudnn_convolution_relu") and hasattr(torch, "cudnn_convolution_add_relu")
_CUDNN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_cudnn_failed: set[tuple[torch.dtype, bool]] = set()  # (dtype, with z) that this build's cuDNN refused
# Shapes this build's oneDNN refused (see _mkldnn_key); they take the reference path from then on.
_mkldnn_failed: set[tuple] = set()


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """One summing pass per tensor and one host sync: a NaN or an Inf anywhere makes the
    sum non-finite. (A finite tensor whose sum overflows reads as non-finite too: that
    only costs the slower path, never a wrong answer.)"""
    sums = [t.sum(dtype=torch.float32) if t.is_floating_point() else t.sum().float() for t in tensors
            if t is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


_weight_finite = WeakTensorKeyDictionary()  # weight -> (version, all finite)


def _weights_finite(*weights: torch.Tensor | None) -> bool:
    """All finite, summed once per weight version (a weight without a version counter,
    an inference tensor, is summed every time)."""
    for w in weights:
        if w is None:
            continue
        try:
            version = w._version
        except RuntimeError:
            if not _all_finite(w):
                return False
            continue
        known = _weight_finite.get(w)
        if known is None or known[0] != version:
            known = _weight_finite[w] = (version, _all_finite(w))
        if not known[1]:
            return False
    return True


def _inputs_finite(x, weight, bias, residual, shortcut_x, shortcut_weight) -> bool:
    return _weights_finite(weight, shortcut_weight) and _all_finite(x, bias, residual, shortcut_x)


def _use_mkldnn(x: torch.Tensor, weight: torch.Tensor, relu: bool, *others: torch.Tensor | None) -> bool:
    if not (
        _MKLDNN_POINTWISE
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
    ):
        return False
    # oneDNN's fused ReLU maps NaN to 0 where torch.relu keeps it: inputs with NaN or Inf
    # (which can make NaN inside the conv) take the reference path, so NaN propagates.
    return not relu or not finite_guard.checks_enabled() or _inputs_finite(x, weight, *others)


def _mkldnn_key(x, weight, stride, padding, dilation, groups, relu, other) -> tuple:
    """What decides whether oneDNN can run a fused conv: everything but the batch size."""
    return (tuple(x.shape[1:]), x.stride()[1:], tuple(weight.shape), weight.stride(), tuple(stride), tuple(padding),
            tuple(dilation), groups, relu, None if other is None else other.stride()[1:])


def _mkldnn_conv(x, weight, bias, stride, padding, dilation, groups, relu, other=None):
    """oneDNN's conv (+ bias) (+ other) (+ ReLU); None where this build's oneDNN refuses the shape
    (torch 2.11 fails `.binary` with a 3x3 channels_last weight on a 1x1 input: "could not create
    a memory"): the caller then takes the reference path, and so does every later call of that shape."""
    def key() -> tuple:
        return _mkldnn_key(x, weight, stride, padding, dilation, groups, relu, other)

    if _mkldnn_failed and key() in _mkldnn_failed:  # no key built per call while nothing has failed
        return None
    pointwise = torch.ops.mkldnn._convolution_pointwise
    try:
        if other is None:
            return pointwise(x, weight, bias, padding, stride, dilation, groups,
                             "relu" if relu else "none", [], "")
        return pointwise.binary(x, other, weight, bias, padding, stride, dilation, groups,
                                "add", 1.0, "relu" if relu else None, [], "")
    except RuntimeError as e:
        _mkldnn_failed.add(key())
        warnings.warn(f"fusedres: oneDNN's fused convolution failed for input {tuple(x.shape)} and weight "
                      f"{tuple(weight.shape)} ({str(e).splitlines()[0]}); this shape uses the unfused reference "
                      f"from now on", RuntimeWarning, stacklevel=3)
        return None


def _use_cudnn(x: torch.Tensor, weight: torch.Tensor, relu: bool, with_z: bool, *others: torch.Tensor | None) -> bool:
    if not (
        _CUDNN_FUSED
        and relu
        and x.device.type == "cuda"
        and x.dtype in _CUDNN_DTYPES
        and weight.dtype == x.dtype
        and x.numel() > 0
        and torch.backends.cudnn.enabled
        and torch.backends.cudnn.is_available()
        and (x.dtype, with_z) not in _cudnn_failed
    ):
        return False
    if not finite_guard.checks_enabled():
        return True  # no check, no sync: capturable
    # The finiteness check syncs with the host, which a CUDA graph capture forbids: the
    # reference path is always right.
    if torch.cuda.is_current_stream_capturing():
        log_once("fusedres: the torch backend runs the unfused reference while a CUDA graph is captured (its NaN/Inf "
                 "check syncs with the host); FUSEDRES_CHECK_FINITE=0 lets cuDNN's fused convolution be captured")
        return False
    return _inputs_finite(x, weight, *others)


def _cudnn_conv_relu(x, weight, bias, stride, padding, dilation, groups, z=None):
    """relu(conv(x, weight) + bias (+ z)) in one cuDNN call; None if cuDNN refuses it."""
    bias = None if bias is None else bias.to(x.dtype)
    try:
        if z is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        return torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, stride, padding, dilation, groups)
    except RuntimeError as e:
        if not _cudnn_refused(e):
            raise  # our own shape bugs and asynchronous CUDA errors must surface
        _cudnn_failed.add((x.dtype, z is not None))
        log_once(f"fusedres: cuDNN's fused convolution refused {x.dtype} ({str(e).splitlines()[0]}); using the "
                 f"unfused reference for it from now on", logging.WARNING)
        return None


# What cuDNN (through ATen) raises when it has no engine for a fused convolution: only these
# mean "take the other path". Anything else is a bug or a CUDA error, and is raised.
_CUDNN_REFUSALS = ("CUDNN_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_BAD_PARAM", "No valid execution plans",
                   "GET was unable to find an engine", "FIND was unable to find an engine",
                   "cuDNN Frontend error")


def _cudnn_refused(error: RuntimeError) -> bool:
    return not isinstance(error, torch.cuda.OutOfMemoryError) and any(s in str(error) for s in _CUDNN_REFUSALS)


class TorchBackend(Backend):
    name = "torch"
    # The reference runs anything PyTorch runs: no kernel of its own to refuse an input.
    SUPPORT = {op: Support() for op in (ConvInputs, ConvStatsInputs, StatsInputs, TailInputs, FinalizeInputs)}

    def device_types(self) -> tuple[str, ...]:
        return ("*",)

    def backend_reasons(self, inputs) -> list[str]:
        return []  # every device, nothing to build

    def conv_bias_act(self, inputs: ConvInputs) -> torch.Tensor:
        i = inputs
        if i.in_scale is not None:  # the pre-activation, written once, then the library's fused conv
            i = dataclasses.replace(i, x=self.prologue(i.x, i.in_scale, i.in_shift, True), in_scale=None,
                                    in_shift=None)
        if i.shortcut_x is not None and i.shortcut_weight is None:  # option A: the padded tensor, written
            residual = reference.zero_pad_shortcut(i.shortcut_x, i.weight.shape[0], i.shortcut_stride)
            if i.residual is not None:  # both forms given: the reference adds both
                residual = residual + i.residual
            i = dataclasses.replace(i, residual=residual.contiguous(
                memory_format=reference.conv_output_memory_format(i.x, i.weight)), shortcut_x=None)
        if i.x.device.type == "cuda":
            out = self._cudnn_conv_bias_act(i)
            if out is not None:
                return out
        if not _use_mkldnn(i.x, i.weight, i.relu, i.bias, i.residual, i.shortcut_x, i.shortcut_weight):
            return reference.conv_bias_act(*i.args())
        memory_format = reference.conv_output_memory_format(i.x, i.weight)
        bias = None if i.bias is None else i.bias.to(torch.float32)
        residual = i.residual
        if i.shortcut_x is not None:
            # The projection shortcut becomes the residual that the main conv adds in its post-op.
            sx, sw = i.shortcut_x.to(torch.float32), i.shortcut_weight.to(torch.float32)
            residual = _mkldnn_conv(sx, sw, None, i.shortcut_stride, [0, 0], [1, 1], 1, False)
            if residual is None:
                residual = F.conv2d(sx, sw, None, i.shortcut_stride)
        conv = (i.stride, i.padding, i.dilation, i.groups)
        if residual is None:
            out = _mkldnn_conv(i.x, i.weight, bias, *conv, i.relu)
        else:
            residual = residual.to(torch.float32).contiguous(memory_format=memory_format)
            out = _mkldnn_conv(i.x, i.weight, bias, *conv, i.relu, residual)
        if out is None:
            return reference.conv_bias_act(i.x, i.weight, bias, residual, None, None, *conv, i.shortcut_stride,
                                           i.relu)
        return out.contiguous(memory_format=memory_format)

    def _cudnn_conv_bias_act(self, inputs: ConvInputs) -> torch.Tensor | None:
        """The cuDNN fused path, or None where it does not apply."""
        i = inputs
        with_z = i.residual is not None or i.shortcut_x is not None
        if not _use_cudnn(i.x, i.weight, i.relu, with_z, i.bias, i.residual, i.shortcut_x, i.shortcut_weight):
            return None
        memory_format = reference.conv_output_memory_format(i.x, i.weight)
        z = i.residual
        if i.shortcut_x is not None:
            # The projection shortcut becomes the z that cuDNN adds before its ReLU.
            z = F.conv2d(i.shortcut_x.to(i.x.dtype), i.shortcut_weight.to(i.x.dtype), None, i.shortcut_stride)
        if z is not None:
            z = z.to(i.x.dtype).contiguous(memory_format=memory_format)
        out = _cudnn_conv_relu(i.x, i.weight, i.bias, i.stride, i.padding, i.dilation, i.groups, z)
        return None if out is None else out.contiguous(memory_format=memory_format)
