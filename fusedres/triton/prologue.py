"""The elementwise passes of `fusedres::conv_bn_stats`' backward (fusedres.ops.conv_train)
as Triton kernels on NHWC (channels_last) tensors.

The op's backward is: fold the statistics' gradient into the conv output's
(`conv_bn_stats_grad_y`; with grad_y None it is the backward of `fusedres.triton.bn.bn_stats`
alone), recompute the prologue a = relu?(x*scale + shift) for the weight
gradient (`prologue`), run ATen's convolution_backward, and push the input gradient
through the prologue (`prologue_backward`). Layout and conventions are those of
`fusedres.triton.bn`: every activation is the row-major [M = N*H*W, C] matrix of its
channels_last form, programs own [BLOCK_M, BLOCK_C] tiles, math is fp32 with one cast to
the output dtype, offsets are int64, and per-channel sums are per-tile partials reduced in
a fixed order, in fp64, by a second kernel (deterministic, no atomics).

Semantics: the PyTorch defaults of `fusedres.backends.base.Backend` of the same names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fusedres import reference
from fusedres.triton import common
from fusedres.triton.common import CL, tile

# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _grad_y_kernel(gy_ptr, y_ptr, mean_ptr, gm_ptr, gv_ptr, out_ptr, M, C, count, two_over_count,
                   HAS_GY: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    _, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # The default's order: grad_y + grad_mean/count + (y - mean)*grad_var*(2/count).
    if HAS_GY:
        acc += tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GM:
        gm = tl.load(gm_ptr + cols, mask=mask_c, other=0.0)
        acc += (gm / count)[None, :]
    if HAS_GV:
        gv = tl.load(gv_ptr + cols, mask=mask_c, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=mask_c, other=0.0)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += (y - mean[None, :]) * gv[None, :] * two_over_count
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prologue_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, M, C,
                     RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    _, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + cols, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=mask_c, other=0.0)
    # The same fp32 expression as the conv kernel's prologue (fusedres.triton.conv).
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prologue_backward_kernel(ga_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, part_ptr, M, C,
                              RELU: tl.constexpr, LOAD_X: tl.constexpr, NEED_DX: tl.constexpr,
                              SLOT_GX: tl.constexpr, SLOT_G: tl.constexpr, NR: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=mask_c, other=0.0)
    if LOAD_X:  # RELU or SLOT_GX >= 0
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        shift = tl.load(shift_ptr + cols, mask=mask_c, other=0.0)
        pre = x * scale[None, :] + shift[None, :]
        ga = tl.where(pre <= 0, 0.0, ga)  # a NaN pre-activation passes its gradient, as masked_fill does
    if NEED_DX:
        tl.store(dx_ptr + offs, (ga * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + pid_m * (NR * C) + cols
    if SLOT_GX >= 0:
        tl.store(part + SLOT_GX * C, tl.sum(ga * x, axis=0), mask=mask_c)
    if SLOT_G >= 0:
        tl.store(part + SLOT_G * C, tl.sum(ga, axis=0), mask=mask_c)


# ---------------------------------------------------------------------------------------
# Launchers


def _check_main(name: str, t: torch.Tensor) -> None:
    common.check_activation(name, t)
    if t.dtype not in common.DTYPES:
        raise TypeError(f"the Triton prologue kernels support float16, bfloat16 and float32, got {name} {t.dtype}")


def _as_reference_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The kernels write channels_last; give the memory format the defaults give, with the
    canonical strides the ops' fakes (empty_like(..., memory_format=...)) have."""
    if reference.suggest_memory_format(like) != CL:
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def conv_bn_stats_grad_y(grad_y: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor,
                         grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None) -> torch.Tensor:
    """g = grad_y + grad_mean/count + (y - mean)*grad_var*2/count (count = N*H*W; a None
    grad adds nothing: grad_y None gives the backward of `fusedres.triton.bn.bn_stats`),
    fp32 math, in y's dtype and the default's memory format for y."""
    _check_main("y", y)
    n, c, h, w = y.shape
    m = n * h * w
    if grad_y is not None:
        common.check_activation("grad_y", grad_y, y.shape)
    mean_t = common.channels("mean", mean, c, y.device)
    gm_t = common.channels("grad_mean", grad_mean, c, y.device) if grad_mean is not None else mean_t
    gv_t = common.channels("grad_var", grad_var, c, y.device) if grad_var is not None else mean_t
    out = common.like(y)
    if m and c:
        grid, meta = common.elementwise_launch(m, c)
        y_t = common.rows(y) if grad_var is not None else out
        gy_t = common.rows(grad_y) if grad_y is not None else out
        _grad_y_kernel[grid](gy_t, y_t, mean_t, gm_t, gv_t, out, m, c, float(m), 2.0 / m, HAS_GY=grad_y is not None,
                             HAS_GM=grad_mean is not None, HAS_GV=grad_var is not None, **meta)
    return _as_reference_format(out, y)


def prologue(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> torch.Tensor:
    """relu?(x*scale + shift) per channel, fp32 math, in x's dtype and the default's memory
    format for x (`fusedres.reference.prologue`)."""
    _check_main("x", x)
    n, c, h, w = x.shape
    m = n * h * w
    scale_t, shift_t = common.channels("scale", scale, c, x.device), common.channels("shift", shift, c, x.device)
    out = common.like(x)
    if m and c:
        grid, meta = common.elementwise_launch(m, c)
        _prologue_kernel[grid](common.rows(x), scale_t, shift_t, out, m, c, RELU=relu, **meta)
    return _as_reference_format(out, x)


def prologue_backward(grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool,
                      needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """(dx, dscale, dshift) of a = relu?(x*scale + shift), in one pass over grad_a and x.

    ga = grad_a where the recomputed pre-activation x*scale + shift is > 0 or NaN (only
    with relu); dx = ga*scale in x's dtype and the default's memory format for x; dscale =
    sum ga*x and dshift = sum ga per channel over (N, H, W), fp32. `needs` says which of
    the three to compute; the others are None.
    """
    _check_main("x", x)
    common.check_activation("grad_a", grad_a, x.shape)
    need_dx, need_gx, need_g = (bool(v) for v in needs)
    n, c, h, w = x.shape
    m = n * h * w
    scale_t, shift_t = common.channels("scale", scale, c, x.device), common.channels("shift", shift, c, x.device)
    dx = common.like(x) if need_dx else None
    sums = common.ChannelSums((("gx", need_gx), ("g", need_g)), c, x.device)
    if m and c and (need_dx or sums.nr):
        grid, meta = common.elementwise_launch(m, c)
        x_t = common.rows(x) if relu or need_gx else scale_t
        part = sums.partials(grid[0], scale_t)
        _prologue_backward_kernel[grid](
            common.rows(grad_a), x_t, scale_t, shift_t, dx if dx is not None else scale_t, part, m, c,
            RELU=relu, LOAD_X=relu or need_gx, NEED_DX=need_dx, SLOT_GX=sums.slot("gx"), SLOT_G=sums.slot("g"),
            NR=sums.nr, **meta)
        sums.reduce(part)
    else:
        sums.zero()
    return None if dx is None else _as_reference_format(dx, x), sums.get("gx"), sums.get("g")
