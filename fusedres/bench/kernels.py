"""Kernel benchmark of the fusedres._C extension: each op against the PyTorch op sequence
that computes the same thing, on ResNet-50 layer shapes, interleaved, in one process.

    python -m fusedres.bench.kernels [--device cpu|cuda] [--batch N] [--dtype fp32|bf16|fp16]
                                     [--layout cl|nchw] [--repeats 7] [--out results.json]

Per op and shape: median ms of the extension kernel and of the PyTorch sequence (the
`torch` backend's formulas; for the statistics also torch.var_mean), the speedup, and on a
GPU the achieved bandwidth (bytes read plus written over time) as a fraction of the
measured device-to-device copy bandwidth. Results are checked against each other before
timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fusedres import ext, reference
from fusedres.bench import report, roofline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (C, H, W) of ResNet-50 conv outputs at 224x224: the bottleneck's reduce/3x3 width and its
# expanded output, per stage.
SHAPES = [(64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28), (256, 14, 14), (1024, 14, 14),
          (512, 7, 7), (2048, 7, 7)]


def _cases(y: torch.Tensor) -> list[tuple[str, int, Callable, Callable]]:
    """(name, bytes moved, extension call, PyTorch call) for one activation shape."""
    E = torch.ops.fusedres
    c, n, es = y.shape[1], y.numel(), y.element_size()
    acc = reference.accumulation_dtype(y.dtype)
    r, g = torch.randn_like(y), torch.randn_like(y)
    s, b = torch.rand(c, device=y.device, dtype=acc) + 0.5, torch.randn(c, device=y.device, dtype=acc)
    out, mask = E.ext_scale_bias_act(y, s, b, r, None, None, True)
    mean = y.to(acc).mean(dim=(0, 2, 3))
    needs = (True, True, True, True, False, False)
    return [
        ("bn_stats", n * es, lambda: E.ext_bn_stats(y), lambda: reference.bn_stats(y)),
        ("bn_stats (vs torch.var_mean)", n * es, lambda: E.ext_bn_stats(y),
         lambda: torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)[::-1]),
        ("tail relu(y*s+b+r) + mask", 3 * n * es + n // 8, lambda: E.ext_scale_bias_act(y, s, b, r, None, None, True),
         lambda: reference.scale_bias_act(y, s, b, r, None, None, True)),
        ("tail backward", 4 * n * es + n // 8,
         lambda: E.ext_scale_bias_act_backward(g, mask, y, s, r, None, True, True),
         lambda: reference.scale_bias_act_backward(g, out, y, s, r, None, needs)),
        ("prologue relu(x*s+b)", 2 * n * es, lambda: E.ext_prologue(y, s, b, True),
         lambda: reference.prologue(y, s, b, True)),
        ("prologue backward", 3 * n * es, lambda: E.ext_prologue_backward(g, y, s, b, True, True),
         lambda: reference.prologue_backward(g, y, s, b, True, (True, True, True))),
        ("stats grad into dy", 3 * n * es, lambda: E.ext_conv_bn_stats_grad_y(g, y, mean, b, s),
         lambda: reference.conv_bn_stats_grad_y(g, y, mean, b, s)),
    ]


def _time(fn: Callable, device: torch.device, iters: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) * 1000 / iters


def _check(ours, theirs, name: str) -> None:
    a = ours[0] if isinstance(ours, tuple) else ours
    b = theirs[0] if isinstance(theirs, tuple) else theirs
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    if not err <= 2e-2:
        raise SystemExit(f"fusedres.bench.kernels: {name}: extension and PyTorch differ (relative error {err:.2e})")


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 on the CPU")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--layout", choices=("cl", "nchw"), default="cl")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of the ResNet-50 shapes to run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=None, help="calls per timed repeat (default: 20 GPU, 3 CPU)")
    p.add_argument("--out", default=None, help="write the JSON record here")
    args = p.parse_args(argv)
    if ext.load_error():
        raise SystemExit(f"fusedres.bench.kernels: {ext.load_error()}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (256 if gpu else 8)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    iters = args.iters or (20 if gpu else 3)
    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    copy_bw = roofline.measure_copy_bandwidth(device) if gpu else None
    rows = []
    for c, h, w in SHAPES[: args.shapes]:
        y = torch.randn(batch, c, h, w, device=device).to(dtype).contiguous(memory_format=fmt)
        for name, nbytes, ours, theirs in _cases(y):
            _check(ours(), theirs(), name)
            times: dict[str, list[float]] = {"ext": [], "torch": []}
            _time(ours, device, 1), _time(theirs, device, 1)  # warm-up
            for _ in range(args.repeats):  # interleaved
                times["ext"].append(_time(ours, device, iters))
                times["torch"].append(_time(theirs, device, iters))
            ext_ms, torch_ms = statistics.median(times["ext"]), statistics.median(times["torch"])
            row = {"op": name, "shape": [batch, c, h, w], "ext_ms": ext_ms, "torch_ms": torch_ms,
                   "speedup": torch_ms / ext_ms, "bytes": nbytes, "times_ms": times}
            if copy_bw:
                row["copy_bw_fraction"] = nbytes / (ext_ms / 1000) / copy_bw
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
        del y
    env = report.environment(device)
    record = {"device": report.device_label(env), "dtype": str(dtype), "layout": args.layout, "batch": batch,
              "copy_bandwidth_GBps": None if copy_bw is None else copy_bw / 1e9, "rows": rows, "environment": env}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


def format_row(row: dict) -> str:
    shape = "x".join(str(s) for s in row["shape"])
    text = (f"{row['op']:<30} {shape:<16} ext {row['ext_ms']:8.3f} ms  torch {row['torch_ms']:8.3f} ms  "
            f"{row['speedup']:5.2f}x")
    if "copy_bw_fraction" in row:
        text += f"  {100 * row['copy_bw_fraction']:5.1f}% of copy bandwidth"
    return text


def main() -> None:
    record = run()
    print(f"fusedres._C kernels vs PyTorch ops: {record['device']}, {record['dtype']}, {record['layout']}, "
          f"batch {record['batch']}" + (f", copy {record['copy_bandwidth_GBps']:.0f} GB/s"
                                        if record["copy_bandwidth_GBps"] else ""))
    for row in record["rows"]:
        print(format_row(row))


if __name__ == "__main__":
    main()
