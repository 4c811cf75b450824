"""Scaffolding shared by the Triton kernels of fusedres (conv.py, conv_backward.py, bn.py,
prologue.py): the interpreter flag, dtypes, autotuning configs and their pruning against
the device's shared memory, conv geometry helpers, the one allocation hook, the MMA and
tile helpers the kernels call, and the two per-channel reductions of tile partials (the
statistics combine and the column sums), each reducing rows in a fixed order in fp64.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from fusedres import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FUSEDRES_TRITON_AUTOTUNE=0 keeps one GPU config per kernel: correctness runs (the GPU
# tests) then compile each kernel variant once instead of once per config.
AUTOTUNE = os.environ.get("FUSEDRES_TRITON_AUTOTUNE", "1") != "0"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CL = torch.channels_last

# Tile sizes of the memory-bound [M, C] passes (constexpr). The interpreter runs every program
# in Python: small tiles, so that the CPU tests cover several row and channel tiles and their
# masked tails. On a GPU ~4096 elements per program, 16-byte vector loads along C.
ELEMENTWISE_ELEMS, ELEMENTWISE_MAX_C = (256, 16) if INTERPRET else (4096, 128)
COMBINE_BLOCKS = (16, 16) if INTERPRET else (64, 64)  # BLOCK_P, BLOCK_C of the two reductions


def empty(*args, **kwargs) -> torch.Tensor:
    """Every buffer the launchers allocate. Launchers call it as `common.empty` so that one
    monkeypatch (tests poison the buffers with NaN to catch unwritten elements) reaches all."""
    return torch.empty(*args, **kwargs)


def like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh channels_last tensor of t's shape (and dtype unless given)."""
    return empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=CL)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------
# Autotuning configs and their pruning


def config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def configs(*specs: tuple[int, int, int, int, int]) -> list[triton.Config]:
    """configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples."""
    return [config(*spec) for spec in specs]


def select_configs(gpu: list[triton.Config], interpreted: triton.Config, fixed: triton.Config) -> list[triton.Config]:
    """The configs a kernel autotunes over: the interpreter runs every program in Python (one
    small config, nothing to tune), FUSEDRES_TRITON_AUTOTUNE=0 keeps one GPU config."""
    if INTERPRET:
        return [interpreted]
    return gpu if AUTOTUNE else [fixed]


# Shared memory per block: the device's opt-in limit and its compute capability (the
# pipeline's depth depends on it), read once per device at autotune time. The ahead-of-time
# check (fusedres.bench.compiled) sets SMEM_TARGET to its target card's.
SMEM_TARGET: tuple[int, int] | None = None  # (bytes, capability major)
SMEM_BUDGET = 232448  # off CUDA (the interpreter has no limit): H100's 227 KiB


@functools.cache
def device_smem(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:  # older torch: ask Triton's driver
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit), props.major


def smem_target(t: torch.Tensor) -> tuple[int, int]:
    """(bytes of shared memory one program may use, compute capability major) on t's device."""
    if SMEM_TARGET is not None:
        return SMEM_TARGET
    if t.device.type != "cuda":
        return SMEM_BUDGET, 9
    return device_smem(t.device.index if t.device.index is not None else torch.cuda.current_device())


def smem_estimate(bm: int, bn: int, bk: int, stages: int, elem: int, major: int, transform: bool = False) -> int:
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


def prune_configs(configs, caps: tuple[int | None, int, int], divs: tuple[int, int], elem: int,
                  target: tuple[int, int], gather: str = "", transform: bool = False,
                  spills: Callable[[int, int, int, int], bool] | None = None) -> list[triton.Config]:
    """Shrink each config to the problem and drop duplicates and configs that do not fit.

    caps (m, n, k): BLOCK_M/N/K become at most max(16, pow2 >= cap) (m None: BLOCK_M kept);
    divs (n, k): BLOCK_N / BLOCK_K halve down to a divisor (tap mode: chunks should tile a
    tap's channels; 0 = no constraint); gather ("A": [BLOCK_M, BLOCK_K], "B": [BLOCK_K,
    BLOCK_N], flat mode): BLOCK_K halves until that tile, gathered per element, is at most 16
    elements a thread (more spills registers, measured by fusedres.bench.compiled). Dropped:
    configs `spills(bm, bn, bk, threads)` rejects and those whose `smem_estimate` (with
    `transform`) exceeds target = (the device's limit, its compute capability major)."""
    m_cap, n_cap, k_cap = caps
    n_div, k_div = divs
    out, seen = [], set()
    for cfg in configs:
        bm = cfg.kwargs["BLOCK_M"] if m_cap is None else min(cfg.kwargs["BLOCK_M"], max(16, pow2_at_least(m_cap)))
        bn = min(cfg.kwargs["BLOCK_N"], max(16, pow2_at_least(n_cap)))
        bk = min(cfg.kwargs["BLOCK_K"], max(16, pow2_at_least(k_cap)))
        threads = 32 * cfg.num_warps
        while n_div and bn > 16 and n_div % bn:
            bn //= 2
        while k_div and bk > 16 and k_div % bk:
            bk //= 2
        while gather and bk > 16 and bk * (bm if gather == "A" else bn) > 16 * threads:
            bk //= 2
        if spills is not None and spills(bm, bn, bk, threads):
            continue
        if smem_estimate(bm, bn, bk, cfg.num_stages, elem, target[1], transform) > target[0]:
            continue
        key = (bm, bn, bk, cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(config(*key))
    return out or [config(64, 16, 16, 4, 2)]


# ---------------------------------------------------------------------------------------
# Conv geometry and launch options


IntPair = int | tuple[int, int] | list[int]  # stride, padding, dilation: an int or a pair


def pair(v: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


conv_out_size = reference.conv_output_size  # one formula for the fakes, the checks and the launchers


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The validated shapes of one conv: x (n, c_in, h, w), weight (oc, cg, kh, kw) with
    cg = c_in/groups and ocg = oc/groups, output (n, oc, p_out, q_out); the forward's 1x1
    shortcut input (hs, ws, cs) is (0, 0, 0) without one."""

    n: int
    c_in: int
    h: int
    w: int
    oc: int
    cg: int
    ocg: int
    groups: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    p_out: int
    q_out: int
    shortcut_stride: tuple[int, int] = (1, 1)
    hs: int = 0
    ws: int = 0
    cs: int = 0

    @property
    def m(self) -> int:  # output pixels
        return self.n * self.p_out * self.q_out

    @property
    def k_total(self) -> int:  # the forward GEMM's K
        return self.kh * self.kw * self.cg

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.oc, self.p_out, self.q_out)


def check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected the same device as x ({device})")


def check_out(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(out.shape) != shape or not out.is_contiguous(memory_format=CL):
        raise ValueError(f"out must be a channels_last-contiguous tensor of shape {shape}, "
                         f"got shape {tuple(out.shape)} and strides {out.stride()}")


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for float32 only when cuDNN would use it."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def mma_options(dtype: torch.dtype) -> dict[str, Any]:
    """The UPCAST / INPUT_PRECISION constexprs of a kernel calling `mma` on `dtype` tiles."""
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16, "INPUT_PRECISION": precision(dtype)}


def wrapped(kernel: Any, wrap_kernel: Callable[[Any], Any] | None) -> Any:
    return kernel if wrap_kernel is None else wrap_kernel(kernel)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's dot mishandles bfloat16
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


# ---------------------------------------------------------------------------------------
# [M, C] activations (bn.py, prologue.py): every NHWC activation is the row-major
# [N*H*W, C] matrix of its channels_last form.


def check_activation(name: str, t: torch.Tensor, shape: torch.Size | None = None) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton BatchNorm kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {name} on {t.device}")


def channels(name: str, t: torch.Tensor, c: int, device: torch.device) -> torch.Tensor:
    """A per-channel vector as contiguous fp32 (the reference casts it to fp32 too)."""
    if t.numel() != c:
        raise ValueError(f"{name} has {t.numel()} elements, expected one per channel ({c})")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t.reshape(c).to(torch.float32).contiguous()


def rows(t: torch.Tensor) -> torch.Tensor:
    """t as channels_last, whose memory is the row-major [N*H*W, C] matrix the kernels read."""
    return t.contiguous(memory_format=CL)


def elementwise_launch(m: int, c: int) -> tuple[tuple[int, int], dict[str, int]]:
    """(grid, BLOCK_M / BLOCK_C / num_warps) of an elementwise pass over an [m, c] matrix."""
    block_c = min(ELEMENTWISE_MAX_C, pow2_at_least(c))
    block_m = max(1, ELEMENTWISE_ELEMS // block_c)
    return (triton.cdiv(m, block_m), triton.cdiv(c, block_c)), {"BLOCK_M": block_m, "BLOCK_C": block_c,
                                                                 "num_warps": 4}


@triton.jit
def tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_C] tile of a row-major [M, C] matrix (grid: row tiles,
    column tiles): (row tile index, columns, column mask, tile mask, int64 element offsets)."""
    pid_m = tl.program_id(0).to(tl.int64)
    rws = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rws < M)[:, None] & mask_c[None, :]
    return pid_m, cols, mask_c, mask, rws[:, None] * C + cols[None, :]


# ---------------------------------------------------------------------------------------
# Per-channel reductions of per-tile partials (no atomics: deterministic)


@triton.jit
def _partial_row(cnt_ptr, m0_ptr, dm_ptr, ps, cols, mask_c, M, C, P, TILE_M: tl.constexpr, HAS_COUNT: tl.constexpr):
    """Rows ps of the statistics partials: (count, valid mask, offsets, tile mean), fp64."""
    if HAS_COUNT:
        n = tl.load(cnt_ptr + ps, mask=ps < P, other=0).to(tl.float64)
    else:
        n = tl.where(ps < P, tl.minimum(M - ps * TILE_M, TILE_M), 0).to(tl.float64)
    mask = (n > 0)[:, None] & mask_c[None, :]
    offs = ps[:, None] * C + cols[None, :]
    mean_i = (tl.load(m0_ptr + offs, mask=mask, other=0.0).to(tl.float64)
              + tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float64))
    return n, mask, offs, mean_i


@triton.jit
def _stats_combine_kernel(cnt_ptr, m0_ptr, dm_ptr, m2_ptr, mean_ptr, var_ptr, M, C, P,
                          TILE_M: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """Per-channel mean and biased variance from the [P, C] tile partials (rows with a zero
    count are unused and never read), in fp64, rows merged in a fixed order. Row counts come
    from `cnt_ptr` (HAS_COUNT: the conv kernel's stats epilogue) or are TILE_M rows per
    partial, the last one shorter (fusedres.triton.bn.bn_stats)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64) + M
    # Pass 1: the mean, sum(n_i * mean_i) / M.
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        n, mask, offs, mean_i = _partial_row(cnt_ptr, m0_ptr, dm_ptr, ps, cols, mask_c, M, C, P, TILE_M, HAS_COUNT)
        acc += tl.sum(tl.where(mask, n[:, None] * mean_i, 0.0), axis=0)
    mean = acc / total
    # Pass 2: M2 = sum(M2_i + n_i * (mean_i - mean)^2).
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        n, mask, offs, mean_i = _partial_row(cnt_ptr, m0_ptr, dm_ptr, ps, cols, mask_c, M, C, P, TILE_M, HAS_COUNT)
        dev = mean_i - mean[None, :]
        m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(tl.where(mask, m2 + n[:, None] * dev * dev, 0.0), axis=0)
    var = acc / total
    var = tl.where(var < 0, 0.0, var)  # rounding can leave -tiny for a constant channel; keeps NaN
    tl.store(mean_ptr + cols, mean.to(tl.float32), mask=mask_c)
    tl.store(var_ptr + cols, var.to(tl.float32), mask=mask_c)


def combine_stats(cnt: torch.Tensor, m0: torch.Tensor, dm: torch.Tensor, m2: torch.Tensor, mean: torch.Tensor,
                  var: torch.Tensor, m: int, p: int, tile_m: int, has_count: bool,
                  wrap_kernel: Callable[[Any], Any] | None = None) -> None:
    """Write mean and var (C,) from the [p, C] statistics partials (m0, dm, m2) of m pixels:
    row counts from `cnt` when has_count, else tile_m pixels a row (the last one fewer)."""
    c = mean.numel()
    block_p, block_c = COMBINE_BLOCKS
    block_c = min(block_c, pow2_at_least(c))
    wrapped(_stats_combine_kernel, wrap_kernel)[(triton.cdiv(c, block_c),)](
        cnt, m0, dm, m2, mean, var, m, c, p, TILE_M=tile_m, HAS_COUNT=has_count, BLOCK_P=block_p, BLOCK_C=block_c)


@triton.jit
def _partial_sums_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, P, C, NR: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_s[c] = sum_p part[p, s, c] of a [P, NR, C] fp32 partial buffer, in fp64, stored as
    fp32; program (i, s) sums channels [i*BLOCK_C, (i+1)*BLOCK_C) of slot s."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = tl.program_id(1)
    mask_c = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (ps < P)[:, None] & mask_c[None, :]
        offs = ps[:, None] * (NR * C) + slot * C + cols[None, :]
        acc += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0).to(tl.float64), axis=0)
    total = acc.to(tl.float32)
    if slot == 0:
        tl.store(out0_ptr + cols, total, mask=mask_c)
    if slot == 1:
        tl.store(out1_ptr + cols, total, mask=mask_c)
    if slot == 2:
        tl.store(out2_ptr + cols, total, mask=mask_c)


class ChannelSums:
    """Up to three per-channel fp32 sums one elementwise pass computes over an [M, C] matrix.

    `wanted` names the sums in slot order, each with whether it is needed; only the needed
    ones get a slot. The pass's kernel takes `slot(name)` (-1: not computed) and `nr` as
    constexprs and writes row pid_m of the `partials` buffer [P, nr, C]; `reduce` adds the
    rows up in a fixed order, in fp64 (`zero` instead for an empty batch)."""

    def __init__(self, wanted: Sequence[tuple[str, bool]], c: int, device: torch.device) -> None:
        self.slots = {name: i for i, name in enumerate(name for name, need in wanted if need)}
        self.nr, self.c, self.device = len(self.slots), c, device
        self.sums = [empty(c, dtype=torch.float32, device=device) for _ in self.slots]

    def slot(self, name: str) -> int:
        return self.slots.get(name, -1)

    def get(self, name: str) -> torch.Tensor | None:
        return self.sums[self.slots[name]] if name in self.slots else None

    def partials(self, p: int, placeholder: torch.Tensor) -> torch.Tensor:
        """The partial buffer for p row tiles (placeholder, never written, when no sum is needed)."""
        return empty((p, self.nr, self.c), dtype=torch.float32, device=self.device) if self.nr else placeholder

    def reduce(self, part: torch.Tensor) -> None:
        if not self.nr:
            return
        block_p, block_c = COMBINE_BLOCKS
        block_c = min(block_c, pow2_at_least(self.c))
        outs = (*self.sums, *[self.sums[0]] * (3 - self.nr))
        _partial_sums_kernel[(triton.cdiv(self.c, block_c), self.nr)](
            part, *outs, part.shape[0], self.c, NR=self.nr, BLOCK_P=block_p, BLOCK_C=block_c)

    def zero(self) -> None:
        for s in self.sums:
            s.zero_()  # sums over an empty batch
