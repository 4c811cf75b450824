"""Per-block CPU inference timings: eager vs fusedres on every distinct block of a model.

    python -m fusedres.bench.cpu_blocks                       # resnet50, fp32+bf16, NCHW+CL, batch 1+8
    python -m fusedres.bench.cpu_blocks --model resnet18 --batch 2 --image-size 64

For each block shape, dtype, layout and batch it times, interleaved, medians of --rounds:
eager (torchvision's block), fusedres (the default backend), and fusedres with
FUSEDRES_CHECK_FINITE=0, whose difference is what the NaN/Inf guard costs (one reading pass
of the block's input under inference_mode). "fixed us" is the fused block's time minus the
time of its oneDNN calls made directly: the per-call Python and dispatch cost.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch

import fusedres
from fusedres import finite_guard
from fusedres.bench.blocks import distinct_blocks, get_block

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_s(fn: Callable[[], object], rounds: int, min_s: float = 0.02) -> Callable[[], float]:
    """A timer for `fn`: each call times enough repeats to last min_s and returns seconds per call."""
    fn()
    start = time.perf_counter()
    fn()
    repeats = max(1, int(min_s / max(time.perf_counter() - start, 1e-6)))

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    return timed


def _direct_calls(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The fused block's oneDNN calls, made directly (no guard, no checks, no dispatch)."""
    plan = block._fold_cache.plan

    def run() -> object:
        out = x
        for conv in plan.convs[:-1]:
            out = conv(out, relu=True)
        residual = x if plan.shortcut.conv is None else plan.shortcut.conv(x, relu=False)
        return plan.convs[-1](out, relu=True, other=residual)
    return run


def time_block(block32: torch.nn.Module, in_shape: tuple[int, ...], batch: int, dtype: torch.dtype,
               channels_last: bool, rounds: int) -> dict[str, float]:
    """Median ms of eager, fused and fused without the guard, and the fixed cost in us."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    eager = copy.deepcopy(block32).eval().to(dtype, memory_format=memory_format)
    fused = fusedres.convert(eager)
    x = torch.randn(batch, *in_shape).to(dtype).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        fused(x)
        if fused._fold_cache.plan is None:
            raise RuntimeError(f"{fused.describe()} did not take the CPU plan")

        def unguarded() -> object:
            os.environ[finite_guard.CHECK_ENV] = "0"
            try:
                return fused(x)
            finally:
                os.environ.pop(finite_guard.CHECK_ENV)
        xc = x.contiguous(memory_format=torch.channels_last)
        timers = {"eager": _median_s(lambda: eager(x), rounds), "fused": _median_s(lambda: fused(x), rounds),
                  "unguarded": _median_s(unguarded, rounds)}
        if channels_last:
            timers["direct"] = _median_s(_direct_calls(fused, xc), rounds)
        samples: dict[str, list[float]] = {k: [] for k in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                samples[name].append(timer())
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"eager_ms": med["eager"] * 1e3, "fused_ms": med["fused"] * 1e3,
              "unguarded_ms": med["unguarded"] * 1e3, "speedup": med["eager"] / med["fused"],
              "guard_pct": 100 * (med["fused"] - med["unguarded"]) / med["fused"]}
    if "direct" in med:
        result["fixed_us"] = (med["unguarded"] - med["direct"]) * 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.cpu_blocks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(_DTYPES))
    p.add_argument("--layout", nargs="+", default=["nchw", "cl"], choices=("nchw", "cl"))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    print(f"{'block':34} {'dtype':5} {'layout':6} {'batch':>5} {'eager ms':>9} {'fused ms':>9} {'speedup':>8} "
          f"{'guard %':>8} {'fixed us':>9}")
    slowest = None
    for shape in distinct_blocks(args.model, args.image_size):
        block32 = get_block(shape)
        for dtype_name in args.dtype:
            for layout in args.layout:
                for batch in args.batch:
                    r = time_block(block32, shape.in_shape, batch, _DTYPES[dtype_name], layout == "cl", args.rounds)
                    fixed = f"{r['fixed_us']:9.0f}" if "fixed_us" in r else f"{'-':>9}"
                    print(f"{shape.id:34} {dtype_name:5} {layout:6} {batch:5d} {r['eager_ms']:9.3f} "
                          f"{r['fused_ms']:9.3f} {r['speedup']:7.2f}x {r['guard_pct']:7.1f}% {fixed}", flush=True)
                    if slowest is None or r["speedup"] < slowest[0]:
                        slowest = (r["speedup"], shape.id, dtype_name, layout, batch)
    if slowest is not None:
        print(f"slowest fused/eager: {slowest[0]:.2f}x ({', '.join(map(str, slowest[1:]))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
