"""Fused pre-activation blocks ("Identity Mappings in Deep Residual Networks", He et al. 2016;
timm's `resnetv2_*`): BN -> ReLU -> conv, twice (basic) or three times (bottleneck), plus
the shortcut: the identity, or a 1x1 projection of the pre-activated input.

    out = conv_k(relu(norm_k(... conv_1(relu(norm_1(x))) ...))) + shortcut
    shortcut = x, or downsample.conv(downsample.pool?(relu(norm_1(x))))

The attributes and state_dict keys are timm's `PreActBasic` / `PreActBottleneck`'s (norm1,
conv1, norm2, conv2[, norm3, conv3], downsample.conv), so `convert()` swaps timm's blocks
for these and `revert()` gives timm's back. A norm is a BatchNorm followed by ReLU: timm's
`BatchNormAct2d` with a ReLU, or `BatchNormReLU` here; any other (timm's GroupNormAct in the
BiT models, another activation, an active DropPath) makes the block run timm's forward
(one warning).

Paths, chosen as the plain blocks' are:

* every norm with batch statistics (training): the "genstats" chain. norm1's statistics of
  x come from the previous block (`fusedres.handoff`: its last conv computed them) when x
  is that block's output, unchanged, else from a `bn_stats` pass; each conv is a
  `conv_bn_stats` that applies the previous norm (its batch statistics) and the ReLU in
  its prologue while loading its input, and returns its raw output with that output's
  batch statistics for the next norm; the projection shortcut is such a conv on x with
  norm1 in its prologue; the last conv adds the shortcut in its epilogue, and the sum's
  statistics go to the next block. No normalised activation is written.
* otherwise (eval): each conv_k with norm_{k+1} folded into its weights and the ReLU in its
  epilogue (`conv_bias_act`), the last conv with the shortcut added in its epilogue. norm1
  cannot fold across its ReLU into conv1, so conv1 applies it in its prologue
  (`conv_bias_act`'s in_scale/in_shift: the triton kernel does so while loading x; the
  torch and cuda backends write the pre-activation first). Where the pre-activation is
  needed anyway (a projection shortcut reads it; or norm2 uses batch statistics), it is
  written once by a `scale_bias_act` pass and the projection's 1x1 conv is fused into the
  last conv's epilogue. A norm with batch statistics outside plain training: conv,
  `bn_stats`, `scale_bias_act`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusedres import capture, handoff, ops, reference
from fusedres.backends import check_backend_name, resolve_backend_name
from fusedres.batchnorm import batch_norm_scale_bias, check_count, scale_bias_from_stats
from fusedres.blocks import check_block_input, compute_dtype, conv_reasons, conv_stats_scale_bias, inactive
from fusedres.folding import FoldCache, is_frozen, uses_batch_stats


class BatchNormReLU(nn.BatchNorm2d):
    """relu(batch_norm(x)): the norm of fusedres's own pre-activation blocks (the state_dict
    keys of nn.BatchNorm2d and of timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class PreActProjection(nn.Module):
    """The projection shortcut of a pre-activation block: a 1x1 conv of the pre-activated
    input (timm's DownsampleConv with preact=True: `conv`, and `norm` the identity)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _norm_reasons(name: str, norm: Any) -> list[str]:
    if type(norm) is BatchNormReLU:
        return []
    cls = type(norm)
    timm_bn_act = cls.__name__ == "BatchNormAct2d" and isinstance(norm, nn.BatchNorm2d)
    if cls.__module__.startswith("timm.") and (timm_bn_act or is_frozen(norm)):  # frozen: FrozenBatchNormAct2d
        if type(getattr(norm, "act", None)) is not nn.ReLU:
            return [f"{name}'s activation is {type(getattr(norm, 'act', None)).__name__}, not nn.ReLU"]
        if not inactive(getattr(norm, "drop", None)):
            return [f"{name}'s dropout ({type(norm.drop).__name__}) is in effect"]
        return []
    return [f"{name} is {cls.__name__}, not a BatchNorm2d followed by ReLU (timm's BatchNormAct2d or "
            f"FrozenBatchNormAct2d with nn.ReLU, or fusedres.preact.BatchNormReLU)"]


def _one_by_one_reasons(name: str, conv: Any) -> list[str]:
    reasons = conv_reasons(name, conv)
    if not reasons and (conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1
                        or conv.dilation != (1, 1)):
        return [f"{name} is not a plain 1x1 convolution"]
    return reasons


def _conv(x: torch.Tensor, conv: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    return F.conv2d(x.to(dtype), conv.weight.to(dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


class PreActBlockMixin:
    """What PreActBasicBlock and PreActBottleneck share: checks, paths, revert support."""

    backend: str
    _fold_cache: FoldCache
    _num_convs: int

    # ---- structure ---------------------------------------------------------------------

    def _init_fused(self, backend: str) -> None:
        self.backend = check_backend_name(backend)
        self._fold_cache = FoldCache()
        self._warned_fallback = False

    @property
    def _convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i + 1}") for i in range(self._num_convs)]

    @property
    def _norms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"norm{i + 1}") for i in range(self._num_convs)]

    def shared_module_names(self) -> tuple[str, ...]:
        """The submodules a fused block shares with the block it was made from, in timm's
        registration order (so parameters() and state_dict() list them in timm's order)."""
        return ("downsample", *(f"{kind}{i + 1}" for i in range(self._num_convs) for kind in ("norm", "conv")),
                "drop_path")

    def describe(self) -> str:
        return (f"fusedres.{type(self).__name__}(in_channels={self.conv1.in_channels}, "
                f"out_channels={self._convs[-1].out_channels}, stride={max(self._stride_conv.stride)})")

    def _projection(self) -> tuple[nn.Module | None, nn.Conv2d] | None:
        """(pool or None, 1x1 conv) of the projection shortcut; None for the identity."""
        if self.downsample is None:
            return None
        return getattr(self.downsample, "pool", None), self.downsample.conv

    def unfusable_reasons(self) -> list[str]:
        """Why this block cannot run fused (then it runs timm's forward)."""
        reasons: list[str] = []
        for i, (conv, norm) in enumerate(zip(self._convs, self._norms)):
            reasons += conv_reasons(f"conv{i + 1}", conv) + _norm_reasons(f"norm{i + 1}", norm)
        ds = self.downsample
        if ds is not None:
            conv = getattr(ds, "conv", None)
            pool = getattr(ds, "pool", None)
            if conv is None or not inactive(getattr(ds, "norm", None)) or set(dict(ds.named_children())) - {
                    "conv", "norm", "pool"}:
                reasons.append(f"downsample ({type(ds).__name__}) is not a 1x1 conv of the pre-activated input "
                               f"(timm's DownsampleConv/DownsampleAvg with preact=True)")
            else:
                reasons += _one_by_one_reasons("downsample.conv", conv)
                if pool is not None and type(pool) not in (nn.AvgPool2d, nn.Identity):
                    reasons.append(f"downsample.pool is {type(pool).__name__}, not nn.AvgPool2d")
        if not inactive(getattr(self, "drop_path", None)):
            reasons.append(f"drop_path ({type(self.drop_path).__name__}) is in effect")
        return reasons

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if capture.is_fx_proxy(x):  # torch.fx: one call_module node (fusedres.capture)
            return capture.fx_leaf_call(self, x, self._unfused_forward)
        if capture.onnx_exporting():  # the original block's ops: the graph timm's own export gives
            return self._unfused_forward(x)
        reasons = self.unfusable_reasons()
        if reasons:
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(f"{self.describe()} runs unfused (timm's pre-activation forward): " + "; ".join(reasons),
                              RuntimeWarning, stacklevel=2)
            return self._unfused_forward(x)
        self._check_input(x)
        backend = resolve_backend_name(self.backend)
        dtype = self._compute_dtype(x)
        if self._runs_as_train_chain(x):
            return self._train_chain(x, backend, dtype)
        return self._general_forward(x, backend, dtype)

    def __prepare_scriptable__(self) -> nn.Module:
        capture.refuse_scripting(self)

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward, with these modules."""
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        out = self.conv1(x_preact)
        for conv, norm in zip(self._convs[1:], self._norms[1:]):
            out = conv(norm(out))
        return self.drop_path(out) + shortcut

    def _check_input(self, x: torch.Tensor) -> None:
        check_block_input(x, self.describe(), self.conv1.in_channels, self.conv1.weight)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return compute_dtype(x)

    # ---- the general path (eval, frozen norms, anything but plain training) ---------------

    def _general_forward(self, x: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
        where = f"{self.describe()}: "
        norm1 = self.norm1
        xc = x.to(dtype)
        if uses_batch_stats(norm1):
            scale, shift = batch_norm_scale_bias(xc, norm1, backend, where)
        else:
            scale, shift = reference.bn_finalize(norm1.running_mean, norm1.running_var, norm1.weight, norm1.bias,
                                                 norm1.eps)
        convs, norms = self._convs, self._norms
        # conv1 applies norm1 + ReLU in its prologue, unless the pre-activation is needed
        # written: by the projection shortcut, or by conv1 running unfolded (norm2 with batch
        # statistics).
        pre = None
        if self._projection() is not None or uses_batch_stats(norms[1]):
            pre = ops.scale_bias_act(xc, scale, shift, None, None, None, True, backend)
        out = self._conv_norm_relu("conv1", xc if pre is None else pre, convs[0], norms[1], backend, dtype, where,
                                   prologue=None if pre is not None else (scale, shift))
        for i in range(1, len(convs) - 1):
            out = self._conv_norm_relu(f"conv{i + 1}", out, convs[i], norms[i + 1], backend, dtype, where)
        return self._last_conv_and_shortcut(out, x, pre, backend, dtype)

    def _conv_norm_relu(self, name: str, x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, backend: str,
                        dtype: torch.dtype, where: str,
                        prologue: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """relu(norm(conv(P(x)))): folded (running statistics) or conv + batch statistics;
        P(x) = relu(x*scale + shift) for a `prologue` (scale, shift) (folded only), else x."""
        if uses_batch_stats(norm):
            y = _conv(x, conv, dtype)
            scale, shift = batch_norm_scale_bias(y, norm, backend, where)
            return ops.scale_bias_act(y, scale, shift, None, None, None, True, backend)
        weight, bias = self._fold_cache.folded(name, conv, norm, dtype)
        in_scale, in_shift = prologue if prologue is not None else (None, None)
        return ops.conv_bias_act(x.to(dtype), weight, bias, None, None, None, *_conv_args(conv), [1, 1], True,
                                 backend, in_scale, in_shift)

    def _last_conv_and_shortcut(self, out: torch.Tensor, x: torch.Tensor, pre: torch.Tensor | None, backend: str,
                                dtype: torch.dtype) -> torch.Tensor:
        """conv_k(out) + shortcut in one conv_bias_act: the identity as its residual, a
        projection as the 1x1 conv fused into its epilogue."""
        last = self._convs[-1]
        bias = last.bias
        residual = shortcut_x = shortcut_weight = None
        shortcut_stride = [1, 1]
        projection = self._projection()
        if projection is None:
            residual = x
        else:
            pool, conv = projection
            shortcut_x = pool(pre) if pool is not None else pre
            shortcut_weight = conv.weight.to(dtype)
            shortcut_stride = list(conv.stride)
            if conv.bias is not None:
                bias = conv.bias if bias is None else bias + conv.bias
        if residual is not None and residual.dtype != dtype:  # autocast: timm's add promotes to the wider dtype
            return ops.conv_bias_act(out.to(dtype), last.weight.to(dtype), bias, None, None, None,
                                     *_conv_args(last), [1, 1], False, backend) + residual
        return ops.conv_bias_act(out.to(dtype), last.weight.to(dtype), bias, residual, shortcut_x, shortcut_weight,
                                 *_conv_args(last), shortcut_stride, False, backend)

    # ---- the training chain ---------------------------------------------------------------

    def _runs_as_train_chain(self, x: torch.Tensor) -> bool:
        """Every norm uses batch statistics, no conv has a bias, the projection (if any) has
        no pool, the batch is not empty."""
        projection = self._projection()
        convs = self._convs + ([] if projection is None else [projection[1]])
        if projection is not None and not inactive(projection[0]):
            return False
        if x.shape[0] == 0:
            return False
        return all(uses_batch_stats(n) for n in self._norms) and all(c.bias is None for c in convs)

    def _train_chain(self, x: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
        where = f"{self.describe()}: "
        xc = x.to(dtype)
        count = xc.numel() // xc.shape[1]
        check_count(count, tuple(xc.shape), where, self.norm1)
        # norm1's statistics: from the previous block's last conv when x is its output, unchanged.
        stats = handoff.recall(x)
        if stats is not None and xc is x:
            mean, var = ops.bn_stats_of(xc, *stats, backend)
        else:
            mean, var = ops.bn_stats(xc, backend)
        scale1, shift1 = scale_bias_from_stats(mean, var, count, self.norm1, backend, where)
        y, scale, shift = xc, scale1, shift1
        convs, norms = self._convs, self._norms
        for conv, norm in zip(convs[:-1], norms[1:]):
            y, scale, shift = conv_stats_scale_bias(y, conv, norm, scale, shift, backend, dtype, where)
        last = convs[-1]
        projection = self._projection()
        shortcut = x
        if projection is not None:  # (its statistics are not needed: that epilogue is wasted)
            conv = projection[1]
            shortcut, _, _ = ops.conv_bn_stats(xc, conv.weight.to(dtype), scale1, shift1, True, *_conv_args(conv),
                                               backend)
        if shortcut.dtype != dtype:  # autocast: timm's add promotes to the wider dtype
            out, _, _ = ops.conv_bn_stats(y, last.weight.to(dtype), scale, shift, True, *_conv_args(last), backend)
            return out + shortcut
        # The last conv adds the shortcut in its epilogue, and the sum's statistics are the
        # next block's norm1's (fusedres.handoff).
        out, mean, var = ops.conv_bn_stats(y, last.weight.to(dtype), scale, shift, True, *_conv_args(last), backend,
                                           residual=shortcut)
        handoff.remember(out, mean, var)
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding (timm.layers.make_divisible): the nearest multiple of
    `divisor`, at least `divisor`, and not below round_limit * v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def _channels_and_projection(in_chs: int, out_chs: int | None, bottle_ratio: float, stride: int, dilation: int,
                             first_dilation: int | None) -> tuple[int, int, int, PreActProjection | None]:
    """(first_dilation, out_chs, mid_chs, downsample) as timm's constructors derive them; a
    projection exactly where the block changes shape."""
    first_dilation = first_dilation or dilation
    out_chs = out_chs or in_chs
    changes = stride != 1 or in_chs != out_chs or first_dilation != dilation
    return (first_dilation, out_chs, make_divisible(out_chs * bottle_ratio),
            PreActProjection(in_chs, out_chs, stride) if changes else None)


class PreActBasicBlock(PreActBlockMixin, nn.Module):
    """Pre-activation basic block, fused: norm1 -> conv1 (3x3, stride) -> norm2 -> conv2 (3x3),
    plus the shortcut. Constructor as timm's PreActBasic (plain nn.Conv2d, BatchNormReLU;
    a projection exactly where the shape changes)."""

    _num_convs = 2

    def __init__(self, in_chs: int, out_chs: int | None = None, bottle_ratio: float = 1.0, stride: int = 1,
                 dilation: int = 1, first_dilation: int | None = None, groups: int = 1, *,
                 backend: str = "auto") -> None:
        super().__init__()
        first_dilation, out_chs, mid_chs, self.downsample = _channels_and_projection(
            in_chs, out_chs, bottle_ratio, stride, dilation, first_dilation)
        self.norm1 = BatchNormReLU(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 3, stride, first_dilation, first_dilation, groups, bias=False)
        self.norm2 = BatchNormReLU(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, 1, dilation, dilation, groups, bias=False)
        self.drop_path = nn.Identity()
        self._init_fused(backend)

    @property
    def _stride_conv(self) -> nn.Conv2d:
        return self.conv1


class PreActBottleneck(PreActBlockMixin, nn.Module):
    """Pre-activation bottleneck, fused: norm1 -> conv1 (1x1) -> norm2 -> conv2 (3x3, stride)
    -> norm3 -> conv3 (1x1), plus the shortcut. Constructor as timm's PreActBottleneck
    (bottle_ratio 0.25; plain nn.Conv2d, BatchNormReLU; a projection where the shape changes)."""

    _num_convs = 3

    def __init__(self, in_chs: int, out_chs: int | None = None, bottle_ratio: float = 0.25, stride: int = 1,
                 dilation: int = 1, first_dilation: int | None = None, groups: int = 1, *,
                 backend: str = "auto") -> None:
        super().__init__()
        first_dilation, out_chs, mid_chs, self.downsample = _channels_and_projection(
            in_chs, out_chs, bottle_ratio, stride, dilation, first_dilation)
        self.norm1 = BatchNormReLU(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = BatchNormReLU(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride, first_dilation, first_dilation, groups, bias=False)
        self.norm3 = BatchNormReLU(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.drop_path = nn.Identity()
        self._init_fused(backend)

    @property
    def _stride_conv(self) -> nn.Conv2d:
        return self.conv2


_TIMM_PREACT = {"PreActBasic": PreActBasicBlock, "PreActBottleneck": PreActBottleneck}


def is_timm_preact_block(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "timm.models.resnetv2" and cls.__name__ in _TIMM_PREACT


def from_timm(block: nn.Module, backend: str) -> PreActBlockMixin:
    """A fused block sharing `block`'s modules (parameters, buffers, train/eval flags)."""
    cls = _TIMM_PREACT[type(block).__name__]
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for name in fused.shared_module_names():
        setattr(fused, name, getattr(block, name))
    fused.training = block.training  # not .train(): that would reset each norm's own mode
    fused._init_fused(backend)
    return fused
