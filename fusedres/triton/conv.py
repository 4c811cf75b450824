"""Fused implicit-GEMM convolution on NHWC (channels_last) tensors.

    out = act(conv2d(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight))
    (shortcut_weight None: shortcut_x at shortcut_stride added to the first channels, the
    option-A shortcut, read in place)

with the optional input prologue P(x) = relu?(x * in_scale[c] + in_shift[c]) (fp32 math,
applied before the conv's zero padding: padded taps contribute 0). Semantics otherwise
match `fusedres.reference.conv_bias_act`.

GEMM view, per group g:

* M = N*P*Q output pixels (rows), N = OC/groups output channels (columns),
* K = KH*KW*Cg, ordered (kh, kw, c) with c fastest, so the A tile of one tap is BLOCK_K
  consecutive NHWC channels of one input pixel per row (a contiguous load), and the
  weight is rearranged once per call into a K-major [KH*KW*Cg, OC] matrix.

Grid: axis 0 tiles M; axis 1 enumerates (group, N tile) pairs, N tiles never straddle
a group. Each program runs one K loop with two variants (a constexpr):

* tap mode (Cg a multiple of 16): iteration i covers tap i // ceil(Cg/BLOCK_K) and a
  BLOCK_K chunk of that tap's channels; the K tail of every tap is masked.
* flat mode (other Cg: the 3-channel stem, ResNeXt's 4-channel groups): iteration i covers
  K indices [i*BLOCK_K, (i+1)*BLOCK_K) of the flattened (kh, kw, c) axis, decomposed per
  element, so tiny Cg does not waste most of every BLOCK_K >= 16 tile.

A projection shortcut adds a second K loop over shortcut_x's channels (1x1, groups=1,
stride shortcut_stride) into the same fp32 accumulator, so its output is never written.
The epilogue (bias, residual, ReLU, cast) runs in fp32. Global offsets are int64.

Two launchers share the kernel: `conv_bias_act` (the fused epilogue above) and
`conv_bn_stats`, which returns y = conv2d(P(x), weight) with its batch statistics.

Batch statistics (`conv_bn_stats`, the cuDNN "genstats" scheme; no bias/residual/shortcut/ReLU):
the epilogue rounds its tile to the output dtype and back (the statistics are those of
the stored y, as `reference.conv_bn_stats` computes them) and reduces its valid rows per
channel with the corrected two-pass algorithm `fusedres.triton.bn` uses: m0 = sum(y)/n,
d = y - m0, tile mean = m0 + sum(d)/n kept as the pair (m0, sum(d)/n), M2 = sum(d^2) -
sum(d)^2/n. The launcher cannot know the autotuner's BLOCK_M before the launch, so the
[rows, OC] partial buffers have one row per STATS_TILE_M (the smallest BLOCK_M of any
config) output pixels: the program for M tile i (BLOCK_M = k * STATS_TILE_M) writes row
i*k, and the per-row count buffer holds its number of valid pixels there and 0 in rows
i*k+1 .. i*k+k-1 (written only by the programs of N tile 0). A second kernel
(`fusedres.triton.common.combine_stats`) merges the rows with a nonzero count in a fixed
order, in fp64 (Chan et al.'s parallel formula in its two-pass form): mean =
sum(n_i*mean_i)/M, var = sum(M2_i + n_i*(mean_i - mean)^2)/M.
No atomics: for one config the result is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from fusedres.triton import common
from fusedres.triton.common import CL, ConvGeometry, config, mma

# Hopper-sensible tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); `_prune_configs`
# shrinks BLOCK_N/BLOCK_K to the problem.
_GPU_CONFIGS = common.configs((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3), (128, 32, 64, 4, 4),
                              (64, 16, 64, 4, 3))
_CONFIGS = common.select_configs(_GPU_CONFIGS, interpreted=config(32, 16, 16, 4, 1), fixed=config(64, 64, 32, 4, 3))

# Rows of the statistics partial buffers: one per this many output pixels (every config's
# BLOCK_M is a multiple of it; see the module docstring).
_STATS_TILE_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)


def _prune_configs(configs, named_args, **kwargs):
    """Shrink BLOCK_N / BLOCK_K to the problem (tiny groups, stem) and drop duplicates, configs
    whose estimated shared memory exceeds the device's and configs that spill registers
    (measured by fusedres.bench.compiled: 255 registers and spills beyond these per-thread sizes)."""
    args = {**named_args, **kwargs}
    cg, flat_k = args["Cg"], args["FLAT_K"]
    prologue, stats = bool(args.get("HAS_PROLOGUE")), bool(args.get("STATS"))
    fp32_tiles = bool(args.get("HAS_RES")) or stats  # the epilogue holds a second fp32 tile

    def spills(bm: int, bn: int, bk: int, threads: int) -> bool:
        acc = bm * bn // threads  # fp32 accumulators a thread holds
        return (fp32_tiles and acc > 64) or (prologue and acc + bm * bk // threads > 96)

    return common.prune_configs(configs, (None, args["OCg"], args["K_TOTAL"] if flat_k else cg),
                                (0, 0 if flat_k else cg), args["x_ptr"].element_size(),
                                common.smem_target(args["x_ptr"]), "A" if flat_k else "", prologue or stats, spills)


# HAS_RES / HAS_PROLOGUE are in the key because the pruning (register pressure) depends on them.
@triton.autotune(configs=_CONFIGS,
                 key=["M", "OC", "OCg", "Cg", "K_TOTAL", "Cs", "STATS", "HAS_RES", "HAS_PROLOGUE"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, sx_ptr, sw_ptr, scale_ptr, shift_ptr, out_ptr,
    cnt_ptr, m0_ptr, dm_ptr, m2_ptr, P_ROWS,
    M, H, W, C, P, Q, OC, Cg, OCg, K_TOTAL,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    Hs, Ws, Cs, sstride_h, sstride_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SHORTCUT: tl.constexpr, SHORTCUT_PAD: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, RELU: tl.constexpr,
    FLAT_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    STATS: tl.constexpr, STATS_TILE_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles = tl.cdiv(OCg, BLOCK_N)
    g = pid_n // n_tiles
    tile_n = pid_n % n_tiles

    # Rows: output pixels (n, p, q), int64 so that every offset built from them is int64.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n_img = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    # Columns: output channels of group g.
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < OCg
    offs_oc = g * OCg + offs_n
    offs_k = tl.arange(0, BLOCK_K)
    c_base = g * Cg

    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        n_iters = tl.cdiv(K_TOTAL, BLOCK_K)
    else:
        n_chunks = tl.cdiv(Cg, BLOCK_K)
        n_iters = KH * KW * n_chunks
    for it in range(0, n_iters):
        if FLAT_K:
            k = it * BLOCK_K + offs_k  # flattened (kh, kw, c) index
            mask_k = k < K_TOTAL
            tap = k // Cg
            c = k % Cg
            h = h0[:, None] + ((tap // KW) * dil_h)[None, :]
            w = w0[:, None] + ((tap % KW) * dil_w)[None, :]
            a_mask = mask_m[:, None] & mask_k[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_ptrs = x_ptr + ((n_img[:, None] * H + h) * W + w) * C + (c_base + c)[None, :]
        else:
            tap = it // n_chunks
            c = (it % n_chunks) * BLOCK_K + offs_k
            mask_k = c < Cg
            k = tap * Cg + c
            h = h0 + (tap // KW) * dil_h
            w = w0 + (tap % KW) * dil_w
            row_ok = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_mask = row_ok[:, None] & mask_k[None, :]
            a_ptrs = x_ptr + (((n_img * H + h) * W + w) * C + c_base)[:, None] + c[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            scale = tl.load(scale_ptr + c_base + c, mask=mask_k, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + c_base + c, mask=mask_k, other=0.0).to(tl.float32)
            v = a.to(tl.float32) * scale[None, :] + shift[None, :]
            if PROLOGUE_RELU:
                v = tl.where(v < 0, 0.0, v)  # keeps NaN, like torch.relu
            a = tl.where(a_mask, v, 0.0).to(x_ptr.dtype.element_ty)  # zero padding after the prologue
        b_ptrs = w_ptr + k[:, None] * OC + offs_oc[None, :]
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)

    if HAS_SHORTCUT:
        s_row = ((n_img * Hs + p * sstride_h) * Ws + q * sstride_w) * Cs
    if HAS_SHORTCUT and SHORTCUT_PAD:
        # Option A: shortcut_x at the stride, read in place, in the first Cs channels; 0 in the rest.
        acc += tl.load(sx_ptr + s_row[:, None] + offs_oc[None, :],
                       mask=mask_m[:, None] & (mask_n & (offs_oc < Cs))[None, :], other=0.0).to(tl.float32)
    elif HAS_SHORTCUT:
        # 1x1 projection shortcut, groups=1: a second K loop over shortcut_x's channels.
        for c0 in range(0, Cs, BLOCK_K):
            c = c0 + offs_k
            mask_k = c < Cs
            a = tl.load(sx_ptr + s_row[:, None] + c[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(sw_ptr + c[:, None] * OC + offs_oc[None, :], mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)

    # Epilogue in fp32.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_oc, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m[:, None] * OC + offs_oc[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, y, mask=out_mask)

    if STATS:
        # Per-channel partials of the stored (rounded) y over this tile's valid rows.
        tl.static_assert(BLOCK_M % STATS_TILE_M == 0)
        n_valid = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M)  # >= 1
        nf = n_valid.to(tl.float32)
        yv = tl.where(mask_m[:, None], y.to(tl.float32), 0.0)
        m0 = tl.sum(yv, axis=0) / nf
        d = tl.where(mask_m[:, None], yv - m0[None, :], 0.0)
        sd = tl.sum(d, axis=0)
        sd2 = tl.sum(d * d, axis=0)
        # An infinite m0 makes every d infinite or NaN: keep the mean at m0 and let M2 be
        # NaN (as the reference's variance is). A NaN m0 gives NaN mean and M2.
        dm = tl.where(tl.abs(m0) < float("inf"), sd / nf, 0.0)
        m2 = sd2 - sd * dm  # sum(d^2) - sum(d)^2 / n
        row = pid_m.to(tl.int64) * (BLOCK_M // STATS_TILE_M)  # this tile's first partial row
        p_offs = row * OC + offs_oc  # columns of this group / N tile at their global channel
        tl.store(m0_ptr + p_offs, m0, mask=mask_n)
        tl.store(dm_ptr + p_offs, dm, mask=mask_n)
        tl.store(m2_ptr + p_offs, m2, mask=mask_n)
        if pid_n == 0:
            sub = tl.arange(0, BLOCK_M // STATS_TILE_M)  # the tile's partial rows
            cnt = tl.where(sub == 0, n_valid, 0).to(tl.int32)
            tl.store(cnt_ptr + row + sub, cnt, mask=row + sub < P_ROWS)




# ---------------------------------------------------------------------------------------
# Launchers


def _check_tensors(x: torch.Tensor, weight: torch.Tensor, same_dtype: dict[str, torch.Tensor | None],
                   floating: dict[str, torch.Tensor | None]) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_bias_act expects a 4-D x (N, C, H, W) and a 4-D weight (OC, C/groups, KH, KW), "
                         f"got x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)}")
    if x.dtype not in common.DTYPES:
        raise TypeError(f"the Triton conv_bias_act kernel supports float16, bfloat16 and float32, got {x.dtype}")
    for name, t in {"weight": weight, **same_dtype}.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    for name, t in floating.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    common.check_device(x.device, weight=weight, **same_dtype, **floating)
    if x.device.type != "cuda" and not common.INTERPRET:
        raise ValueError(f"the Triton conv_bias_act kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got x on {x.device}")


def _main_geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups,
                   shortcut_stride) -> ConvGeometry:
    n, c_in, h_in, w_in = x.shape
    oc, cg, kh, kw = weight.shape
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if cg * groups != c_in:
        raise ValueError(f"x has {c_in} channels, expected weight.shape[1] * groups = {cg} * {groups} = {cg * groups}")
    if oc % groups:
        raise ValueError(f"weight has {oc} output channels, expected a multiple of groups={groups}")
    (st_h, st_w), (ph, pw) = common.pair(stride, "stride"), common.pair(padding, "padding")
    (dh, dw), (ssh, ssw) = common.pair(dilation, "dilation"), common.pair(shortcut_stride, "shortcut_stride")
    if min(st_h, st_w, dh, dw, ssh, ssw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride/dilation/shortcut_stride must be >= 1 and padding >= 0, got stride={(st_h, st_w)}, "
                         f"padding={(ph, pw)}, dilation={(dh, dw)}, shortcut_stride={(ssh, ssw)}")
    p_out = common.conv_out_size(h_in, kh, st_h, ph, dh)
    q_out = common.conv_out_size(w_in, kw, st_w, pw, dw)
    if p_out < 1 or q_out < 1:
        raise ValueError(f"output size {(p_out, q_out)} is empty: input {(h_in, w_in)} is too small for kernel "
                         f"{(kh, kw)} with padding {(ph, pw)} and dilation {(dh, dw)}")
    return ConvGeometry(n, c_in, h_in, w_in, oc, cg, oc // groups, groups, kh, kw, (st_h, st_w), (ph, pw), (dh, dw),
                        p_out, q_out, (ssh, ssw))


def _shortcut_dims(geo: ConvGeometry, shortcut_x: torch.Tensor | None,
                   shortcut_weight: torch.Tensor | None) -> tuple[int, int, int]:
    if shortcut_x is None and shortcut_weight is not None:
        raise ValueError("shortcut_weight needs shortcut_x")
    if shortcut_x is None:
        return 0, 0, 0
    if shortcut_x.dim() != 4:
        raise ValueError(f"shortcut_x must be 4-D (N, C, H, W), got shape {tuple(shortcut_x.shape)}")
    _, cs, hs, ws = shortcut_x.shape
    oc, (ssh, ssw) = geo.oc, geo.shortcut_stride
    if shortcut_weight is None and cs > oc:  # option A pads shortcut_x's channels with zeros up to oc
        raise ValueError(f"the zero-padding shortcut needs shortcut_x's {cs} channels <= the output's {oc}")
    if shortcut_weight is not None and tuple(shortcut_weight.shape) != (oc, cs, 1, 1):
        raise ValueError(f"shortcut_weight has shape {tuple(shortcut_weight.shape)}, expected ({oc}, {cs}, 1, 1) "
                         f"(a 1x1 conv from shortcut_x's {cs} channels to {oc})")
    s_out = (shortcut_x.shape[0], (hs - 1) // ssh + 1, (ws - 1) // ssw + 1)
    if s_out != (geo.n, geo.p_out, geo.q_out):
        raise ValueError(f"the shortcut conv gives batch and size {s_out}, expected the main conv's "
                         f"{(geo.n, geo.p_out, geo.q_out)}")
    return hs, ws, cs


def check_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, shortcut_x: torch.Tensor | None = None,
               shortcut_weight: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
               groups: int = 1, shortcut_stride=(1, 1), in_scale: torch.Tensor | None = None,
               in_shift: torch.Tensor | None = None, prologue_relu: bool = False,
               out: torch.Tensor | None = None) -> ConvGeometry:
    """Validate the launchers' arguments (see `conv_bias_act`); returns the conv's geometry."""
    _check_tensors(x, weight, {"shortcut_x": shortcut_x, "shortcut_weight": shortcut_weight, "out": out},
                   {"bias": bias, "residual": residual, "in_scale": in_scale, "in_shift": in_shift})
    geo = _main_geometry(x, weight, stride, padding, dilation, groups, shortcut_stride)
    if bias is not None and tuple(bias.shape) != (geo.oc,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({geo.oc},)")
    if residual is not None and tuple(residual.shape) != geo.out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output shape {geo.out_shape}")
    hs, ws, cs = _shortcut_dims(geo, shortcut_x, shortcut_weight)
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if prologue_relu and in_scale is None:
        raise ValueError("prologue_relu needs in_scale and in_shift")
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is not None and tuple(t.shape) != (geo.c_in,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({geo.c_in},), one value per input channel")
    if out is not None:
        common.check_out(out, geo.out_shape)
    return dataclasses.replace(geo, hs=hs, ws=ws, cs=cs)


def _output(geo: ConvGeometry, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None:
        return out
    return common.empty(geo.out_shape, device=x.device, dtype=x.dtype, memory_format=CL)


def _launch(geo: ConvGeometry, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
            stats: tuple[torch.Tensor, ...] | None, wrap_kernel: Callable[[Any], Any] | None, *,
            bias=None, residual=None, shortcut_x=None, shortcut_weight=None, in_scale=None, in_shift=None,
            prologue_relu=False, relu=False) -> None:
    """Run _conv_kernel on validated, non-empty inputs; stats: the (count, m0, dm, m2) partials."""
    x = x.contiguous(memory_format=CL)
    w_k = weight.permute(2, 3, 1, 0).reshape(geo.k_total, geo.oc).contiguous()  # row (kh*KW + kw)*Cg + c
    bias_t = bias.float().contiguous() if bias is not None else x
    res_t = residual.contiguous(memory_format=CL) if residual is not None else x
    sx_t = shortcut_x.contiguous(memory_format=CL) if shortcut_x is not None else x
    sw_t = shortcut_weight.reshape(geo.oc, geo.cs).t().contiguous() if shortcut_weight is not None else x
    scale_t = in_scale.float().contiguous() if in_scale is not None else x
    shift_t = in_shift.float().contiguous() if in_shift is not None else x
    cnt_t, m0_t, dm_t, m2_t = stats if stats is not None else (x,) * 4

    def grid(meta):
        return (triton.cdiv(geo.m, meta["BLOCK_M"]), geo.groups * triton.cdiv(geo.ocg, meta["BLOCK_N"]))

    common.wrapped(_conv_kernel, wrap_kernel)[grid](
        x, w_k, bias_t, res_t, sx_t, sw_t, scale_t, shift_t, out,
        cnt_t, m0_t, dm_t, m2_t, cnt_t.numel() if stats is not None else 0,
        geo.m, geo.h, geo.w, geo.c_in, geo.p_out, geo.q_out, geo.oc, geo.cg, geo.ocg, geo.k_total,
        *geo.stride, *geo.padding, *geo.dilation,
        geo.hs, geo.ws, geo.cs, *geo.shortcut_stride,
        KH=geo.kh, KW=geo.kw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_SHORTCUT=shortcut_x is not None,
        SHORTCUT_PAD=shortcut_x is not None and shortcut_weight is None,
        HAS_PROLOGUE=in_scale is not None, PROLOGUE_RELU=prologue_relu, RELU=relu,
        FLAT_K=geo.cg % 16 != 0, **common.mma_options(x.dtype),
        STATS=stats is not None, STATS_TILE_M=_STATS_TILE_M,
    )


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    shortcut_x: torch.Tensor | None = None,
    shortcut_weight: torch.Tensor | None = None,
    stride: int | tuple[int, int] | list[int] = (1, 1),
    padding: int | tuple[int, int] | list[int] = (0, 0),
    dilation: int | tuple[int, int] | list[int] = (1, 1),
    groups: int = 1,
    shortcut_stride: int | tuple[int, int] | list[int] = (1, 1),
    relu: bool = False,
    *,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    prologue_relu: bool = False,
    out: torch.Tensor | None = None,
    wrap_kernel: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """act(conv2d(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)) in one kernel.

    P(x) = relu?(x * in_scale + in_shift) per input channel when `in_scale`/`in_shift` are
    given (ReLU if `prologue_relu`), else x. x, weight, shortcut_x and shortcut_weight share
    one dtype (float16, bfloat16 or float32); bias, residual, in_scale and in_shift may be
    any floating dtype and are used in fp32 (a float32 residual under autocast is added
    without first rounding it to x's dtype, as the reference does). Returns a new
    channels_last (N, OC, P, Q) tensor in x's dtype, or writes into `out` (channels_last,
    same shape/dtype, aliasing no input: autotuning may run the kernel several times).

    `wrap_kernel` is applied to each (autotuned) kernel before its launch:
    `torch.library.wrap_triton` inside a `torch.library.triton_op`, so that torch.compile
    sees the launch (see `conv_bias_act_op` at the end of this file).
    """
    geo = check_conv(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
                     shortcut_stride, in_scale, in_shift, prologue_relu, out)
    out = _output(geo, x, out)
    if geo.m and geo.oc:
        _launch(geo, x, weight, out, None, wrap_kernel, bias=bias, residual=residual, shortcut_x=shortcut_x,
                shortcut_weight=shortcut_weight, in_scale=in_scale, in_shift=in_shift, prologue_relu=prologue_relu,
                relu=relu)
    return out


def conv_bn_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    prologue_relu: bool = False,
    stride: int | tuple[int, int] | list[int] = (1, 1),
    padding: int | tuple[int, int] | list[int] = (0, 0),
    dilation: int | tuple[int, int] | list[int] = (1, 1),
    groups: int = 1,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    wrap_kernel: Callable[[Any], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv2d(P(x), weight) + residual as `conv_bias_act` computes it (P,
    dtypes, `out` and `wrap_kernel` as there), and its per-channel mean and biased variance
    over (N, P, Q), fp32 of shape (OC,), computed in the conv's epilogue from y as stored
    (rounded to x's dtype), like `fusedres.reference.conv_bn_stats`; NaN for an empty batch.
    """
    geo = check_conv(x, weight, residual=residual, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, in_scale=in_scale, in_shift=in_shift, prologue_relu=prologue_relu, out=out)
    out = _output(geo, x, out)
    mean = common.empty(geo.oc, dtype=torch.float32, device=x.device)
    var = common.empty(geo.oc, dtype=torch.float32, device=x.device)
    if geo.m == 0:
        mean.fill_(float("nan"))  # the mean of nothing, as torch.mean
        var.fill_(float("nan"))
    if geo.m == 0 or geo.oc == 0:
        return out, mean, var
    # Partials: one row per _STATS_TILE_M output pixels (see the module docstring).
    p_rows = triton.cdiv(geo.m, _STATS_TILE_M)
    cnt = common.empty(p_rows, dtype=torch.int32, device=x.device)
    parts = tuple(common.empty((p_rows, geo.oc), dtype=torch.float32, device=x.device) for _ in range(3))
    _launch(geo, x, weight, out, (cnt, *parts), wrap_kernel, residual=residual, in_scale=in_scale,
            in_shift=in_shift, prologue_relu=prologue_relu)
    common.combine_stats(cnt, *parts, mean, var, geo.m, p_rows, _STATS_TILE_M, True, wrap_kernel)
    return out, mean, var


# ---------------------------------------------------------------------------------------
# `fusedres::triton_conv_bias_act`: the op the triton backend runs for fusedres::conv_bias_act.
# A `torch.library.triton_op` whose body launches the kernel through
# `torch.library.wrap_triton`, so that torch.compile and torch.export see the launch (and
# inductor can schedule it) when the op is traced. It has no autograd: the public
# `fusedres::conv_bias_act` op owns that. `@triton.autotune(prune_configs_by=...)` is
# traceable: torch's user-defined-Triton support runs `early_config_prune` at trace time with
# the traced arguments (torch >= 2.6; torch 2.14's `torch/_higher_order_ops/
# triton_kernel_wrap.py`, `do_prune_configs`), and our prune function only reads ints, bools
# and `x_ptr.element_size()`, which fake tensors answer. Fallbacks, an opaque
# `torch.library.custom_op` with the same schema and fake: torch without `triton_op` /
# `wrap_triton`, and the Triton interpreter (interpreted kernels cannot be traced, so the op
# runs eagerly; under torch.compile it is opaque).

NAME = "fusedres::triton_conv_bias_act"
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? shortcut_x, Tensor? shortcut_weight, "
    "int[] stride, int[] padding, int[] dilation, int groups, int[] shortcut_stride, bool relu, "
    "Tensor? in_scale, Tensor? in_shift) -> Tensor"
)
TRACEABLE = (not common.INTERPRET and hasattr(torch.library, "triton_op")
             and hasattr(torch.library, "wrap_triton"))


def _op_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
               residual: Optional[torch.Tensor], shortcut_x: Optional[torch.Tensor],  # noqa: UP045
               shortcut_weight: Optional[torch.Tensor], stride: list[int], padding: list[int],  # noqa: UP045
               dilation: list[int], groups: int, shortcut_stride: list[int], relu: bool,
               in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """act(conv(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)), P(x) =
    relu(x*in_scale + in_shift) when given: a new channels_last tensor in x's dtype (see
    `fusedres.triton.conv.conv_bias_act`)."""
    wrap = torch.library.wrap_triton if TRACEABLE else None
    return conv_bias_act(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                         groups, shortcut_stride, relu, in_scale=in_scale, in_shift=in_shift,
                         prologue_relu=in_scale is not None, wrap_kernel=wrap)


def _op_fake(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation, groups,
             shortcut_stride, relu, in_scale, in_shift):
    n, _, h, w = x.shape
    oc, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = (common.pair(v, name) for v, name in
                                    ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    shape = (n, oc, common.conv_out_size(h, kh, sh, ph, dh), common.conv_out_size(w, kw, sw, pw, dw))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


# The annotations above are the schema where torch.library.triton_op ignores `schema=` and
# infers it (torch 2.11 does).
if TRACEABLE:
    conv_bias_act_op = torch.library.triton_op(NAME, mutates_args=(), schema=SCHEMA)(_op_launch)
else:
    conv_bias_act_op = torch.library.custom_op(NAME, mutates_args=(), schema=SCHEMA)(_op_launch)
# triton_op already traces `_op_launch` as its fake; this one is cheaper and the same for both.
conv_bias_act_op.register_fake(_op_fake)
