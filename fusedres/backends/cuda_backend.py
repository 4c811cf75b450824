"""The `cuda` backend: the C++/CUDA extension fusedres._C (csrc/).

Its kernels (CUDA on a GPU, C++ on the CPU; `fusedres.ext` loads them) do what the
convolution libraries do not fuse: the batch statistics of a conv output and their finalize
step (scale, shift, running statistics), the BatchNorm + ReLU applied to a conv input, the
block tail relu(y*scale + bias + residual) with a 1-bit ReLU mask, and their backward. The
convolutions themselves come from the platform library through ATen, as on the `torch`
backend: cuDNN (with its fused conv+bias+add+ReLU in eval mode) on a GPU, oneDNN on the CPU.

Train mode runs the same autograd structure as the triton backend (fusedres.ops): the
chain of `conv_bn_stats` (prologue kernel, conv, statistics kernel) ending in one tail pass.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fusedres import ext, reference
from fusedres.backends.inputs import ConvInputs, ConvStatsInputs, FinalizeInputs, StatsInputs, Support, TailInputs
from fusedres.backends.log import log_once
from fusedres.backends.torch_backend import TorchBackend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNELS = "the fusedres._C kernels"
_ACTIVATIONS = Support(kernels=_KERNELS, dtypes=_DTYPES, floating=True, shapes=True)

ext_ops = torch.ops.fusedres
ext.load_error()  # load now, not first inside a torch.compile trace (registering fakes there breaks the graph)


class CudaBackend(TorchBackend):
    name = "cuda"
    kernel_family = "fusedres._C"
    relu_mask = True
    SUPPORT = {
        ConvInputs: Support(),  # the torch backend's fused library convolutions
        ConvStatsInputs: Support(kernels=_KERNELS, dtypes=_DTYPES),
        StatsInputs: _ACTIVATIONS,
        TailInputs: _ACTIVATIONS,
        FinalizeInputs: Support(),
    }

    def device_types(self) -> tuple[str, ...]:
        return ("cuda", "cpu")

    def targets(self, device_type: str) -> bool:
        # On the CPU, `auto` considers this backend only where the extension was built: a
        # pure-Python install runs the torch backend there without a warning.
        return device_type == "cuda" or (device_type == "cpu" and ext.has_kernels("cpu"))

    def implementation(self, inputs) -> str:
        return "torch" if isinstance(inputs, ConvInputs) else self.name

    def backend_reasons(self, inputs) -> list[str]:
        devices = inputs.device_types()
        unknown = [d for d in devices if d not in self.device_types()]
        if unknown:
            return [f"inputs are on {', '.join(unknown)}; the cuda backend runs on cuda and cpu"]
        error = ext.load_error()
        if error:
            return [error]
        for device_type in devices:
            if not ext.has_kernels(device_type):
                return [f"fusedres._C was built without {device_type.upper()} kernels (at build time no CUDA "
                        f"toolkit was found, or FUSEDRES_BUILD_CUDA=0); rebuild where nvcc and CUDA_HOME are set"]
        return []

    # Train mode: the elementwise and statistics passes are extension kernels (conv_bn_stats
    # is Backend's composition of prologue, ATen's conv and bn_stats below).

    def bn_stats(self, inputs):
        return ext_ops.ext_bn_stats(inputs.y)

    def scale_bias_act(self, inputs):
        i = inputs
        residual = i.residual
        if i.narrow_residual():  # the extension's tail reads a residual of y's shape: pad it (a copy)
            log_once("fusedres: the cuda backend's tail pads the option-A shortcut to y's channels (a copy); "
                     "the triton and torch backends add it unpadded", logging.INFO)
            residual = F.pad(residual, (0, 0, 0, 0, 0, i.y.shape[1] - residual.shape[1]))
        return ext_ops.ext_scale_bias_act(i.y, i.scale, i.bias, residual, i.residual_scale, i.residual_bias, i.relu)

    def bn_finalize(self, inputs):
        i = inputs
        return ext_ops.ext_bn_finalize(i.mean, i.var, i.weight, i.bias, i.eps)

    def bn_update_running_stats(self, running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
        if count < 2:  # an empty batch only counts itself: nothing for a kernel to do
            return reference.bn_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                                     momentum, count)
        if running_mean.device != mean.device:
            log_once(f"fusedres: the running statistics are on {running_mean.device} and the batch statistics on "
                     f"{mean.device}: the cuda backend updates them with PyTorch ops", logging.WARNING)
            return reference.bn_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                                     momentum, count)
        ext_ops.ext_bn_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                                            count)

    # Backward passes (called by the public ops' autograd on the backend that ran the forward).

    def conv_bn_stats_grad_y(self, grad_y, y, mean, grad_mean, grad_var):
        return ext_ops.ext_conv_bn_stats_grad_y(grad_y, y, mean, grad_mean, grad_var)

    def prologue(self, x, scale, shift, relu):
        return ext_ops.ext_prologue(x, scale, shift, relu)

    def prologue_backward(self, grad_a, x, scale, shift, relu, needs):
        dx, dscale, dshift = ext_ops.ext_prologue_backward(grad_a, x, scale, shift, relu, needs[0])
        return (dx if needs[0] else None), (dscale if needs[1] else None), (dshift if needs[2] else None)

    def scale_bias_act_backward(self, grad, out, y, scale, residual, residual_scale, needs, mask=None):
        if out is not None and mask is None:  # an empty y gets no mask: the ReLU output was saved instead
            return super().scale_bias_act_backward(grad, out, y, scale, residual, residual_scale, needs)
        need_dres = bool(needs[3]) and residual is not None
        narrow = residual is not None and residual.shape[1] < y.shape[1]
        # Without residual_scale the kernel reads no residual value (dresidual = g), so y stands
        # in for a narrower (option-A) residual and dresidual keeps its first channels.
        dy, dscale, dbias, dres, dres_scale = ext_ops.ext_scale_bias_act_backward(
            grad, mask, y, scale, y if narrow else residual, residual_scale, bool(needs[0]), need_dres)
        if need_dres:
            dres = dres[:, :residual.shape[1]].to(residual.dtype).contiguous(
                memory_format=reference.suggest_memory_format(residual))
        has_scale = residual_scale is not None
        return ((dy if needs[0] else None), (dscale if needs[1] else None), (dbias if needs[2] else None),
                (dres if need_dres else None), (dres_scale if needs[4] and has_scale else None),
                (dbias if needs[5] and has_scale else None))

