"""What each part of the CPU inference path contributes: ResNet-50 eval, one part taken out at a time.

    python benchmarks/cpu_ablation.py --batch 8 --dtype fp32 [--layout cl|nchw] [--rounds 7]

Rows, timed interleaved (medians of --rounds): eager, the full fused path, and the fused
path without prepacked weights (oneDNN reorders every weight on every call), without the
NaN/Inf guard (FUSEDRES_CHECK_FINITE=0), without the fused stem (torchvision's stem
modules), and without the CPU plan at all (the per-op `fusedres::conv_bias_act` path, as
before the plan existed; for bf16 that is the unfused reference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch

import fusedres
from fusedres import cpu_plan, finite_guard, stem
from fusedres.bench.workload import build_model


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _env(name, value):
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--layout", choices=("cl", "nchw"), default="cl")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    eager = build_model("resnet50").eval().to(dtype, memory_format=fmt)
    fused = fusedres.convert(eager)
    no_stem = fusedres.convert(eager)
    stem.unfuse_stem(no_stem)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = x.contiguous(memory_format=fmt)
    rows = {
        "eager": (eager, contextlib.nullcontext),
        "fused": (fused, contextlib.nullcontext),
        "fused, no prepacking": (fused, lambda: _patched(cpu_plan.PackedConv, "packed_weight",
                                                         lambda self, shape: self.weight)),
        "fused, no NaN/Inf guard": (fused, lambda: _env(finite_guard.CHECK_ENV, "0")),
        "fused, no fused stem": (no_stem, contextlib.nullcontext),
        "fused, no CPU plan (op path)": (copy.deepcopy(fused), lambda: _patched(cpu_plan, "DTYPES", frozenset())),
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    repeats = 5 if args.batch == 1 else 1
    with torch.inference_mode():
        for model, context in rows.values():
            with context():
                model(x)
                model(x)
        for _ in range(args.rounds):
            for name, (model, context) in rows.items():
                with context():
                    start = time.perf_counter()
                    for _ in range(repeats):
                        model(x)
                    times[name].append((time.perf_counter() - start) / repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"resnet50 eval 224x224, batch {args.batch}, {args.dtype}, {args.layout}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, medians of {args.rounds} interleaved rounds")
    for name, t in med.items():
        print(f"  {name:32} {t * 1e3:8.1f} ms  {med['eager'] / t:5.2f}x eager  {t / med['fused']:5.3f}x fused's time")


if __name__ == "__main__":
    main()
