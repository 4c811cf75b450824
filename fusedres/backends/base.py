"""The interface every backend implements: one method per op, each taking that op's typed
inputs (`fusedres.backends.inputs`), and the support each backend declares per op."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from fusedres import reference
from fusedres.backends.inputs import (
    ConvBackwardInputs,
    ConvInputs,
    ConvStatsInputs,
    FinalizeInputs,
    OpInputs,
    StatsInputs,
    Support,
    TailInputs,
)

Tensor = torch.Tensor
OptionalGrads = tuple[Tensor | None, ...]


class UnsupportedInputError(NotImplementedError):
    """An explicitly requested backend cannot run this input (the message says why)."""


class Backend:
    """One way to run the fusedres ops.

    A backend declares in `SUPPORT` which ops it runs and on what (`Support`: dtypes,
    dtype agreement, shapes); `not_supported_reasons` adds what concerns the backend as a
    whole (devices, a missing build). Forward ops take their inputs object; the backward
    passes, called by the ops' autograd on the backend that ran the forward, take tensors.
    The defaults are `fusedres.reference`'s formulas (and ATen's convolution).
    """

    name: str = ""
    kernel_family: str = ""  # "no {kernel_family} kernel for {op}"
    # Whether scale_bias_act returns a 1-bit ReLU mask for the backward (else the backward
    # reads the saved output).
    relu_mask: bool = False
    SUPPORT: ClassVar[dict[type[OpInputs], Support]] = {}

    def device_types(self) -> tuple[str, ...]:
        """Device types this backend targets; `auto` skips it silently elsewhere."""
        raise NotImplementedError

    def targets(self, device_type: str) -> bool:
        types = self.device_types()
        return "*" in types or device_type in types

    def implementation(self, inputs: OpInputs) -> str:
        """Which code runs this op here: this backend's name, or the name of the backend whose
        implementation it reuses (so that `auto` does not time the same code twice)."""
        return self.name

    def backend_reasons(self, inputs: OpInputs) -> list[str]:
        """Why this backend cannot run anything on these inputs (devices, a missing build)."""
        bad = [d for d in inputs.device_types() if not self.targets(d)]
        if bad:
            return [f"inputs are on {', '.join(bad)}; the {self.name} backend runs on {', '.join(self.device_types())}"]
        return []

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        """Why this backend cannot run `inputs`' op on them; empty when it can."""
        reasons = self.backend_reasons(inputs)
        support = self.SUPPORT.get(type(inputs))
        if support is None:
            return [*reasons, f"no {self.kernel_family} kernel for {inputs.op}"]
        return reasons + support.reasons(inputs)

    # ----- forward ops (fusedres.ops) -----

    def conv_bias_act(self, inputs: ConvInputs) -> Tensor:
        """`reference.conv_bias_act` (eval-mode conv with folded BN, residual, ReLU)."""
        raise NotImplementedError(f"the {self.name} backend does not implement conv_bias_act")

    def conv_bn_stats(self, inputs: ConvStatsInputs) -> tuple[Tensor, Tensor, Tensor]:
        """(y, mean, var) of `reference.conv_bn_stats`, composed from this backend's own
        `prologue` and `bn_stats` around ATen's convolution (cuDNN / oneDNN)."""
        i = inputs
        a = i.x if i.in_scale is None else self.prologue(i.x, i.in_scale, i.in_shift, i.prologue_relu)
        y = F.conv2d(a, i.weight, None, i.stride, i.padding, i.dilation, i.groups)
        if i.residual is not None:  # as the reference: added in the accumulation dtype, then rounded
            acc = reference.accumulation_dtype(y.dtype)
            y = (y.to(acc) + i.residual.to(acc)).to(y.dtype)
        y = y.contiguous(memory_format=reference.conv_output_memory_format(i.x, i.weight))
        return (y, *self.bn_stats(StatsInputs(y)))

    def bn_stats(self, inputs: StatsInputs) -> tuple[Tensor, Tensor]:
        """`reference.bn_stats`: per-channel mean and biased variance."""
        return reference.bn_stats(inputs.y)

    def scale_bias_act(self, inputs: TailInputs) -> tuple[Tensor, Tensor]:
        """(out, mask): `reference.scale_bias_act`'s output and its packed ReLU mask (uint8,
        1 bit per element) when `relu_mask` is set; an empty mask otherwise."""
        i = inputs
        out = reference.scale_bias_act(i.y, i.scale, i.bias, i.residual, i.residual_scale, i.residual_bias, i.relu)
        return out, i.y.new_empty(0, dtype=torch.uint8)

    def bn_finalize(self, inputs: FinalizeInputs) -> tuple[Tensor, Tensor]:
        """`reference.bn_finalize`: (scale, shift) from batch statistics; differentiable."""
        i = inputs
        return reference.bn_finalize(i.mean, i.var, i.weight, i.bias, i.eps)

    def bn_update_running_stats(self, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                                mean: Tensor, var: Tensor, momentum: float | None, count: int) -> None:
        """`reference.bn_update_running_stats`, in place."""
        reference.bn_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count)

    def conv_backward(self, inputs: ConvBackwardInputs) -> tuple[Tensor | None, Tensor | None]:
        """(grad wrt the conv input a, grad wrt weight) of conv2d(a, weight): ATen's
        convolution_backward (cuDNN on a GPU)."""
        return aten_conv_backward(inputs)

    # ----- backward passes (called by fusedres.ops' autograd) -----

    def conv_bn_stats_grad_y(self, grad_y: Tensor | None, y: Tensor, mean: Tensor, grad_mean: Tensor | None,
                             grad_var: Tensor | None) -> Tensor:
        """`reference.conv_bn_stats_grad_y`; with grad_y None it is bn_stats' backward."""
        return reference.conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)

    def prologue(self, x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
        """`reference.prologue`: relu?(x*scale + shift), recomputed for the weight gradient."""
        return reference.prologue(x, scale, shift, relu)

    def prologue_backward(self, grad_a: Tensor, x: Tensor, scale: Tensor, shift: Tensor, relu: bool,
                          needs: tuple[bool, bool, bool]) -> OptionalGrads:
        """`reference.prologue_backward`: (dx, dscale, dshift), None where not needed."""
        return reference.prologue_backward(grad_a, x, scale, shift, relu, needs)

    def scale_bias_act_backward(self, grad: Tensor, out: Tensor | None, y: Tensor, scale: Tensor,
                                residual: Tensor | None, residual_scale: Tensor | None, needs: tuple[bool, ...],
                                mask: Tensor | None = None) -> OptionalGrads:
        """`reference.scale_bias_act_backward`. (A backend with `relu_mask` gets its ReLU mask
        as `mask` and `out` None.)"""
        return reference.scale_bias_act_backward(grad, out, y, scale, residual, residual_scale, needs)


def aten_conv_backward(inputs: ConvBackwardInputs) -> tuple[Tensor | None, Tensor | None]:
    """ATen's convolution_backward for conv2d(a, weight) without bias."""
    i = inputs
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        i.grad, i.a, i.weight, None, i.stride, i.padding, i.dilation, False, [0, 0], i.groups,
        [i.need_input, i.need_weight, False])
    return grad_a, grad_w
