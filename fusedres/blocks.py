"""Drop-in fused residual blocks: torchvision's BasicBlock and Bottleneck, run as fused ops.

They are subclasses with the same constructor, attributes, `expansion` and state_dict
keys, so `torchvision.models.ResNet(fusedres.Bottleneck, [3, 4, 6, 3])` works and
torchvision checkpoints load unchanged. The only addition is `backend=`.

Per conv/BN pair the block picks one of two paths, as nn.BatchNorm2d itself would:

* running statistics in use (eval mode): BN folded into the conv (`fusedres.folding`),
  one `conv_bias_act` op with bias, residual add and ReLU in its epilogue; a projection
  shortcut (1x1 conv + BN) is fused into the block's last conv.
* batch statistics (train mode, or no running stats): conv, `bn_stats`, and one
  `scale_bias_act` pass that applies BN, the residual (itself normalised, for a
  projection shortcut) and ReLU.

When every BN of a block uses batch statistics (plain training), the block runs as a
chain instead (the cuDNN "genstats" scheme): each `conv_bn_stats` returns its raw output
and that output's batch statistics, the next conv applies the BN + ReLU in its prologue
while loading its input, and one `scale_bias_act` pass ends the block. No normalised
activation is written in the forward pass or saved for the backward.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from fusedres import capture, cpu_plan, finite_guard, ops, reference, sync_bn
from fusedres.backends import check_backend_name, resolve_backend_name
from fusedres.batchnorm import batch_norm_scale_bias, check_count, scale_bias_from_stats
from fusedres.folding import FoldCache, cache_key, fold, needs_autograd, uses_batch_stats
from fusedres.shortcuts import ZeroPadShortcut, check_option_a


class Projection(NamedTuple):
    """A projection shortcut: `bn(conv(x))`, conv 1x1 with no padding."""

    x: torch.Tensor
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


def _subsampled(x: torch.Tensor, shortcut: ZeroPadShortcut) -> torch.Tensor:
    """The option-A shortcut without its zero channels: a strided view of x (no copy), which
    the block tail (`ops.scale_bias_act`) adds to the first channels of its output."""
    return x[:, :, ::shortcut.stride, ::shortcut.stride]


class ZeroPad(NamedTuple):
    """The option-A shortcut of `x` (fusedres.shortcuts.ZeroPadShortcut)."""

    x: torch.Tensor
    module: ZeroPadShortcut


def conv_reasons(name: str, conv: Any) -> list[str]:
    """Why `conv` is not a convolution the fused ops run (an nn.Conv2d with zero padding)."""
    if type(conv) is not nn.Conv2d:
        return [f"{name} is {type(conv).__name__}, not nn.Conv2d"]
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return [f"{name} uses padding {conv.padding!r} with padding_mode={conv.padding_mode!r}"]
    return []


def inactive(module: nn.Module | None) -> bool:
    """None, Identity, or a DropPath/DropBlock whose drop probability is 0."""
    if module is None or type(module) is nn.Identity:
        return True
    return getattr(module, "drop_prob", None) == 0


# nn.SyncBatchNorm: the same parameters and buffers; its train-mode statistics are reduced
# over its process group (fusedres.sync_bn). torchvision's FrozenBatchNorm2d (detection
# backbones): folded in train mode too.
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _bn_reasons(name: str, bn: Any) -> list[str]:
    if type(bn) not in _BATCH_NORMS:
        return [f"{name} is {type(bn).__name__}, not nn.BatchNorm2d, nn.SyncBatchNorm or torchvision's "
                "FrozenBatchNorm2d"]
    return []


def split_projection(downsample: nn.Module | None) -> tuple[list[nn.Module], nn.Conv2d, nn.BatchNorm2d] | None:
    """(pre-modules, conv, bn) when `downsample` is Sequential(*pre, 1x1 Conv2d, BatchNorm2d).

    torchvision's downsample has no pre-modules; timm's resnet*d ("avg-down") has an
    AvgPool2d (or Identity) first. Anything else is run as an opaque module.
    """
    if type(downsample) is not nn.Sequential or len(downsample) < 2:
        return None
    *pre, conv, bn = list(downsample)
    if conv_reasons("", conv) or _bn_reasons("", bn):
        return None
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1 or conv.dilation != (1, 1):
        return None
    return pre, conv, bn


def check_block_input(x: Any, where: str, in_channels: int, weight: torch.Tensor) -> None:
    """A block's input checks: a 4-D floating tensor with `in_channels` channels, non-empty
    spatially, on the parameters' device, in their dtype (or under autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where} expects a 4-D input (N, C={in_channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{where} expects {in_channels} input channels (N, {in_channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{where} expects a spatial size of at least 1x1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where} expects a floating-point input (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{where} has its parameters on {weight.device} but got an input on {x.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{where} has {weight.dtype} parameters but got a {x.dtype} input; convert the "
                        f"model with .to({x.dtype}) or run under torch.autocast")


def conv_stats_scale_bias(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, scale: torch.Tensor | None,
                          shift: torch.Tensor | None, backend: str, dtype: torch.dtype,
                          where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One link of the statistics chain: y = conv(relu(x*scale+shift), or x when scale is
    None), and the (scale, shift) of y's own BN from y's batch statistics."""
    y, mean, var = ops.conv_bn_stats(x.to(dtype), conv.weight.to(dtype), scale, shift, scale is not None,
                                     list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups,
                                     backend)
    count = y.numel() // y.shape[1]
    check_count(count, tuple(y.shape), where, bn)
    return y, *scale_bias_from_stats(mean, var, count, bn, backend, where)


def fold_costs_more(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether a BN with running statistics (eval, or frozen) is better applied after the conv
    than folded into it: when autograd records the fold, it is a pass over the weights in the
    forward and another in the backward, against the one pass over the conv's output (and one
    back) that applying the BN costs. So: fold unless autograd records it and the weights are
    at least as large as the output (small batches and late stages)."""
    if not needs_autograd(None, (conv, bn)):
        return False
    n, _, h, w = x.shape
    out_h = reference.conv_output_size(h, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    out_w = reference.conv_output_size(w, conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1])
    return conv.weight.numel() >= n * conv.out_channels * out_h * out_w


def bn_scale_bias(y: torch.Tensor, bn: nn.Module, backend: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with y*scale + shift == bn(y): from y's batch statistics where `bn` uses
    them (updating its running statistics), else from its running statistics (differentiable
    in its affine parameters)."""
    if uses_batch_stats(bn):
        return batch_norm_scale_bias(y, bn, backend, where)
    acc = reference.accumulation_dtype(y.dtype)
    return reference.bn_finalize(bn.running_mean.to(acc), bn.running_var.to(acc), bn.weight, bn.bias, bn.eps)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block's convolutions run in: autocast's, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class FusedBlockMixin:
    """The constructor and fused forward shared by BasicBlock and Bottleneck."""

    backend: str
    _fold_cache: FoldCache
    _conv_bn_names: tuple[tuple[str, str], ...]
    _has_shortcut = True  # False: a plain block (no residual add at all)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Any = None,
        *,
        backend: str = "auto",
        shortcut: str = "B",
    ) -> None:
        """torchvision's constructor (the next class in the MRO), then `backend=` and
        `shortcut=`: "B" (torchvision's: identity, or `downsample` where given) or "A" (the
        CIFAR ResNets' parameter-free zero-padding shortcut, `fusedres.shortcuts`, where the
        block changes shape; `downsample` must be None)."""
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        if shortcut == "A":
            out_channels = planes * self.expansion
            if downsample is not None:
                raise ValueError(f"{self.describe()}: shortcut='A' is parameter-free; pass downsample=None")
            check_option_a(inplanes, out_channels, stride, self.describe())
            if stride != 1 or out_channels != inplanes:
                self.downsample = ZeroPadShortcut(inplanes, out_channels, stride)
        elif shortcut != "B":
            raise ValueError(f"{type(self).__name__}: shortcut must be 'A' or 'B', got {shortcut!r}")
        self._init_fused(backend)

    def _init_fused(self, backend: str) -> None:
        self.backend = check_backend_name(backend)
        self._fold_cache = FoldCache()
        self._warned_fallback = False

    def shared_module_names(self) -> tuple[str, ...]:
        """The submodules a fused block shares with the block it was made from."""
        return (*(name for pair in self._conv_bn_names for name in pair), "downsample")

    def describe(self) -> str:
        conv1 = self.conv1
        return (f"fusedres.{type(self).__name__}(in_channels={conv1.in_channels}, "
                f"out_channels={self._last_conv().out_channels}, stride={self.stride})")

    def _last_conv(self) -> nn.Conv2d:
        return getattr(self, self._conv_bn_names[-1][0])

    def unfusable_reasons(self) -> list[str]:
        """Why this block cannot run fused (then it runs torchvision's forward)."""
        reasons: list[str] = []
        for conv_name, bn_name in self._conv_bn_names:
            reasons += conv_reasons(conv_name, getattr(self, conv_name))
            reasons += _bn_reasons(bn_name, getattr(self, bn_name))
        if type(self.relu) is not nn.ReLU:
            reasons.append(f"relu is {type(self.relu).__name__}, not nn.ReLU")
        return reasons

    def _check_input(self, x: torch.Tensor) -> None:
        check_block_input(x, self.describe(), self.conv1.in_channels, self.conv1.weight)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return compute_dtype(x)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor | Projection | None:
        if not self._has_shortcut:
            return None
        if self.downsample is None:
            return x
        if type(self.downsample) is ZeroPadShortcut:
            return ZeroPad(x, self.downsample)
        parts = split_projection(self.downsample)
        if parts is None:
            return self.downsample(x)
        pre, conv, bn = parts
        for module in pre:
            x = module(x)
        return Projection(x, conv, bn)

    def _conv_bn(self, name: str, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *,
                 relu: bool, backend: str, dtype: torch.dtype,
                 shortcut: torch.Tensor | Projection | None = None) -> torch.Tensor:
        """relu?(bn(conv(x)) + shortcut): folded, or conv then one `scale_bias_act` pass (batch
        statistics, or running statistics where folding under autograd costs more, see
        `fold_costs_more`)."""
        if uses_batch_stats(bn) or fold_costs_more(x, conv, bn):
            return self._conv_bn_batch_stats(x, conv, bn, relu=relu, backend=backend, dtype=dtype,
                                             shortcut=shortcut)
        weight, bias = self._fold_cache.folded(name, conv, bn, dtype)
        residual, shortcut_x, shortcut_weight, shortcut_stride = shortcut, None, None, [1, 1]
        if isinstance(shortcut, ZeroPad):  # read at its stride by the conv's epilogue (triton), no padded copy
            residual, shortcut_x = None, shortcut.x.to(dtype)
            shortcut_stride = [shortcut.module.stride] * 2
        elif isinstance(shortcut, Projection):
            if uses_batch_stats(shortcut.bn):
                residual = self._conv_bn("downsample", shortcut.x, shortcut.conv, shortcut.bn, relu=False,
                                         backend=backend, dtype=dtype)
            else:
                shortcut_weight, shortcut_bias = self._fold_cache.folded("downsample", shortcut.conv,
                                                                         shortcut.bn, dtype)
                residual, shortcut_x = None, shortcut.x.to(dtype)
                shortcut_stride = list(shortcut.conv.stride)
                bias = bias + shortcut_bias
        return ops.conv_bias_act(x.to(dtype), weight, bias, residual, shortcut_x, shortcut_weight,
                                 list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups,
                                 shortcut_stride, relu, backend)

    def _conv_bn_batch_stats(self, x, conv, bn, *, relu, backend, dtype, shortcut):
        where = f"{self.describe()}: "
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        scale, bias = bn_scale_bias(y, bn, backend, where)
        residual, residual_scale, residual_bias = shortcut, None, None
        if isinstance(shortcut, ZeroPad):  # the tail adds it to the first channels, unpadded
            residual = _subsampled(shortcut.x, shortcut.module)
        elif isinstance(shortcut, Projection):
            sc = shortcut.conv
            if uses_batch_stats(shortcut.bn) or fold_costs_more(shortcut.x, sc, shortcut.bn):
                residual = F.conv2d(shortcut.x, sc.weight, sc.bias, sc.stride, sc.padding, sc.dilation, sc.groups)
                residual_scale, residual_bias = bn_scale_bias(residual, shortcut.bn, backend, where)
            else:
                residual = self._conv_bn("downsample", shortcut.x, shortcut.conv, shortcut.bn, relu=False,
                                         backend=backend, dtype=dtype)
        return ops.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu, backend)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bound = self._fused_forward_bounded(x, None)
        if bound is not None:
            finite_guard.remember(out, bound)  # the next block need not read it (fusedres.finite_guard)
        return out

    def forward_with_bound(self, x: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, float | None]:
        """forward(x) for a caller that knows |x| <= bound (fusedres.stem's chain of blocks, where
        nothing touches a tensor between blocks): returns the output and a bound on it (None
        where unknown), so the NaN/Inf guard need not read x."""
        if self.unfusable_reasons():
            return self(x), None
        return self._fused_forward_bounded(x, bound)

    def _fused_forward_bounded(self, x: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, float | None]:
        """The fused forward, and a bound on its output where the CPU plan ran with checks on."""
        self._check_input(x)
        backend = resolve_backend_name(self.backend)
        dtype = self._compute_dtype(x)
        if cpu_plan.applies(x, backend, dtype, (self,)):
            plan = self._cpu_plan(dtype)
            if plan is not None:
                out, out_bound = plan.run(x, bound)
                if out is not None:
                    return out, out_bound
        return self._general_forward(x, backend, dtype), None

    def _general_forward(self, x: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
        if self._runs_as_train_chain(x):
            return self._train_chain(x, backend, dtype)
        out = x
        *inner, last = self._conv_bn_names
        for conv_name, bn_name in inner:
            out = self._conv_bn(conv_name, out, getattr(self, conv_name), getattr(self, bn_name), relu=True,
                                backend=backend, dtype=dtype)
        conv_name, bn_name = last
        return self._conv_bn(conv_name, out, getattr(self, conv_name), getattr(self, bn_name), relu=True,
                             backend=backend, dtype=dtype, shortcut=self._shortcut(x))

    def _cpu_plan(self, dtype: torch.dtype) -> cpu_plan.BlockPlan | None:
        """The block as prepacked oneDNN calls (fusedres.cpu_plan), rebuilt when a fold's key
        changes; None when a BN uses batch statistics."""
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._conv_bn_names]
        parts = split_projection(self.downsample) if self.downsample is not None else None
        keyed = pairs if parts is None else [*pairs, parts[1:]]
        if any(uses_batch_stats(bn) for _, bn in keyed):
            return None
        key = (dtype, id(self.downsample), *(cache_key(conv, bn, dtype) for conv, bn in keyed))
        if None in key:
            return None
        plan = self._fold_cache.plan
        if plan is None or plan.key != key:
            plan = self._fold_cache.plan = self._build_cpu_plan(key, pairs, parts, dtype)
        return plan

    def _build_cpu_plan(self, key, pairs, parts, dtype) -> cpu_plan.BlockPlan:
        folds = [fold(conv, bn, dtype) for conv, bn in pairs]
        shortcut = cpu_plan.Shortcut(none=not self._has_shortcut)
        if parts is not None:
            pre, conv, bn = parts
            weight, bias = fold(conv, bn, dtype)
            shortcut = cpu_plan.Shortcut(pre=pre, conv=cpu_plan.packed_conv(conv, weight, None))
            folds[-1] = (folds[-1][0], folds[-1][1] + bias)
        elif self.downsample is not None:
            shortcut = cpu_plan.Shortcut(module=self.downsample)
        convs = [cpu_plan.packed_conv(conv, w, b) for (conv, _), (w, b) in zip(pairs, folds)]
        return cpu_plan.BlockPlan(key, convs, shortcut, dtype, self.describe())

    def _runs_as_train_chain(self, x: torch.Tensor) -> bool:
        """Every BN (downsample's too) uses batch statistics, no conv has a bias, the batch
        is not empty, and the shortcut is the identity, option A or a plain projection. (An empty batch
        takes the per-pair path, as nn.BatchNorm2d handles it, except where a BN is
        synchronised: every rank must then make the same collectives in the same order.)
        The tail reads the option-A shortcut unpadded (`_subsampled`)."""
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._conv_bn_names]
        if self.downsample is not None and type(self.downsample) is not ZeroPadShortcut:
            parts = split_projection(self.downsample)
            if parts is None or parts[0]:
                return False
            pairs.append(parts[1:])
        if x.shape[0] == 0 and not any(sync_bn.needs_sync(bn) for _, bn in pairs):
            return False
        return all(uses_batch_stats(bn) and conv.bias is None for conv, bn in pairs)

    def _conv_stats_scale_bias(self, x, conv, bn, scale, shift, *, backend, dtype):
        return conv_stats_scale_bias(x, conv, bn, scale, shift, backend, dtype, f"{self.describe()}: ")

    def _train_chain(self, x: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
        y, scale, shift = x, None, None
        for conv_name, bn_name in self._conv_bn_names:
            y, scale, shift = self._conv_stats_scale_bias(y, getattr(self, conv_name), getattr(self, bn_name),
                                                          scale, shift, backend=backend, dtype=dtype)
        residual, residual_scale, residual_shift = (x if self._has_shortcut else None), None, None
        if type(self.downsample) is ZeroPadShortcut:
            residual = _subsampled(x, self.downsample)
        elif self.downsample is not None:
            _, conv, bn = split_projection(self.downsample)
            residual, residual_scale, residual_shift = self._conv_stats_scale_bias(
                x, conv, bn, None, None, backend=backend, dtype=dtype)
        return ops.scale_bias_act(y, scale, shift, residual, residual_scale, residual_shift, True, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if capture.is_fx_proxy(x):  # torch.fx: one call_module node (fusedres.capture)
            return capture.fx_leaf_call(self, x, self._unfused_forward)
        if capture.onnx_exporting():  # the original block's ops: the graph torchvision's own export gives
            return self._unfused_forward(x)
        reasons = self.unfusable_reasons()
        if reasons:
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(f"{self.describe()} runs unfused (torchvision's forward): " + "; ".join(reasons),
                              RuntimeWarning, stacklevel=2)
            return self._unfused_forward(x)
        return self._fused_forward(x)

    def __prepare_scriptable__(self) -> nn.Module:
        capture.refuse_scripting(self)

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class BasicBlock(FusedBlockMixin, tv_resnet.BasicBlock):
    """torchvision.models.resnet.BasicBlock, fused: 2 convs, ReLU, residual add."""

    _conv_bn_names = (("conv1", "bn1"), ("conv2", "bn2"))

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return tv_resnet.BasicBlock.forward(self, x)


class Bottleneck(FusedBlockMixin, tv_resnet.Bottleneck):
    """torchvision.models.resnet.Bottleneck, fused: 1x1 reduce, 3x3, 1x1 expand, residual add."""

    _conv_bn_names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return tv_resnet.Bottleneck.forward(self, x)



class PlainBlock(BasicBlock):
    """BasicBlock without its shortcut: relu(bn2(conv2(relu(bn1(conv1(x)))))), each conv-BN-ReLU
    fused. The "plain" networks of the degradation experiment (He et al. 2016) are made of
    these. No torchvision block computes this, so `revert` leaves it as it is."""

    _has_shortcut = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: Any = None, *,
                 backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, None, norm_layer=norm_layer, backend=backend)

    def _unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
