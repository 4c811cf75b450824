"""Convolution backward on NHWC (channels_last) tensors: dgrad (grad wrt the input) and
wgrad (grad wrt the weight), implicit GEMMs in the style of `fusedres.triton.conv`.

Notation: input x (N, C, H, W), weight (OC, Cg, KH, KW), grad_out (N, OC, P, Q), all NHWC in
memory; per group g, Cg = C/groups input and OCg = OC/groups output channels.

dgrad (`conv_dgrad`), per group:

    grad_in[n, h, w, c] = sum_{kh, kw, oc} grad_out[n, p, q, oc] * weight[oc, c, kh, kw],
    p = (h + pad_h - kh*dil_h) / stride_h, q likewise, terms kept only when the division is
    exact and 0 <= p < P, 0 <= q < Q.

* M = input pixels (rows), N = Cg (columns), K = (kh, kw, oc) with oc fastest: the A tile of
  one tap is BLOCK_K consecutive NHWC channels of grad_out per row (a contiguous load), and
  the weight is rearranged once per call into a [KH*KW*OCg, C] matrix (row (kh*KW+kw)*OCg + oc,
  column g*Cg + c).
* Stride without zero insertion, by phase: the input pixels are split into stride_h*stride_w
  phases (h % stride_h, w % stride_w) = (rh, rw) (grid axis 2). Within a phase, whether
  (h + pad_h - kh*dil_h) is divisible by stride_h depends on kh only, so a program visits only
  its phase's contributing taps: kh = kh0, kh0 + step_h, ... < KH with step_h = stride_h /
  gcd(stride_h, dil_h) and kh0 the first solution of kh*dil_h = rh + pad_h (mod stride_h)
  (none: no tap, the phase's gradient is 0). For h = rh + i*stride_h the output row is then
  p = i + (rh + pad_h - kh*dil_h) / stride_h (an exact division), masked to [0, P). A 3x3 conv
  with stride 2 thus does 9/4 taps per pixel on average, not 9 with 3/4 of them masked, and a
  1x1 stride-2 conv writes zeros to three phases without a single MMA.
* The K loop has the forward's two variants: tap mode (OCg a multiple of 16) iterates over
  (valid tap, BLOCK_K chunk of OCg); flat mode (other OCg) over BLOCK_K chunks of the
  flattened (valid tap, oc) axis, decomposed per element.

wgrad (`conv_wgrad`), per group, a GEMM with

* rows = OCg output channels (BLOCK_M), columns = (kh, kw, c) with c fastest (BLOCK_N), which
  is exactly the memory order of a channels_last weight (OC, KH, KW, Cg), and the reduction
  over the N*P*Q output pixels (BLOCK_K of them per step): A = grad_out^T tile [BLOCK_M,
  BLOCK_K], B = the x tile [BLOCK_K, BLOCK_N] gathered as in the forward (tap mode for Cg a
  multiple of 16: a column tile lies within one tap and loads BLOCK_N consecutive channels
  per pixel; flat mode otherwise).
* Split-K over the pixels: the reduction is long (N*P*Q ~ 800k at batch 256) while the output
  is small, so grid axis 2 splits the pixel tiles into SPLIT contiguous ranges; program s
  reduces range s into fp32 and stores it into row s of a [SPLIT, OC, KH*KW*Cg] partial
  buffer, and a second, elementwise kernel adds the SPLIT rows in the fixed order 0..SPLIT-1
  and casts. No atomics: for one config and SPLIT the result is deterministic. SPLIT is
  chosen by the launcher (enough programs for the GPU, >= _MIN_SPLIT_PIXELS pixels each, a
  cap on the partial buffer's size) or given; SPLIT = 1 stores the result directly.

Both accumulate in fp32 (tl.dot; float32 inputs use TF32 only when
torch.backends.cudnn.allow_tf32, as cuDNN does); global offsets are int64. bfloat16 tiles are
upcast to fp32 before tl.dot in the interpreter, whose bf16 dot is broken.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from fusedres.triton import common
from fusedres.triton.common import CL, ConvGeometry, IntPair, config, mma

# Hopper-sensible tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the prune
# functions shrink them to the problem.
_DGRAD_GPU_CONFIGS = common.configs((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                    (128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 32, 64, 4, 3), (64, 16, 64, 4, 3))
# wgrad: BLOCK_M = output channels, BLOCK_N = (kh, kw, c) columns, BLOCK_K = pixels.
_WGRAD_GPU_CONFIGS = common.configs((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                                    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (16, 64, 128, 4, 3))
# The interpreter's configs give several tiles even on the tests' tiny shapes.
_DGRAD_CONFIGS = common.select_configs(_DGRAD_GPU_CONFIGS, interpreted=config(32, 16, 16, 4, 1),
                                       fixed=config(64, 64, 32, 4, 3))
_WGRAD_CONFIGS = common.select_configs(_WGRAD_GPU_CONFIGS, interpreted=config(16, 16, 32, 4, 1),
                                       fixed=config(64, 64, 64, 4, 3))

_SPLIT_SUM_BLOCK = 256 if common.INTERPRET else 1024  # elements per program of the split-K sum
# Split-K defaults (see `_default_split`).
_MIN_SPLIT_PIXELS = 64 if common.INTERPRET else 1024  # pixels a split should reduce at least
_MAX_SPLIT = 4 if common.INTERPRET else 512
_MAX_PARTIAL_BYTES = 256 * 1024 * 1024  # the fp32 partial buffer's size cap


def _prune_dgrad_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cg, ocg, flat = args["Cg"], args["OCg"], args["FLAT_K"]
    return common.prune_configs(configs, (args["M0"], cg, args["K_TOTAL"] if flat else ocg), (0, 0 if flat else ocg),
                                args["g_ptr"].element_size(), common.smem_target(args["g_ptr"]), "A" if flat else "")


def _prune_wgrad_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    cg, flat = args["Cg"], args["FLAT_K"]
    pixels = triton.cdiv(args["M"], args["SPLIT"])  # per split
    return common.prune_configs(configs, (args["OCg"], args["K_TOTAL"] if flat else cg, pixels), (0 if flat else cg, 0),
                                args["g_ptr"].element_size(), common.smem_target(args["g_ptr"]), "B" if flat else "")


@triton.jit
def _group_tile(pid, size, BLOCK: tl.constexpr):
    """Program pid of the (group, tile) pairs over groups of `size` channels, tiles of BLOCK
    never straddling a group: (group, offsets in the group, their mask, global channels)."""
    tiles = tl.cdiv(size, BLOCK)
    g = pid // tiles
    offs = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    return g, offs, offs < size, g * size + offs


@triton.jit
def _first_tap(r, pad, dil, stride, step, KSIZE: tl.constexpr, STEP_BLOCK: tl.constexpr):
    """The smallest k in [0, min(step, KSIZE)) with (r + pad - k*dil) % stride == 0, else 1 << 30."""
    j = tl.arange(0, STEP_BLOCK)
    ok = (j < step) & (j < KSIZE) & ((r + pad - j * dil) % stride == 0)
    return tl.min(tl.where(ok, j, 1 << 30), axis=0)


@triton.autotune(configs=_DGRAD_CONFIGS, key=["M0", "C", "OC", "Cg", "OCg", "K_TOTAL", "stride_h", "stride_w"],
                 prune_configs_by={"early_config_prune": _prune_dgrad_configs})
@triton.jit
def _dgrad_kernel(
    g_ptr, w_ptr, out_ptr,
    NB, H, W, C, P, Q, OC, Cg, OCg, K_TOTAL, M0,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    KH: tl.constexpr, KW: tl.constexpr, STEP_BLOCK: tl.constexpr,
    FLAT_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    # Columns: input channels of group g.
    g, offs_n, mask_n, offs_c = _group_tile(pid_n, Cg, BLOCK_N)

    # This program's phase: input pixels h = rh + i*stride_h, w = rw + j*stride_w.
    rh = phase // stride_w
    rw = phase % stride_w
    Hp = tl.cdiv(H - rh, stride_h)  # 0 when rh >= H
    Wp = tl.cdiv(W - rw, stride_w)
    Mp = NB * Hp * Wp
    HWp = tl.maximum(Hp * Wp, 1)  # no division by zero for an empty phase (all rows masked)
    Wp1 = tl.maximum(Wp, 1)

    # Rows: the phase's pixels (n, i, j), int64 so that every offset built from them is int64.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Mp
    n_img = offs_m // HWp
    ij = offs_m % HWp
    i = ij // Wp1
    j = ij % Wp1
    offs_k = tl.arange(0, BLOCK_K)
    oc_base = g * OCg

    # The phase's taps: kh = kh0 + a*step_h (a < n_kh), kw = kw0 + b*step_w (b < n_kw).
    kh0 = _first_tap(rh, pad_h, dil_h, stride_h, step_h, KH, STEP_BLOCK)
    kw0 = _first_tap(rw, pad_w, dil_w, stride_w, step_w, KW, STEP_BLOCK)
    n_kh = tl.where(kh0 < KH, tl.cdiv(KH - kh0, step_h), 0)
    n_kw = tl.where(kw0 < KW, tl.cdiv(KW - kw0, step_w), 0)
    n_taps = tl.where(pid_m * BLOCK_M < Mp, n_kh * n_kw, 0)  # a tile past the phase's end does nothing

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        n_iters = tl.cdiv(n_taps * OCg, BLOCK_K)
    else:
        n_chunks = tl.cdiv(OCg, BLOCK_K)
        n_iters = n_taps * n_chunks
    for it in range(0, n_iters):
        if FLAT_K:
            kk = it * BLOCK_K + offs_k  # flattened (valid tap, oc) index
            mask_k = kk < n_taps * OCg
            t = kk // OCg
            oc = kk % OCg
            kh = kh0 + (t // n_kw) * step_h
            kw = kw0 + (t % n_kw) * step_w
            # Exact divisions for every valid tap (masked columns may be inexact: never used).
            p = i[:, None] + ((rh + pad_h - kh * dil_h) // stride_h)[None, :]
            q = j[:, None] + ((rw + pad_w - kw * dil_w) // stride_w)[None, :]
            a_mask = mask_m[:, None] & mask_k[None, :] & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
            a_ptrs = g_ptr + ((n_img[:, None] * P + p) * Q + q) * OC + (oc_base + oc)[None, :]
        else:
            t = it // n_chunks
            kh = kh0 + (t // n_kw) * step_h
            kw = kw0 + (t % n_kw) * step_w
            oc = (it % n_chunks) * BLOCK_K + offs_k
            mask_k = oc < OCg
            p = i + (rh + pad_h - kh * dil_h) // stride_h
            q = j + (rw + pad_w - kw * dil_w) // stride_w
            row_ok = mask_m & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
            a_mask = row_ok[:, None] & mask_k[None, :]
            a_ptrs = g_ptr + (((n_img * P + p) * Q + q) * OC + oc_base)[:, None] + oc[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        k = (kh * KW + kw) * OCg + oc  # row of the rearranged weight
        b_ptrs = w_ptr + k[:, None].to(tl.int64) * C + offs_c[None, :]
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)

    h = rh + i * stride_h
    w = rw + j * stride_w
    out_offs = (((n_img * H + h) * W + w) * C)[:, None] + offs_c[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["M", "OC", "OCg", "Cg", "K_TOTAL", "SPLIT", "stride_h", "stride_w"],
                 prune_configs_by={"early_config_prune": _prune_wgrad_configs})
@triton.jit
def _wgrad_kernel(
    g_ptr, x_ptr, part_ptr, out_ptr,
    M, H, W, C, P, Q, OC, Cg, OCg, K_TOTAL, SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    FLAT_K: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    # Rows: output channels of group g.
    g, offs_om, mask_om, offs_oc = _group_tile(pid_m, OCg, BLOCK_M)
    # Columns: (kh, kw, c) of group g's weight.
    if FLAT_K:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_col = cols < K_TOTAL
        tap = cols // Cg
        c = cols % Cg
    else:
        n_chunks = tl.cdiv(Cg, BLOCK_N)
        tap = pid_n // n_chunks
        c = (pid_n % n_chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_col = c < Cg
        cols = tap * Cg + c
    dh = (tap // KW) * dil_h - pad_h
    dw = (tap % KW) * dil_w - pad_w
    c_glob = g * Cg + c

    # This split's pixel tiles [t0, t1).
    r_tiles = tl.cdiv(M, BLOCK_K)
    per_split = tl.cdiv(r_tiles, SPLIT)
    t0 = pid_s.to(tl.int64) * per_split
    t1 = tl.minimum(t0 + per_split, r_tiles)
    # Output pixels (n, p, q) of the current tile, int64.
    offs_r = t0 * BLOCK_K + tl.arange(0, BLOCK_K)

    n_iters = tl.maximum(t1 - t0, 0).to(tl.int32)  # 0 for a split past the last tile: it stores zeros

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, n_iters):
        mask_r = offs_r < M
        n_img = offs_r // (P * Q)
        pq = offs_r % (P * Q)
        p = pq // Q
        q = pq % Q
        a_ptrs = g_ptr + offs_r[None, :] * OC + offs_oc[:, None]  # grad_out^T tile [BLOCK_M, BLOCK_K]
        a = tl.load(a_ptrs, mask=mask_om[:, None] & mask_r[None, :], other=0.0)
        if FLAT_K:
            h = (p * stride_h)[:, None] + dh[None, :]
            w = (q * stride_w)[:, None] + dw[None, :]
            b_mask = mask_r[:, None] & mask_col[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_ptrs = x_ptr + ((n_img[:, None] * H + h) * W + w) * C + c_glob[None, :]
        else:
            h = p * stride_h + dh
            w = q * stride_w + dw
            row_ok = mask_r & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_mask = row_ok[:, None] & mask_col[None, :]
            b_ptrs = x_ptr + (((n_img * H + h) * W + w) * C)[:, None] + c_glob[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)
        offs_r += BLOCK_K

    offs = offs_oc[:, None].to(tl.int64) * K_TOTAL + cols[None, :]
    mask = mask_om[:, None] & mask_col[None, :]
    if DIRECT:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # row pid_s of the partials; empty splits store zeros
        tl.store(part_ptr + pid_s.to(tl.int64) * OC * K_TOTAL + offs, acc, mask=mask)


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, TOTAL, SPLIT, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] in fp32, s = 0, 1, ..., SPLIT-1 (a fixed order), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += TOTAL  # 64-bit pointer arithmetic
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers


def _shape4(shape: Sequence[int], name: str) -> tuple[int, int, int, int]:
    try:
        t = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"{name} must be a sequence of 4 ints (N, C, H, W) / (OC, C/groups, KH, KW), "
                         f"got {shape!r}") from e
    if len(t) != 4 or min(t) < 0:
        raise ValueError(f"{name} must be 4 non-negative ints, got {shape!r}")
    return t


def _check_geometry(fn: str, input_shape, weight_shape, groups, stride, padding, dilation,
                    grad_out) -> ConvGeometry:
    """Validate the conv's geometry."""
    n, c_in, h_in, w_in = input_shape
    oc, cg, kh, kw = weight_shape
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if cg * groups != c_in:
        raise ValueError(f"the input has {c_in} channels, expected weight.shape[1] * groups = {cg} * {groups} = "
                         f"{cg * groups}")
    if oc % groups:
        raise ValueError(f"the weight has {oc} output channels, expected a multiple of groups={groups}")
    if min(kh, kw) < 1:
        raise ValueError(f"the kernel size must be >= 1, got {(kh, kw)}")
    st, pd, dl = common.pair(stride, "stride"), common.pair(padding, "padding"), common.pair(dilation, "dilation")
    if min(*st, *dl) < 1 or min(pd) < 0:
        raise ValueError(f"stride/dilation must be >= 1 and padding >= 0, got stride={st}, padding={pd}, "
                         f"dilation={dl}")
    p_out = common.conv_out_size(h_in, kh, st[0], pd[0], dl[0])
    q_out = common.conv_out_size(w_in, kw, st[1], pd[1], dl[1])
    if p_out < 1 or q_out < 1:
        raise ValueError(f"output size {(p_out, q_out)} is empty: input {(h_in, w_in)} is too small for kernel "
                         f"{(kh, kw)} with padding {pd} and dilation {dl}")
    if grad_out.dim() != 4 or tuple(grad_out.shape) != (n, oc, p_out, q_out):
        raise ValueError(f"{fn}: grad_out has shape {tuple(grad_out.shape)}, expected the conv's output shape "
                         f"{(n, oc, p_out, q_out)}")
    return ConvGeometry(n, c_in, h_in, w_in, oc, cg, oc // groups, groups, kh, kw, st, pd, dl, p_out, q_out)


def _check_tensors(fn: str, grad_out: torch.Tensor, other: torch.Tensor, other_name: str, out: torch.Tensor | None,
                   out_dtype: torch.dtype) -> None:
    if other.dim() != 4:
        raise ValueError(f"{fn} expects a 4-D {other_name}, got shape {tuple(other.shape)}")
    if grad_out.dtype not in common.DTYPES:
        raise TypeError(f"the Triton {fn} kernel supports float16, bfloat16 and float32, got {grad_out.dtype}")
    if other.dtype != grad_out.dtype:
        raise TypeError(f"{other_name} has dtype {other.dtype}, expected grad_out's dtype {grad_out.dtype}")
    if out is not None and out.dtype != out_dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {out_dtype}")
    common.check_device(grad_out.device, **{other_name: other, "out": out})
    if grad_out.device.type != "cuda" and not common.INTERPRET:
        raise ValueError(f"the Triton {fn} kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got grad_out on {grad_out.device}")


def _prepare(fn: str, grad_out: torch.Tensor, other: torch.Tensor, other_name: str, shape: Sequence[int],
             out: torch.Tensor | None, out_dtype: torch.dtype, stride, padding, dilation, groups,
             split_k: int | None = None) -> tuple[ConvGeometry, torch.Tensor]:
    """Validate a launcher's arguments (other: the weight for dgrad, x for wgrad; shape: the
    result's, x's for dgrad, the weight's for wgrad); returns the geometry and the output,
    allocated when `out` is None."""
    _check_tensors(fn, grad_out, other, other_name, out, out_dtype)
    dgrad = fn == "conv_dgrad"
    shape = _shape4(shape, "input_shape" if dgrad else "weight_shape")
    input_shape, weight_shape = (shape, tuple(other.shape)) if dgrad else (tuple(other.shape), shape)
    geo = _check_geometry(fn, input_shape, weight_shape, groups, stride, padding, dilation, grad_out)
    if split_k is not None and (not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1):
        raise ValueError(f"split_k must be a positive int or None, got {split_k!r}")
    if out is None:
        out = common.empty(shape, device=grad_out.device, dtype=out_dtype, memory_format=CL)
    else:
        common.check_out(out, shape)
    return geo, out


def conv_dgrad(grad_out: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int], stride: IntPair = (1, 1),
               padding: IntPair = (0, 0), dilation: IntPair = (1, 1), groups: int = 1, out: torch.Tensor | None = None,
               wrap_kernel: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """The gradient of conv2d(x, weight, stride, padding, dilation, groups) wrt x.

    grad_out (N, OC, P, Q) and weight (OC, C/groups, KH, KW) share one dtype (float16,
    bfloat16 or float32), in any memory format; input_shape is x's (N, C, H, W). Returns a new
    channels_last (N, C, H, W) tensor in grad_out's dtype, or writes into `out` (channels_last,
    same shape/dtype, aliasing no input). fp32 accumulation; float32 uses TF32 only when
    torch.backends.cudnn.allow_tf32. `wrap_kernel` as in `fusedres.triton.conv.conv_bias_act`.
    """
    geo, out = _prepare("conv_dgrad", grad_out, weight, "weight", input_shape, out, grad_out.dtype, stride, padding,
                        dilation, groups)
    if out.numel() == 0:
        return out
    if geo.oc == 0:
        return out.zero_()
    (sh, sw), (dh, dw), ocg, cg = geo.stride, geo.dilation, geo.ocg, geo.cg
    # [KH*KW*OCg, C]: row (kh*KW + kw)*OCg + oc, column g*Cg + c.
    w_k = (weight.reshape(geo.groups, ocg, cg, geo.kh, geo.kw).permute(3, 4, 1, 0, 2)
           .reshape(geo.kh * geo.kw * ocg, geo.c_in).contiguous())
    step_h, step_w = sh // math.gcd(sh, dh), sw // math.gcd(sw, dw)
    m0 = geo.n * triton.cdiv(geo.h, sh) * triton.cdiv(geo.w, sw)  # rows of the largest phase, (0, 0)

    def grid(meta):
        return (triton.cdiv(m0, meta["BLOCK_M"]), geo.groups * triton.cdiv(cg, meta["BLOCK_N"]), sh * sw)

    common.wrapped(_dgrad_kernel, wrap_kernel)[grid](
        grad_out.contiguous(memory_format=CL), w_k, out,
        geo.n, geo.h, geo.w, geo.c_in, geo.p_out, geo.q_out, geo.oc, cg, ocg, geo.kh * geo.kw * ocg, m0,
        sh, sw, *geo.padding, dh, dw, step_h, step_w,
        KH=geo.kh, KW=geo.kw, STEP_BLOCK=max(2, common.pow2_at_least(max(step_h, step_w))),
        FLAT_K=ocg % 16 != 0, **common.mma_options(grad_out.dtype),
    )
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_split(m: int, out_tiles: int, total: int, device: torch.device) -> int:
    """Split-K factor for wgrad: enough programs to fill the GPU (about two waves of ~128x128
    output tiles), each reducing at least _MIN_SPLIT_PIXELS pixels, with a partial buffer of at
    most _MAX_PARTIAL_BYTES."""
    if common.INTERPRET or device.type != "cuda":
        target = _MAX_SPLIT
    else:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = triton.cdiv(2 * _sm_count(idx), max(1, out_tiles))
    split = min(target, triton.cdiv(m, _MIN_SPLIT_PIXELS), _MAX_SPLIT, _MAX_PARTIAL_BYTES // max(1, 4 * total))
    return max(1, split)


def conv_wgrad(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], stride: IntPair = (1, 1),
               padding: IntPair = (0, 0), dilation: IntPair = (1, 1), groups: int = 1,
               out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None, split_k: int | None = None,
               wrap_kernel: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """The gradient of conv2d(x, weight, stride, padding, dilation, groups) wrt weight.

    grad_out (N, OC, P, Q) and x (N, C, H, W) share one dtype (float16, bfloat16 or float32),
    in any memory format; weight_shape is the weight's (OC, C/groups, KH, KW). Returns a new
    tensor of shape weight_shape in channels_last memory format ((OC, KH, KW, C/groups) in
    memory) and dtype `out_dtype` (default: grad_out's; PyTorch's is the weight's), or writes
    into `out` (channels_last, same shape/dtype). fp32 accumulation over the N*P*Q output
    pixels, split into `split_k` ranges (default: chosen for the device) reduced into fp32
    partials and summed in a fixed order: deterministic for one autotuning config.
    `wrap_kernel` as in `fusedres.triton.conv.conv_bias_act`.
    """
    out_dtype = grad_out.dtype if out_dtype is None else out_dtype
    if out_dtype not in common.DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    geo, out = _prepare("conv_wgrad", grad_out, x, "x", weight_shape, out, out_dtype, stride, padding, dilation,
                        groups, split_k)
    if out.numel() == 0:
        return out
    if geo.m == 0:
        return out.zero_()
    oc, cg, ocg, k_total, flat = geo.oc, geo.cg, geo.ocg, geo.k_total, geo.cg % 16 != 0
    total = oc * k_total
    if split_k is None:
        split_k = _default_split(geo.m, geo.groups * triton.cdiv(ocg, 128) * triton.cdiv(k_total, 128), total,
                                 grad_out.device)
    direct = split_k == 1
    part = out if direct else common.empty((split_k, oc, k_total), device=grad_out.device, dtype=torch.float32)

    def grid(meta):
        cols = triton.cdiv(k_total, meta["BLOCK_N"]) if flat else geo.kh * geo.kw * triton.cdiv(cg, meta["BLOCK_N"])
        return (cols, geo.groups * triton.cdiv(ocg, meta["BLOCK_M"]), split_k)

    common.wrapped(_wgrad_kernel, wrap_kernel)[grid](
        grad_out.contiguous(memory_format=CL), x.contiguous(memory_format=CL), part, out,
        geo.m, geo.h, geo.w, geo.c_in, geo.p_out, geo.q_out, oc, cg, ocg, k_total, split_k,
        *geo.stride, *geo.padding, *geo.dilation,
        KH=geo.kh, KW=geo.kw, FLAT_K=flat, DIRECT=direct, **common.mma_options(grad_out.dtype),
    )
    if not direct:
        common.wrapped(_split_sum_kernel, wrap_kernel)[(triton.cdiv(total, _SPLIT_SUM_BLOCK),)](
            part, out, total, split_k, BLOCK=_SPLIT_SUM_BLOCK)
    return out
