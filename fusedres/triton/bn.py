"""Train-mode BatchNorm kernels on NHWC (channels_last) tensors: batch statistics, the
scale/bias/residual/ReLU pass, and both backwards.

Every activation is viewed as a row-major [M = N*H*W, C] matrix (NCHW inputs are first
made channels_last). Programs own [BLOCK_M, BLOCK_C] tiles: BLOCK_C consecutive channels
of BLOCK_M pixels, so every row of a tile is one contiguous load. Math is fp32 (fp64 in
the tiny combine steps); global offsets are int64. Per-channel reductions never use
atomics: each program writes one row of a [num_tiles, C] partial buffer and a second,
small kernel reduces those rows in a fixed order, so results are deterministic.

* `bn_stats`: each program reduces its tile to per-channel (count, mean, M2) with the
  corrected two-pass algorithm (Chan, Golub & LeVeque): m0 = sum(x)/n, d = x - m0,
  mean = m0 + sum(d)/n, M2 = sum(d^2) - sum(d)^2/n. The tile mean is stored as the pair
  (m0, sum(d)/n) so that a large mean keeps its low bits. The combine kernel merges the
  tiles in fp64 with Chan et al.'s parallel formula in its two-pass form:
  mean = sum(n_i*mean_i)/M, M2 = sum(M2_i + n_i*(mean_i - mean)^2).
* `scale_bias_act`: out = relu?(y*scale + bias + r), one elementwise pass. A residual that
  is not y's channels_last twin (another layout, or the option-A shortcut's subsampled view
  of the block input with fewer channels) is read through its strides, not copied.
* `scale_bias_act_backward`: one pass over grad/out/y/residual writes dy and dresidual and
  the tile's partial sums of g*y, g and g*residual (only those asked for); a column-sum
  kernel adds the partials up in fp64.
* the backward of `bn_stats` (dy = grad_mean/count + (y - mean)*grad_var*2/count) is
  `fusedres.triton.prologue.conv_bn_stats_grad_y` without its grad_y term.

Semantics: `fusedres.reference` and the PyTorch backward formulas in
`fusedres.backends.base.Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fusedres import reference
from fusedres.triton import common
from fusedres.triton.common import CL, tile

# BLOCK_M, BLOCK_C, num_warps of the statistics kernel. The interpreter runs every program in
# Python: small tiles, so that the CPU tests cover several row and channel tiles and their
# masked tails.
_STATS = (32, 16, 4) if common.INTERPRET else (256, 32, 8)


def _stats_config(c: int) -> tuple[int, int, int]:
    block_m, block_c, warps = _STATS
    return block_m, min(block_c, common.pow2_at_least(c)), warps


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _stats_partial_kernel(y_ptr, m0_ptr, dm_ptr, m2_ptr, M, C,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    x = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    m0 = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - m0[None, :], 0.0)
    sd = tl.sum(d, axis=0)
    sd2 = tl.sum(d * d, axis=0)
    # An infinite m0 makes every d infinite or NaN: keep the mean at m0 (as a plain sum
    # would give) and let M2 be NaN (as the reference's variance is).
    dm = tl.where(tl.abs(m0) < float("inf"), sd / n, 0.0)
    m2 = sd2 - sd * dm  # sum(d^2) - sum(d)^2 / n
    out = pid_m * C + cols
    tl.store(m0_ptr + out, m0, mask=mask_c)
    tl.store(dm_ptr + out, dm, mask=mask_c)
    tl.store(m2_ptr + out, m2, mask=mask_c)


@triton.jit
def _residual_tile(pid_m, cols, mask, H, W, CR, r_sn, r_sc, r_sh, r_sw, BLOCK_M: tl.constexpr):
    """Offsets and mask of this tile's residual elements when the residual is a strided view
    (the option-A shortcut `x[:, :, ::s, ::s]`) with CR <= C channels: row m = (n, h, w) reads
    residual[n, c, h, w] through its strides, and channels c >= CR add nothing."""
    rws = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rws // (H * W)
    hw = rws % (H * W)
    base = n * r_sn + (hw // W) * r_sh + (hw % W) * r_sw
    return base[:, None] + cols[None, :].to(tl.int64) * r_sc, mask & (cols < CR)[None, :]


@triton.jit
def _sba_forward_kernel(y_ptr, scale_ptr, bias_ptr, r_ptr, rs_ptr, rb_ptr, out_ptr, M, C,
                        H, W, CR, r_sn, r_sc, r_sh, r_sw,
                        HAS_RES: tl.constexpr, RES_AFFINE: tl.constexpr, RES_STRIDED: tl.constexpr,
                        RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + cols, mask=mask_c, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=mask_c, other=0.0)
    acc = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + bias[None, :]
    if HAS_RES:
        if RES_STRIDED:
            r_offs, r_mask = _residual_tile(pid_m, cols, mask, H, W, CR, r_sn, r_sc, r_sh, r_sw, BLOCK_M)
        else:
            r_offs, r_mask = offs, mask
        r = tl.load(r_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            rs = tl.load(rs_ptr + cols, mask=mask_c, other=0.0)
            rb = tl.load(rb_ptr + cols, mask=mask_c, other=0.0)
            r = r * rs[None, :] + rb[None, :]
        acc = acc + r
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, like torch.relu
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sba_backward_kernel(g_ptr, out_ptr, y_ptr, scale_ptr, r_ptr, rs_ptr, dy_ptr, dr_ptr, part_ptr, M, C,
                         H, W, CR, r_sn, r_sc, r_sh, r_sw,
                         RELU: tl.constexpr, RES_AFFINE: tl.constexpr, RES_STRIDED: tl.constexpr,
                         NEED_DY: tl.constexpr, NEED_DR: tl.constexpr, SLOT_GY: tl.constexpr,
                         SLOT_G: tl.constexpr, SLOT_GR: tl.constexpr, NR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, cols, mask_c, mask, offs = tile(M, C, BLOCK_M, BLOCK_C)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(out <= 0, 0.0, g)  # a NaN output passes its gradient, as masked_fill does
    if NEED_DY:
        scale = tl.load(scale_ptr + cols, mask=mask_c, other=0.0)
        tl.store(dy_ptr + offs, (g * scale[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)
    # dresidual is a fresh channels_last tensor of the residual's shape (CR channels); a
    # strided residual is read through its strides.
    if RES_STRIDED:
        r_offs, r_mask = _residual_tile(pid_m, cols, mask, H, W, CR, r_sn, r_sc, r_sh, r_sw, BLOCK_M)
        rws = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dr_offs = rws[:, None] * CR + cols[None, :]
    else:
        r_offs, r_mask, dr_offs = offs, mask, offs
    if NEED_DR:
        if RES_AFFINE:
            rs = tl.load(rs_ptr + cols, mask=mask_c, other=0.0)
            tl.store(dr_ptr + dr_offs, (g * rs[None, :]).to(dr_ptr.dtype.element_ty), mask=r_mask)
        else:
            tl.store(dr_ptr + dr_offs, g.to(dr_ptr.dtype.element_ty), mask=r_mask)
    part = part_ptr + pid_m * (NR * C) + cols
    if SLOT_GY >= 0:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part + SLOT_GY * C, tl.sum(g * y, axis=0), mask=mask_c)
    if SLOT_G >= 0:
        tl.store(part + SLOT_G * C, tl.sum(g, axis=0), mask=mask_c)
    if SLOT_GR >= 0:
        r = tl.load(r_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(part + SLOT_GR * C, tl.sum(g * r, axis=0), mask=mask_c)


# ---------------------------------------------------------------------------------------
# Launchers


def _check_y(y: torch.Tensor) -> None:
    common.check_activation("y", y)
    if y.dtype not in common.DTYPES:
        raise TypeError(f"the Triton BatchNorm kernels support float16, bfloat16 and float32, got {y.dtype}")


def _as_reference_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The kernels write channels_last; give the memory format the reference gives."""
    if reference.suggest_memory_format(like) != CL:
        out = out.contiguous()
    return out


def bn_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of y over (N, H, W), both fp32 of shape (C,)."""
    _check_y(y)
    n, c, h, w = y.shape
    m = n * h * w
    mean = common.empty(c, dtype=torch.float32, device=y.device)
    var = common.empty(c, dtype=torch.float32, device=y.device)
    if c == 0:
        return mean, var
    if m == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))  # the mean of nothing, as torch.mean
    block_m, block_c, warps = _stats_config(c)
    p = triton.cdiv(m, block_m)
    m0, dm, m2 = (common.empty((p, c), dtype=torch.float32, device=y.device) for _ in range(3))
    _stats_partial_kernel[(p, triton.cdiv(c, block_c))](
        common.rows(y), m0, dm, m2, m, c, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    # The combine is shared with the conv kernel's statistics epilogue; here every partial
    # row holds block_m values (the last one fewer), so no count buffer (m0 stands in).
    common.combine_stats(m0, m0, dm, m2, mean, var, m, p, block_m, False)
    return mean, var


class _Residual:
    """How the tail kernels read a residual: as y's row-major matrix when it is a
    channels_last tensor of y's shape, else through its own strides (`RES_STRIDED`: any
    layout, and a narrower residual whose channels beyond its own add 0, the option-A
    shortcut's subsampled view of the block input). No copy either way."""

    def __init__(self, residual: torch.Tensor | None, y: torch.Tensor, affine: bool):
        self.tensor, self.strided, self.layout = residual, False, (0, 0, 0, 0, 0)
        if residual is None:
            return
        common.check_activation("residual", residual)
        n, c, h, w = y.shape
        rn, rc, rh, rw = residual.shape
        if (rn, rh, rw) != (n, h, w) or rc > c or (affine and rc != c):
            need = "y's shape" if affine else f"(N, C_r, H, W) with C_r <= {c}"
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {need} for y of shape "
                             f"{tuple(y.shape)}")
        self.strided = rc != c or not residual.is_contiguous(memory_format=CL)
        if self.strided:
            self.layout = (rc, *residual.stride())


def scale_bias_act(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                   residual_scale: torch.Tensor | None = None, residual_bias: torch.Tensor | None = None,
                   relu: bool = False) -> torch.Tensor:
    """relu?(y*scale + bias + r), r = residual*residual_scale + residual_bias when a residual
    scale is given, else residual; fp32 math, one cast to y's dtype, in the memory format
    `fusedres.reference.scale_bias_act` gives."""
    _check_y(y)
    n, c, h, w = y.shape
    scale_t, bias_t = common.channels("scale", scale, c, y.device), common.channels("bias", bias, c, y.device)
    if residual is None:
        residual_scale = None  # as the reference: no residual, nothing to scale
    elif residual_scale is not None and residual_bias is None:
        raise ValueError("residual_scale needs residual_bias")
    res_t = rs_t = rb_t = scale_t
    res = _Residual(residual, y, residual_scale is not None)
    if residual is not None:
        res_t = res.tensor
        if residual_scale is not None:
            rs_t = common.channels("residual_scale", residual_scale, c, y.device)
            rb_t = common.channels("residual_bias", residual_bias, c, y.device)
    out = common.like(y)
    m = n * h * w
    if m and c:
        grid, meta = common.elementwise_launch(m, c)
        _sba_forward_kernel[grid](common.rows(y), scale_t, bias_t, res_t, rs_t, rb_t, out, m, c, h, w, *res.layout,
                                  HAS_RES=residual is not None, RES_AFFINE=residual_scale is not None,
                                  RES_STRIDED=res.strided, RELU=relu, **meta)
    return _as_reference_format(out, y)


def sba_backward_outputs(needs: Sequence[bool], residual: torch.Tensor | None,
                         residual_scale: torch.Tensor | None) -> tuple[bool, ...]:
    """Which of (dy, dscale, dbias, dresidual, dresidual_scale, dresidual_bias) the backward
    of scale_bias_act computes for `needs` (the op's needs_input_grad for its first six
    inputs): the residual's grads exist only with a residual, its scale's and bias's only
    with a residual scale."""
    has_res, affine = residual is not None, residual is not None and residual_scale is not None
    return (bool(needs[0]), bool(needs[1]), bool(needs[2]), has_res and bool(needs[3]),
            affine and bool(needs[4]), affine and bool(needs[5]))


def scale_bias_act_backward(grad: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor, scale: torch.Tensor,
                            residual: torch.Tensor | None, residual_scale: torch.Tensor | None,
                            needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """(dy, dscale, dbias, dresidual, dresidual_scale, dresidual_bias) of scale_bias_act.

    g = grad where out > 0 or out is NaN (out: the saved forward output when relu, else None).
    dy = g*scale in y's dtype, dresidual = g (or g*residual_scale) in residual's dtype,
    each in the reference's memory format; dscale = sum g*y, dbias = dresidual_bias = sum g,
    dresidual_scale = sum g*residual per channel, in fp32. None where not computed
    (`sba_backward_outputs`).
    """
    _check_y(y)
    common.check_activation("grad", grad, y.shape)
    if out is not None:
        common.check_activation("out", out, y.shape)
    n, c, h, w = y.shape
    m = n * h * w
    want = sba_backward_outputs(needs, residual, residual_scale)
    need_dy, need_gy, need_g, need_dr, need_gr, need_rb = want
    scale_t = common.channels("scale", scale, c, y.device)
    rs_t = scale_t
    res_t = y
    res = _Residual(residual, y, residual_scale is not None)
    if residual is not None:
        res_t = residual
        if residual_scale is not None:
            rs_t = common.channels("residual_scale", residual_scale, c, y.device)
    dy = common.like(y) if need_dy else None
    dr = common.like(residual) if need_dr else None
    sums = common.ChannelSums((("gy", need_gy), ("g", need_g or need_rb), ("gr", need_gr)), c, y.device)
    if m and c and (need_dy or need_dr or sums.nr):
        grid, meta = common.elementwise_launch(m, c)
        y_t = common.rows(y) if need_gy else y
        part = sums.partials(grid[0], y_t)
        _sba_backward_kernel[grid](
            common.rows(grad), common.rows(out) if out is not None else y_t, y_t, scale_t, res_t, rs_t,
            dy if dy is not None else y_t, dr if dr is not None else y_t, part, m, c, h, w, *res.layout,
            RELU=out is not None, RES_AFFINE=residual_scale is not None, RES_STRIDED=res.strided,
            NEED_DY=need_dy, NEED_DR=need_dr,
            SLOT_GY=sums.slot("gy"), SLOT_G=sums.slot("g"), SLOT_GR=sums.slot("gr"), NR=sums.nr, **meta)
        sums.reduce(part)
    else:
        sums.zero()
    g_sum = sums.get("g")
    return (
        None if dy is None else _as_reference_format(dy, y),
        sums.get("gy"),
        g_sum if need_g else None,
        None if dr is None else _as_reference_format(dr, residual),
        sums.get("gr"),
        (g_sum.clone() if need_g else g_sum) if need_rb else None,  # dbias and dresidual_bias: two tensors
    )
