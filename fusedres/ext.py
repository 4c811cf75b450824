"""The C++/CUDA extension fusedres._C: loading it, and the Python half of its ops.

The ops' schemas and kernels are C++ (csrc/); what PyTorch needs from Python is here: fake
implementations (so torch.compile and opcheck can trace them) and the autograd formula of
`ext_bn_finalize`. The other ext ops are kernels that the public ops' autograd calls
(fusedres.ops, through the `cuda` backend), so they need none.
"""

from __future__ import annotations

import torch

from fusedres import reference

BUILD_HINT = ("install torch first, then build with `pip install --no-build-isolation -e .` where a C++ compiler "
              "is found (README: Building the extension)")


# Set once, at the first call (fusedres.backends makes it at import): torch.compile traces
# through Python caches, so later calls must be plain reads.
_load_error: str | None = None
_kernels: dict[str, bool] = {}


def load_error() -> str:
    """Empty when fusedres._C is loaded (and its Python half registered), else why not."""
    global _load_error
    if _load_error is None:
        _load_error = _load()
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            _kernels[device_type] = not _load_error and torch._C._dispatch_has_kernel_for_dispatch_key(
                "fusedres::ext_bn_stats", key)
    return _load_error


def _load() -> str:
    try:
        import fusedres._C  # noqa: F401  (loading the library registers its ops)
    except ModuleNotFoundError:
        return f"the fusedres._C extension is not built ({BUILD_HINT})"
    except ImportError as e:  # e.g. built against another torch: undefined symbols
        return f"the fusedres._C extension failed to load ({e}); rebuild it against torch {torch.__version__}"
    _register_python_half()
    return ""


def has_kernels(device_type: str) -> bool:
    """Whether the loaded extension has kernels for this device type (CUDA ones are built
    only where a CUDA toolkit was found)."""
    load_error()
    return _kernels.get(device_type, False)


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=reference.suggest_memory_format(t))


def _per_channel(y: torch.Tensor) -> torch.Tensor:
    return y.new_empty(y.shape[1], dtype=reference.accumulation_dtype(y.dtype))


def _nothing(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.new_empty(0, dtype=dtype)


def _register_python_half() -> None:
    lib = "fusedres::"

    @torch.library.register_fake(lib + "ext_bn_stats")
    def _(y):
        return _per_channel(y), _per_channel(y)

    @torch.library.register_fake(lib + "ext_bn_finalize")
    def _(mean, var, weight, bias, eps):
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake(lib + "ext_bn_update_running_stats")
    def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
        return None

    @torch.library.register_fake(lib + "ext_scale_bias_act")
    def _(y, scale, bias, residual, residual_scale, residual_bias, relu):
        return _like(y), y.new_empty((y.numel() + 7) // 8 if relu else 0, dtype=torch.uint8)

    @torch.library.register_fake(lib + "ext_scale_bias_act_backward")
    def _(grad, mask, y, scale, residual, residual_scale, need_dy, need_dresidual):
        acc = reference.accumulation_dtype(y.dtype)
        dy = _like(y) if need_dy else _nothing(y)
        dres = _like(y) if need_dresidual and residual is not None else _nothing(y)
        dres_scale = _per_channel(y) if residual_scale is not None else _nothing(y, acc)
        return dy, _per_channel(y), _per_channel(y), dres, dres_scale

    @torch.library.register_fake(lib + "ext_conv_bn_stats_grad_y")
    def _(grad_y, y, mean, grad_mean, grad_var):
        return _like(y)

    @torch.library.register_fake(lib + "ext_prologue")
    def _(x, scale, shift, relu):
        return _like(x)

    @torch.library.register_fake(lib + "ext_prologue_backward")
    def _(grad_a, x, scale, shift, relu, need_dx):
        return (_like(x) if need_dx else _nothing(x)), _per_channel(x), _per_channel(x)

    torch.library.register_autograd(lib + "ext_bn_finalize", _finalize_backward, setup_context=_finalize_setup)


def _finalize_setup(ctx, inputs, output):
    mean, var, weight, bias, eps = inputs
    scale, _shift = output
    ctx.save_for_backward(mean, var, scale)
    ctx.eps = eps
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _finalize_backward(ctx, grad_scale, grad_shift):
    """scale = w * (var + eps)^-1/2, shift = b - mean * scale."""
    mean, var, scale = ctx.saved_tensors
    weight_dtype, bias_dtype = ctx.dtypes
    zero = torch.zeros((), dtype=mean.dtype, device=mean.device)
    g_scale = zero if grad_scale is None else grad_scale
    g_shift = zero if grad_shift is None else grad_shift
    total = g_scale - g_shift * mean  # everything that flows through scale
    needs = ctx.needs_input_grad
    grad_mean = (-g_shift * scale).expand_as(mean) if needs[0] else None
    grad_var = (-0.5 * total * scale / (var + ctx.eps)).expand_as(var) if needs[1] else None
    grad_weight = (total * torch.rsqrt(var + ctx.eps)).to(weight_dtype) if needs[2] else None
    grad_bias = g_shift.expand_as(mean).to(bias_dtype) if needs[3] else None
    return grad_mean, grad_var, grad_weight, grad_bias, None
