"""The interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fusedres import reference


class UnsupportedInputError(NotImplementedError):
    """An explicitly requested backend cannot run this input (the message says why)."""


class Backend:
    """One way to run the fusedres ops. Subclasses implement the ops they support."""

    name: str = ""
    # Whether scale_bias_act_with_mask returns a 1-bit ReLU mask for the backward (else the
    # backward reads the saved output).
    relu_mask: bool = False

    def device_types(self) -> tuple[str, ...]:
        """Device types this backend targets; `auto` skips it silently elsewhere."""
        raise NotImplementedError

    def targets(self, device_type: str) -> bool:
        types = self.device_types()
        return "*" in types or device_type in types

    def implementation(self, op: str) -> str:
        """Which code runs `op` here: this backend's name, or the name of the backend whose
        implementation it reuses (so that `auto` does not time the same code twice)."""
        return self.name

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        """Why this backend cannot run `op` on `tensors` (the op's tensor arguments in
        order, None for an absent optional one); empty when it can."""
        raise NotImplementedError

    # The op set. Signatures mirror fusedres.reference.
    def conv_bias_act(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend does not implement conv_bias_act")

    def bn_stats(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"the {self.name} backend does not implement bn_stats")

    def scale_bias_act(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend does not implement scale_bias_act")

    def scale_bias_act_with_mask(self, y, scale, bias, residual, residual_scale, residual_bias,
                                 relu) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, mask): scale_bias_act's output and its packed ReLU mask (uint8, 1 bit per
        element) when `relu_mask` is set; an empty mask otherwise."""
        out = self.scale_bias_act(y, scale, bias, residual, residual_scale, residual_bias, relu)
        return out, y.new_empty(0, dtype=torch.uint8)

    def bn_finalize(self, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of a train-mode BatchNorm from its batch statistics: weight *
        rsqrt(var + eps) and bias - mean * scale, in the statistics' dtype; differentiable."""
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(scale.dtype)
        return scale, shift

    def bn_update_running_stats(self, bn: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor,
                                count: int) -> None:
        """nn.BatchNorm2d's update, in place: num_batches_tracked += 1, then (count > 0) the
        running mean and unbiased running variance move by momentum, or by 1 /
        num_batches_tracked when momentum is None (cumulative average)."""
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            if count == 0:
                return  # nn.BatchNorm2d leaves the running statistics alone for an empty batch
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
            else:
                factor = bn.momentum
            unbiased_var = var * (count / (count - 1))
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
            bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype) * factor)

    def conv_bn_stats(self, x, weight, in_scale, in_shift, prologue_relu, stride, padding, dilation,
                      groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, mean, var) of `reference.conv_bn_stats`, composed from this backend's own
        `prologue` and `bn_stats` around ATen's convolution (cuDNN / oneDNN)."""
        a = x if in_scale is None else self.prologue(x, in_scale, in_shift, prologue_relu)
        y = F.conv2d(a, weight, None, stride, padding, dilation, groups)
        y = y.contiguous(memory_format=reference.conv_output_memory_format(x, weight))
        return (y, *self.bn_stats(y))

    def conv_backward(self, grad: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, need_input: bool,
                      need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(grad wrt the conv input a, grad wrt weight) of conv2d(a, weight); this default is
        ATen's convolution_backward (cuDNN on a GPU)."""
        grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_input, need_weight, False])
        return grad_a, grad_w

    # The elementwise parts of conv_bn_stats' backward (fusedres.ops.conv_train); the conv
    # backward itself runs through ATen's convolution_backward between them.

    def conv_bn_stats_grad_y(self, grad_y: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor,
                             grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None) -> torch.Tensor:
        """The total gradient of the conv output: grad_y + bn_stats_backward(y, mean, grad_mean,
        grad_var), in y's dtype and memory format (None grads add nothing)."""
        acc = mean.dtype
        # 1/count as a 0-d tensor: a Python float made from symbolic sizes trips AOT
        # autograd's dynamic-shape tracing when the sizes are those of an op's output.
        count = torch.full((), y.numel() // y.shape[1], dtype=acc, device=y.device)
        g = torch.zeros((), dtype=acc, device=y.device) if grad_y is None else grad_y.to(acc)
        if grad_mean is not None:
            g = g + _channel_view(grad_mean.to(acc)) / count
        if grad_var is not None:
            g = g + (y.to(acc) - _channel_view(mean)) * _channel_view(grad_var.to(acc)) * (2 / count)
        return g.expand(y.shape).to(y.dtype).contiguous(memory_format=reference.suggest_memory_format(y))

    def prologue(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
        """`reference.prologue`: relu?(x*scale + shift), recomputed for the weight gradient."""
        return reference.prologue(x, scale, shift, relu)

    def prologue_backward(self, grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          relu: bool, needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
        """(dx, dscale, dshift) of a = relu?(x*scale + shift) given da: the ReLU mask from the
        recomputed pre-activation, dx = da*scale (x's dtype and memory format), dscale =
        sum da*x and dshift = sum da per channel (accumulation dtype). `needs` says which of
        the three are wanted; the others are None."""
        acc = reference.accumulation_dtype(x.dtype)
        ga = grad_a.to(acc)
        if relu:
            pre = x.to(acc) * _channel_view(scale.to(acc)) + _channel_view(shift.to(acc))
            ga = ga.masked_fill(pre <= 0, 0)
        dims = (0, 2, 3)
        dx = dscale = dshift = None
        if needs[0]:
            dx = (ga * _channel_view(scale.to(acc))).to(x.dtype)
            dx = dx.contiguous(memory_format=reference.suggest_memory_format(x))
        if needs[1]:
            dscale = (ga * x.to(acc)).sum(dim=dims)
        if needs[2]:
            dshift = ga.sum(dim=dims)
        return dx, dscale, dshift

    # Backward of the train-mode BatchNorm ops, called by their autograd (fusedres.ops.bn)
    # on the backend that ran the forward. The defaults are the PyTorch formulas: the one
    # definition of these gradients, which kernels must match.

    def bn_stats_backward(self, y: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor | None,
                          grad_var: torch.Tensor | None) -> torch.Tensor:
        """dy of (mean, biased var) = bn_stats(y): grad_mean/count + (y - mean)*grad_var*2/count
        per channel (count = N*H*W; a None grad adds nothing), computed in the accumulation
        dtype, returned in y's dtype and memory format (reference.suggest_memory_format)."""
        count = y.numel() // y.shape[1]
        acc = mean.dtype
        grad = torch.zeros((), dtype=acc, device=y.device)
        if grad_mean is not None:
            grad = grad + _channel_view(grad_mean.to(acc)) / count
        if grad_var is not None:
            centered = y.to(acc) - _channel_view(mean)
            grad = grad + centered * _channel_view(grad_var.to(acc)) * (2.0 / count)
        grad = grad.expand(y.shape)
        return grad.to(y.dtype).contiguous(memory_format=reference.suggest_memory_format(y))

    def scale_bias_act_backward(self, grad: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor,
                                scale: torch.Tensor, residual: torch.Tensor | None,
                                residual_scale: torch.Tensor | None, needs: Sequence[bool],
                                mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        """(dy, dscale, dbias, dresidual, dresidual_scale, dresidual_bias) of
        `reference.scale_bias_act`, given the saved forward output `out` when it applied
        ReLU (else None) and `needs`, which of its first six inputs want a gradient.
        (Backends with `relu_mask` get their ReLU mask as `mask` instead of `out`.)

        g = grad masked where out <= 0 (a NaN output passes its gradient), in the
        accumulation dtype; dy = g*scale (y's dtype and memory format), dresidual = g, or
        g*residual_scale for a projection shortcut (residual's dtype and memory format);
        per channel over (N, H, W), in the accumulation dtype (the op casts each to its
        input's dtype): dscale = sum g*y, dbias = dresidual_bias = sum g, dresidual_scale =
        sum g*residual. None for what is not needed, and for a residual's (scale's) grads
        without a residual (scale).
        """
        acc = reference.accumulation_dtype(y.dtype)
        g = grad.masked_fill(out <= 0, 0) if out is not None else grad
        g = g.to(acc)
        dims = (0, 2, 3)
        grads: list[torch.Tensor | None] = [None] * 6
        if needs[0]:
            grads[0] = (g * _channel_view(scale.to(acc))).to(y.dtype)
        if needs[1]:
            grads[1] = (g * y.to(acc)).sum(dim=dims)
        if needs[2]:
            grads[2] = g.sum(dim=dims)
        if residual is not None:
            if residual_scale is None:
                if needs[3]:
                    grads[3] = g.to(residual.dtype)
            else:
                if needs[3]:
                    grads[3] = (g * _channel_view(residual_scale.to(acc))).to(residual.dtype)
                if needs[4]:
                    grads[4] = (g * residual.to(acc)).sum(dim=dims)
                if needs[5]:
                    grads[5] = g.sum(dim=dims)
        for i, like in ((0, y), (3, residual)):
            if grads[i] is not None:
                grads[i] = grads[i].contiguous(memory_format=reference.suggest_memory_format(like))
        return tuple(grads)


def _channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def bn_shape_reasons(tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """bn_stats's (y,) or scale_bias_act's (y, scale, bias, residual, residual_scale,
    residual_bias): y 4-D, a residual of y's shape, one element per channel for the rest."""
    y, *rest = tensors
    if y.dim() != 4:
        return [f"y must be 4-D (N, C, H, W), got shape {tuple(y.shape)}"]
    reasons = []
    names = ("scale", "bias", "residual", "residual_scale", "residual_bias")
    for name, t in zip(names, rest):
        if t is None:
            continue
        if not t.is_floating_point():
            reasons.append(f"{name} is {t.dtype}, not floating point")
        elif name == "residual" and t.shape != y.shape:
            reasons.append(f"residual has shape {tuple(t.shape)}, not y's {tuple(y.shape)} (the kernels do not "
                           f"broadcast)")
        elif name != "residual" and t.numel() != y.shape[1]:
            reasons.append(f"{name} has {t.numel()} elements, not one per channel ({y.shape[1]})")
    return reasons


def device_reasons(backend: Backend, tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """Reasons shared by all backends: the inputs' device types."""
    wanted = backend.device_types()
    devices = sorted({t.device.type for t in tensors if t is not None})
    bad = [d for d in devices if not backend.targets(d)]
    if bad:
        return [f"inputs are on {', '.join(bad)}; the {backend.name} backend runs on {', '.join(wanted)}"]
    return []
