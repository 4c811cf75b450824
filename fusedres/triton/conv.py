"""Fused implicit-GEMM convolution on NHWC (channels_last) tensors.

    out = act(conv2d(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight))

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

Batch statistics (`stats=True`, the cuDNN "genstats" scheme; no bias/residual/shortcut/ReLU):
the epilogue rounds its tile to the output dtype and back (the statistics are those of
the stored y, as `reference.conv_bn_stats` computes them) and reduces its valid rows per
channel with the corrected two-pass algorithm `fusedres.triton.bn` uses: m0 = sum(y)/n,
d = y - m0, tile mean = m0 + sum(d)/n kept as the pair (m0, sum(d)/n), M2 = sum(d^2) -
sum(d)^2/n. The launcher cannot know the autotuner's BLOCK_M before the launch, so the
[rows, OC] partial buffers have one row per STATS_TILE_M (the smallest BLOCK_M of any
config) output pixels: the program for M tile i (BLOCK_M = k * STATS_TILE_M) writes row
i*k, and the per-row count buffer holds its number of valid pixels there and 0 in rows
i*k+1 .. i*k+k-1 (written only by the programs of N tile 0). A second kernel merges the
rows with a nonzero count in a fixed order, in fp64 (Chan et al.'s parallel formula in
its two-pass form): mean = sum(n_i*mean_i)/M, var = sum(M2_i + n_i*(mean_i - mean)^2)/M.
No atomics: for one config the result is deterministic.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Hopper-sensible tiles; `_prune_configs` shrinks BLOCK_N/BLOCK_K to the problem.
_GPU_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 3),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 3),
    _config(128, 32, 64, 4, 4),
    _config(64, 16, 64, 4, 3),
]
# The interpreter runs every program in Python: one small config, nothing to tune.
# FUSEDRES_TRITON_AUTOTUNE=0 keeps one GPU config too: correctness runs (the GPU tests)
# then compile each kernel variant once instead of once per config.
if _INTERPRET:
    _CONFIGS = [_config(32, 16, 16, 4, 1)]
elif os.environ.get("FUSEDRES_TRITON_AUTOTUNE", "1") == "0":
    _CONFIGS = [_config(64, 64, 32, 4, 3)]
else:
    _CONFIGS = _GPU_CONFIGS

# Rows of the statistics partial buffers: one per this many output pixels (every config's
# BLOCK_M is a multiple of it; see the module docstring).
_STATS_TILE_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)
_STATS_COMBINE = (16, 16) if _INTERPRET else (64, 64)  # BLOCK_P, BLOCK_C of the combine kernel

# Shared memory per block: the device's opt-in limit and its compute capability (the
# pipeline's depth depends on it), read once per device at autotune time. The ahead-of-time
# check (fusedres.bench.compiled) sets _SMEM_TARGET to its target card's.
_SMEM_TARGET: tuple[int, int] | None = None  # (bytes, capability major)
_SMEM_BUDGET = 232448  # off CUDA (the interpreter has no limit): H100's 227 KiB


@functools.cache
def _device_smem(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:  # older torch: ask Triton's driver
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit), props.major


def _smem_target(t: torch.Tensor) -> tuple[int, int]:
    """(bytes of shared memory one program may use, compute capability major) on t's device."""
    if _SMEM_TARGET is not None:
        return _SMEM_TARGET
    if t.device.type != "cuda":
        return _SMEM_BUDGET, 9
    return _device_smem(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _smem_estimate(bm: int, bn: int, bk: int, stages: int, elem: int, major: int, transform: bool = False) -> int:
    """An upper bound of a config's shared memory, checked against every compiled variant by
    fusedres.bench.compiled: the pipelined A/B tiles (num_stages copies with Hopper's wgmma,
    one fewer with mma.sync), plus, when A is transformed in registers (the BN prologue) or the
    epilogue reduces (statistics), the A tile's staging/layout-conversion scratch (at most one
    fp32 A tile) and the reductions' scratch. The epilogue may convert the fp32 accumulator's
    layout through shared memory once the pipeline is drained (seen in the stem's wgrad: 32 KiB
    for a 64x128 tile over 24 KiB of pipeline), so never less than one fp32 [bm, bn] tile."""
    buffers = stages if major >= 9 else stages - 1
    est = buffers * (bm * bk + bk * bn) * elem
    if transform:
        est += bm * bk * 4 + 2048
    return max(est, bm * bn * 4)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _empty(*args, **kwargs) -> torch.Tensor:
    """The statistics buffers the launcher allocates (tests poison them with NaN)."""
    return torch.empty(*args, **kwargs)


def _prune_configs(configs, named_args, **kwargs):
    """Shrink BLOCK_N / BLOCK_K to the problem (tiny groups, stem) and drop duplicates, configs
    whose estimated shared memory exceeds the device's and configs that spill registers
    (measured by fusedres.bench.compiled: 255 registers and spills beyond these per-thread sizes)."""
    args = {**named_args, **kwargs}
    ocg, cg, k_total, flat_k = args["OCg"], args["Cg"], args["K_TOTAL"], args["FLAT_K"]
    elem = args["x_ptr"].element_size()
    limit, major = _smem_target(args["x_ptr"])
    prologue, stats = bool(args.get("HAS_PROLOGUE")), bool(args.get("STATS"))
    fp32_tiles = bool(args.get("HAS_RES")) or stats  # the epilogue holds a second fp32 tile
    bn_cap = max(16, _pow2_at_least(ocg))
    bk_cap = max(16, _pow2_at_least(k_total if flat_k else cg))
    out, seen = [], set()
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], min(cfg.kwargs["BLOCK_N"], bn_cap), min(cfg.kwargs["BLOCK_K"], bk_cap)
        threads = 32 * cfg.num_warps
        while not flat_k and bk > 16 and cg % bk:  # tap mode: chunks should tile Cg exactly
            bk //= 2
        while flat_k and bk > 16 and bm * bk > 16 * threads:  # flat mode's per-element addresses: <= 16 a thread
            bk //= 2
        acc = bm * bn // threads  # fp32 accumulators a thread holds
        if (fp32_tiles and acc > 64) or (prologue and acc + bm * bk // threads > 96):
            continue
        if _smem_estimate(bm, bn, bk, cfg.num_stages, elem, major, prologue or stats) > limit:
            continue
        key = (bm, bn, bk, cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_config(*key))
    return out or [_config(64, 16, 16, 4, 2)]


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's dot mishandles bfloat16
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


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
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
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
        acc = _mma(a, b, acc, UPCAST, INPUT_PRECISION)

    if HAS_SHORTCUT:
        # 1x1 projection shortcut, groups=1: a second K loop over shortcut_x's channels.
        s_row = ((n_img * Hs + p * sstride_h) * Ws + q * sstride_w) * Cs
        for c0 in range(0, Cs, BLOCK_K):
            c = c0 + offs_k
            mask_k = c < Cs
            a = tl.load(sx_ptr + s_row[:, None] + c[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(sw_ptr + c[:, None] * OC + offs_oc[None, :], mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            acc = _mma(a, b, acc, UPCAST, INPUT_PRECISION)

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


@triton.jit
def _stats_combine_kernel(cnt_ptr, m0_ptr, dm_ptr, m2_ptr, mean_ptr, var_ptr, M, C, P,
                          TILE_M: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Per-channel mean and biased variance from the [P, C] tile partials (rows with a zero
    count are unused and never read), in fp64, rows merged in a fixed order. Row counts come
    from `cnt_ptr` (HAS_COUNT: this file's stats epilogue) or are TILE_M rows per partial,
    the last one shorter (fusedres.triton.bn.bn_stats)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64) + M
    # Pass 1: the mean, sum(n_i * mean_i) / M.
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        if HAS_COUNT:
            n = tl.load(cnt_ptr + ps, mask=ps < P, other=0).to(tl.float64)
        else:
            n = tl.where(ps < P, tl.minimum(M - ps * TILE_M, TILE_M), 0).to(tl.float64)
        mask = (n > 0)[:, None] & mask_c[None, :]
        offs = ps[:, None] * C + cols[None, :]
        mean_i = (tl.load(m0_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                  + tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float64))
        acc += tl.sum(tl.where(mask, n[:, None] * mean_i, 0.0), axis=0)
    mean = acc / total
    # Pass 2: M2 = sum(M2_i + n_i * (mean_i - mean)^2).
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        if HAS_COUNT:
            n = tl.load(cnt_ptr + ps, mask=ps < P, other=0).to(tl.float64)
        else:
            n = tl.where(ps < P, tl.minimum(M - ps * TILE_M, TILE_M), 0).to(tl.float64)
        mask = (n > 0)[:, None] & mask_c[None, :]
        offs = ps[:, None] * C + cols[None, :]
        mean_i = (tl.load(m0_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                  + tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float64))
        dev = mean_i - mean[None, :]
        m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(tl.where(mask, m2 + n[:, None] * dev * dev, 0.0), axis=0)
    var = acc / total
    var = tl.where(var < 0, 0.0, var)  # rounding can leave -tiny for a constant channel; keeps NaN
    tl.store(mean_ptr + cols, mean.to(tl.float32), mask=mask_c)
    tl.store(var_ptr + cols, var.to(tl.float32), mask=mask_c)


def _pair(v: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected the same device as x ({device})")


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
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    prologue_relu: bool = False,
    out: torch.Tensor | None = None,
    wrap_kernel: Callable[[Any], Any] | None = None,
    stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(conv2d(P(x), weight) + bias + residual + conv1x1(shortcut_x, shortcut_weight)) in one kernel.

    P(x) = relu?(x * in_scale + in_shift) per input channel when `in_scale`/`in_shift` are
    given (ReLU if `prologue_relu`), else x. x, weight, shortcut_x and shortcut_weight share
    one dtype (float16, bfloat16 or float32); bias, residual, in_scale and in_shift may be
    any floating dtype and are used in fp32 (a float32 residual under autocast is added
    without first rounding it to x's dtype, as the reference does). Returns a new
    channels_last (N, OC, P, Q) tensor in x's dtype, or writes into `out` (channels_last,
    same shape/dtype, aliasing no input: autotuning may run the kernel several times).

    With `stats=True` (no bias, residual, shortcut or relu allowed) returns `(out, mean, var)`:
    y = conv2d(P(x), weight) and its per-channel mean and biased variance over (N, P, Q),
    fp32 of shape (OC,), computed in the conv's epilogue from y as stored (rounded to x's
    dtype), like `fusedres.reference.conv_bn_stats`; NaN for an empty batch.

    `wrap_kernel` is applied to each (autotuned) kernel before its launch:
    `torch.library.wrap_triton` inside a `torch.library.triton_op`, so that torch.compile
    sees the launch (see `fusedres.triton.ops`).
    """
    if stats:
        given = [name for name, t in (("bias", bias), ("residual", residual), ("shortcut_x", shortcut_x),
                                      ("shortcut_weight", shortcut_weight)) if t is not None]
        if relu:
            given.append("relu")
        if given:
            raise ValueError(f"stats=True computes the statistics of the plain conv output: {', '.join(given)} "
                             f"cannot be fused with it")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv_bias_act expects a 4-D x (N, C, H, W) and a 4-D weight (OC, C/groups, KH, KW), "
                         f"got x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the Triton conv_bias_act kernel supports float16, bfloat16 and float32, got {x.dtype}")
    for name, t in (("weight", weight), ("shortcut_x", shortcut_x), ("shortcut_weight", shortcut_weight),
                    ("out", out)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    for name, t in (("bias", bias), ("residual", residual), ("in_scale", in_scale), ("in_shift", in_shift)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_device(x.device, weight=weight, bias=bias, residual=residual, shortcut_x=shortcut_x,
                  shortcut_weight=shortcut_weight, in_scale=in_scale, in_shift=in_shift, out=out)
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton conv_bias_act kernel needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got x on {x.device}")

    n, c_in, h_in, w_in = x.shape
    oc, cg, kh, kw = weight.shape
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if cg * groups != c_in:
        raise ValueError(f"x has {c_in} channels, expected weight.shape[1] * groups = {cg} * {groups} = {cg * groups}")
    if oc % groups:
        raise ValueError(f"weight has {oc} output channels, expected a multiple of groups={groups}")
    st_h, st_w = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    ssh, ssw = _pair(shortcut_stride, "shortcut_stride")
    if min(st_h, st_w, dh, dw, ssh, ssw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride/dilation/shortcut_stride must be >= 1 and padding >= 0, got stride={(st_h, st_w)}, "
                         f"padding={(ph, pw)}, dilation={(dh, dw)}, shortcut_stride={(ssh, ssw)}")
    p_out, q_out = _conv_out_size(h_in, kh, st_h, ph, dh), _conv_out_size(w_in, kw, st_w, pw, dw)
    if p_out < 1 or q_out < 1:
        raise ValueError(f"output size {(p_out, q_out)} is empty: input {(h_in, w_in)} is too small for kernel "
                         f"{(kh, kw)} with padding {(ph, pw)} and dilation {(dh, dw)}")
    out_shape = (n, oc, p_out, q_out)

    if bias is not None and tuple(bias.shape) != (oc,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({oc},)")
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output shape {out_shape}")
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("shortcut_x and shortcut_weight must be given together")
    hs = ws = cs = 0
    if shortcut_x is not None:
        if shortcut_x.dim() != 4:
            raise ValueError(f"shortcut_x must be 4-D (N, C, H, W), got shape {tuple(shortcut_x.shape)}")
        _, cs, hs, ws = shortcut_x.shape
        if tuple(shortcut_weight.shape) != (oc, cs, 1, 1):
            raise ValueError(f"shortcut_weight has shape {tuple(shortcut_weight.shape)}, expected ({oc}, {cs}, 1, 1) "
                             f"(a 1x1 conv from shortcut_x's {cs} channels to {oc})")
        s_out = (shortcut_x.shape[0], (hs - 1) // ssh + 1, (ws - 1) // ssw + 1)
        if s_out != (n, p_out, q_out):
            raise ValueError(f"the shortcut conv gives batch and size {s_out}, expected the main conv's "
                             f"{(n, p_out, q_out)}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if prologue_relu and in_scale is None:
        raise ValueError("prologue_relu needs in_scale and in_shift")
    for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
        if t is not None and tuple(t.shape) != (c_in,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({c_in},), one value per input channel")
    if out is None:
        out = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    elif tuple(out.shape) != out_shape or not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"out must be a channels_last-contiguous tensor of shape {out_shape}, "
                         f"got shape {tuple(out.shape)} and strides {out.stride()}")

    m = n * p_out * q_out
    if stats:
        mean = _empty(oc, dtype=torch.float32, device=x.device)
        var = _empty(oc, dtype=torch.float32, device=x.device)
        if m == 0:
            mean.fill_(float("nan"))  # the mean of nothing, as torch.mean
            var.fill_(float("nan"))
    if m == 0 or oc == 0:
        return (out, mean, var) if stats else out

    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    # K-major weight: row (kh*KW + kw)*Cg + c, column oc.
    w_k = weight.permute(2, 3, 1, 0).reshape(kh * kw * cg, oc).contiguous()
    bias_t = bias.float().contiguous() if bias is not None else x
    res_t = residual.contiguous(memory_format=cl) if residual is not None else x
    if shortcut_x is not None:
        sx_t = shortcut_x.contiguous(memory_format=cl)
        sw_t = shortcut_weight.reshape(oc, cs).t().contiguous()
    else:
        sx_t = sw_t = x
    scale_t = in_scale.float().contiguous() if in_scale is not None else x
    shift_t = in_shift.float().contiguous() if in_shift is not None else x

    ocg = oc // groups
    if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _INTERPRET:
        precision = "tf32"
    else:
        precision = "ieee"

    # Statistics partials: one row per _STATS_TILE_M output pixels (see the module docstring).
    p_rows = triton.cdiv(m, _STATS_TILE_M) if stats else 0
    if stats:
        cnt_t = _empty(p_rows, dtype=torch.int32, device=x.device)
        m0_t, dm_t, m2_t = (_empty((p_rows, oc), dtype=torch.float32, device=x.device) for _ in range(3))
    else:
        cnt_t = m0_t = dm_t = m2_t = x

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), groups * triton.cdiv(ocg, meta["BLOCK_N"]))

    kernel = _conv_kernel if wrap_kernel is None else wrap_kernel(_conv_kernel)
    kernel[grid](
        x, w_k, bias_t, res_t, sx_t, sw_t, scale_t, shift_t, out,
        cnt_t, m0_t, dm_t, m2_t, p_rows,
        m, h_in, w_in, c_in, p_out, q_out, oc, cg, ocg, kh * kw * cg,
        st_h, st_w, ph, pw, dh, dw,
        hs, ws, cs, ssh, ssw,
        KH=kh, KW=kw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_SHORTCUT=shortcut_x is not None,
        HAS_PROLOGUE=in_scale is not None, PROLOGUE_RELU=prologue_relu, RELU=relu,
        FLAT_K=cg % 16 != 0, UPCAST=_INTERPRET and x.dtype == torch.bfloat16, INPUT_PRECISION=precision,
        STATS=stats, STATS_TILE_M=_STATS_TILE_M,
    )
    if not stats:
        return out
    block_p, block_c = _STATS_COMBINE
    block_c = min(block_c, _pow2_at_least(oc))
    combine = _stats_combine_kernel if wrap_kernel is None else wrap_kernel(_stats_combine_kernel)
    combine[(triton.cdiv(oc, block_c),)](cnt_t, m0_t, dm_t, m2_t, mean, var, m, oc, p_rows,
                                         TILE_M=_STATS_TILE_M, HAS_COUNT=True, BLOCK_P=block_p, BLOCK_C=block_c)
    return out, mean, var
