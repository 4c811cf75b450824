"""The typed inputs of every op a backend runs: one frozen dataclass per op family.

An op's inputs travel as one object from the op layer (`fusedres.ops`) through dispatch
(`fusedres.backends.select_backend`), the tuner and the backend's method, so nobody slices
argument tuples by position and every check sees the whole input. `Support` is what a
backend declares per op; `Support.reasons(inputs)` says why an input is outside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

Tensor = torch.Tensor


def _op_inputs(cls: type) -> type:
    """@dataclass(frozen=True), plus the class's field names in `names`."""
    cls = dataclass(frozen=True)(cls)
    cls.names = tuple(f.name for f in dataclasses.fields(cls))
    return cls


@dataclass(frozen=True)
class OpInputs:
    """Base of the op inputs: `op` names the op (messages, tuning keys), `main` the tensor
    whose dtype selects the kernel, `multiplied` the tensors that meet it in a matrix product
    (a kernel may need them in its dtype)."""

    op: ClassVar[str] = ""
    main: ClassVar[str] = ""
    multiplied: ClassVar[tuple[str, ...]] = ()

    # The field names, set once per class by @_op_inputs: dataclasses.fields() on every call
    # would cost microseconds per op call (and torch.compile traces these methods).
    names: ClassVar[tuple[str, ...]] = ()

    def args(self) -> tuple[Any, ...]:
        """The fields in order: the op's arguments, without `backend`."""
        return tuple(getattr(self, n) for n in self.names)

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) of every tensor given (an absent optional one is left out)."""
        return [(n, getattr(self, n)) for n in self.names if isinstance(getattr(self, n), Tensor)]

    def device_types(self) -> list[str]:
        """The tensors' device types, sorted (is_cpu / is_cuda first: building a device is slower)."""
        types = {"cpu" if v.is_cpu else "cuda" if v.is_cuda else v.device.type for _, v in self.named_tensors()}
        return sorted(types) if len(types) > 1 else list(types)

    def main_tensor(self) -> Tensor:
        return getattr(self, self.main)

    def shape_reasons(self) -> list[str]:
        """Shape constraints every kernel of this op has (none by default)."""
        return []


@_op_inputs
class ConvInputs(OpInputs):
    """fusedres::conv_bias_act: act(conv(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)),
    P(x) = relu(x*in_scale + in_shift) per channel (a pre-activation BN + ReLU) when given, else x.
    shortcut_x without shortcut_weight: the option-A shortcut, shortcut_x at shortcut_stride
    in the first channels, zeros in the rest (`reference.zero_pad_shortcut`)."""

    op: ClassVar[str] = "conv_bias_act"
    main: ClassVar[str] = "x"
    multiplied: ClassVar[tuple[str, ...]] = ("weight", "shortcut_x", "shortcut_weight")

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    residual: Tensor | None
    shortcut_x: Tensor | None
    shortcut_weight: Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    shortcut_stride: list[int]
    relu: bool
    in_scale: Tensor | None = None
    in_shift: Tensor | None = None


@_op_inputs
class ConvStatsInputs(OpInputs):
    """fusedres::conv_bn_stats: y = conv(relu?(x*in_scale + in_shift), weight) + residual and
    y's batch statistics (a residual: a pre-activation block's output, whose statistics are
    the next block's first BN's)."""

    op: ClassVar[str] = "conv_bn_stats"
    main: ClassVar[str] = "x"
    multiplied: ClassVar[tuple[str, ...]] = ("weight",)

    x: Tensor
    weight: Tensor
    in_scale: Tensor | None
    in_shift: Tensor | None
    prologue_relu: bool
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    residual: Tensor | None = None


@_op_inputs
class StatsInputs(OpInputs):
    """fusedres::bn_stats: per-channel mean and biased variance of y."""

    op: ClassVar[str] = "bn_stats"
    main: ClassVar[str] = "y"

    y: Tensor

    def shape_reasons(self) -> list[str]:
        return _activation_reasons(self.y)


@_op_inputs
class TailInputs(OpInputs):
    """fusedres::scale_bias_act, the block tail: act(y*scale + bias + r), r = residual or
    residual*residual_scale + residual_bias. The residual has y's shape, or fewer channels
    without a residual scale (`narrow_residual`: option A, where the rest add 0)."""

    op: ClassVar[str] = "scale_bias_act"
    main: ClassVar[str] = "y"

    y: Tensor
    scale: Tensor
    bias: Tensor
    residual: Tensor | None
    residual_scale: Tensor | None
    residual_bias: Tensor | None
    relu: bool

    def narrow_residual(self) -> bool:
        """Whether the residual is an option-A shortcut's: y's batch and spatial size with fewer
        channels (the rest add 0) and no residual scale."""
        r, y = self.residual, self.y
        return (r is not None and self.residual_scale is None and r.dim() == 4 and y.dim() == 4
                and r.shape[1] < y.shape[1] and (r.shape[0], *r.shape[2:]) == (y.shape[0], *y.shape[2:]))

    def shape_reasons(self) -> list[str]:
        reasons = _activation_reasons(self.y)
        if reasons:
            return reasons
        for name, t in self.named_tensors()[1:]:
            if name == "residual" and t.shape != self.y.shape and not self.narrow_residual():
                reasons.append(f"residual has shape {tuple(t.shape)}, not y's {tuple(self.y.shape)} (the kernels "
                               f"do not broadcast; only a residual without residual_scale may have fewer channels)")
            elif name != "residual" and t.numel() != self.y.shape[1]:
                reasons.append(f"{name} has {t.numel()} elements, not one per channel ({self.y.shape[1]})")
        return reasons


@_op_inputs
class FinalizeInputs(OpInputs):
    """A train-mode BatchNorm's finalize step: (scale, shift) from the batch statistics, and
    the running-statistics update (`running_*` None when the BN tracks none)."""

    op: ClassVar[str] = "bn_finalize"
    main: ClassVar[str] = "mean"

    mean: Tensor
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float


@_op_inputs
class ConvBackwardInputs(OpInputs):
    """The gradients of conv2d(a, weight) given the output's gradient `grad`."""

    op: ClassVar[str] = "conv_backward"
    main: ClassVar[str] = "grad"
    multiplied: ClassVar[tuple[str, ...]] = ("a", "weight")

    grad: Tensor
    a: Tensor
    weight: Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    need_input: bool
    need_weight: bool


def _activation_reasons(y: Tensor) -> list[str]:
    return [] if y.dim() == 4 else [f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}"]


@dataclass(frozen=True)
class Support:
    """What one backend's kernel for one op takes.

    `kernels` / `kernel` name the code in messages ("the Triton kernels", "the Triton kernel");
    `dtypes`: the main tensor's dtypes (None: any); `hint`: extra words for a dtype it
    refuses; `same_dtype`: the multiplied tensors must share the main tensor's dtype;
    `floating`: every other tensor must be floating point; `shapes`: the op's shape
    constraints apply (`OpInputs.shape_reasons`).
    """

    kernels: str = ""
    kernel: str = ""
    dtypes: tuple[torch.dtype, ...] | None = None
    hint: dict[torch.dtype, str] = dataclasses.field(default_factory=dict)
    same_dtype: bool = False
    floating: bool = False
    shapes: bool = False

    def reasons(self, inputs: OpInputs) -> list[str]:
        if self.dtypes is None and not (self.same_dtype or self.floating or self.shapes):
            return []  # nothing declared: every input is taken
        main = inputs.main_tensor()
        if self.shapes:
            shape = inputs.shape_reasons()
            if shape and main.dim() != 4:
                return shape
        else:
            shape = []
        if self.dtypes is not None and main.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes[:-1])
            last = str(self.dtypes[-1]).removeprefix("torch.")
            hint = self.hint.get(main.dtype, "")
            what = "float64" if main.dtype == torch.float64 else f"dtype {main.dtype}"
            return [f"{what} is not supported by {self.kernels} ({names} and {last} are{hint})"]
        reasons = []
        for name, t in inputs.named_tensors():
            if name == inputs.main:
                continue
            if self.same_dtype and name in inputs.multiplied and t.dtype != main.dtype:
                reasons.append(f"mixed dtypes: {inputs.main} is {main.dtype} but {name} is {t.dtype} "
                               f"({self.kernel} multiplies them in one dtype)")
            elif self.floating and name not in inputs.multiplied and not t.is_floating_point():
                reasons.append(f"{name} is {t.dtype}, not floating point")
        return reasons + shape
