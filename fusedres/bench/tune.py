"""Tune every conv shape of a model's blocks, as `backend="auto"` meets them in eval and training.

    python -m fusedres.bench.tune [--model resnet50] [--batch 256] [--dtype bf16] --out tune.json
    python -m fusedres.bench.tune ... --precompile 6      # first: compile only, 6 processes

Runs every distinct residual block of the model (`fusedres.bench.blocks`: blocks with the
same signature have the same conv shapes, so this covers every conv of the model) once in
eval mode (forward) and once in train mode (forward + backward) with `auto`. On a GPU that
makes the never-slower tuner (`fusedres.backends.tuning`) time the Triton conv against cuDNN
for every eval conv, and the Triton dgrad/wgrad against ATen's for every train conv, and
write one JSON per shape under $FUSEDRES_CACHE_DIR/dispatch/; `fusedres.bench.summary`
turns those into the table. Records each block's first-call seconds in --out.

--precompile N only fills $TRITON_CACHE_DIR: N processes each compile every N-th autotuning
config of every Triton kernel (the triton backend, Triton dgrad/wgrad forced), launching each
config once instead of timing it. Compilation is CPU work and the autotuner compiles one
config after another, so this turns minutes of serial compiles into one N-th of them; the
timings made afterwards (no other process running) are clean. --bench-ms W,R shortens the
Triton autotuner's timing of each config (default 25,100 ms; the tuner itself uses 5,20).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fusedres.bench import blocks, measure
from fusedres.bench.workload import DTYPES, MODELS

MODES = ("inference", "training")


def _autotuners() -> list:
    """Every `triton.autotune` kernel of fusedres (imports its Triton modules)."""
    from triton.runtime.autotuner import Autotuner

    from fusedres.triton import bn, conv, conv_backward, prologue

    return [v for m in (conv, conv_backward, bn, prologue) for v in vars(m).values() if isinstance(v, Autotuner)]


def _run_once(kernel_call, quantiles=None) -> list[float]:
    kernel_call()  # compiles on first launch
    return [0.0, 0.0, 0.0]


def compile_only(worker: int, workers: int) -> None:
    """Make this process compile only its share of every autotuner's configs, without timing."""
    for tuner in _autotuners():
        prune = tuner.prune_configs

        def share(kwargs, prune=prune):
            configs = prune(kwargs)
            return configs[worker::workers] or configs[:1]

        tuner.prune_configs = share
        tuner.do_bench = _run_once


def shorten_autotuning(warmup_ms: int, rep_ms: int) -> None:
    from triton.testing import do_bench

    for tuner in _autotuners():
        tuner.do_bench = functools.partial(do_bench, warmup=warmup_ms, rep=rep_ms)


def run_blocks(model: str, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
               modes: tuple[str, ...], max_blocks: int | None) -> list[dict]:
    """Each distinct block once per mode; its first-call seconds (compile, autotune, tune included)."""
    records = []
    for shape in blocks.distinct_blocks(model)[:max_blocks]:
        for mode in modes:
            case = blocks.BlockCase(shape, f"fusedres_{backend}", mode, batch, dtype, device)
            begin = time.perf_counter()
            case.step()  # synchronises
            records.append({"block": shape.id, "mode": mode, "first_call_s": time.perf_counter() - begin})
            print(f"{shape.id} {mode}: {records[-1]['first_call_s']:.1f} s", flush=True)
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def _precompile(args: argparse.Namespace) -> int:
    """Start args.precompile workers (this module with --worker i) and wait for them."""
    env = dict(os.environ)
    if torch.cuda.is_available() and args.device != "cpu":  # a CPU dry run just runs the workers' code path
        env.update(FUSEDRES_BACKEND="triton", FUSEDRES_TRITON_CONV_BACKWARD="triton")
    env.pop("TRITON_CACHE_AUTOTUNING", None)  # the workers' untimed choices must not be cached
    common = ["--model", args.model, "--modes", *args.modes]
    for flag, value in (("--batch", args.batch), ("--dtype", args.dtype), ("--device", args.device),
                        ("--max-blocks", args.max_blocks)):
        common += [flag, str(value)] if value is not None else []
    procs = []
    for i in range(args.precompile):
        out = [] if args.out is None else ["--out", str(args.out.with_suffix(f".worker{i}.json"))]
        procs.append(subprocess.Popen([sys.executable, "-m", "fusedres.bench.tune", *common, *out,
                                       "--worker", f"{i}/{args.precompile}"], env=env))
    codes = [p.wait() for p in procs]
    print(f"precompile: {args.precompile} workers, exit codes {codes}", flush=True)
    return max(codes, key=abs)


class CompileCounter:
    """Triton compilations in this process (a `knobs.compilation.listener`; triton >= 3.4)."""

    def __init__(self) -> None:
        self.compiled = self.cache_hits = 0
        self.seconds = 0.0
        try:
            from triton import knobs

            knobs.compilation.listener = self
            self.installed = True
        except (ImportError, AttributeError):
            self.installed = False

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        if cache_hit:
            self.cache_hits += 1
        else:
            self.compiled += 1
            self.seconds += times.total / 1e6  # microseconds

    def record(self) -> dict:
        return {"compiled": self.compiled, "cache_hits": self.cache_hits, "compile_s": self.seconds} \
            if self.installed else {"unavailable": "this triton has no knobs.compilation.listener"}


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=MODELS)
    p.add_argument("--batch", type=int, help="default: 256 on a GPU, 2 on a CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--max-blocks", type=int, help="only the first N distinct blocks (dry runs)")
    p.add_argument("--bench-ms", help="WARMUP,REP: the Triton autotuner's timing per config, in ms")
    p.add_argument("--precompile", type=int, help="compile only, in this many processes")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "i/N": one precompile process
    p.add_argument("--out", type=Path, help="JSON record of the first-call times")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.precompile:
        code = _precompile(args)
        if code:
            raise SystemExit(code)
        return {}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    counter = CompileCounter() if gpu else None
    if args.worker and gpu:
        compile_only(*map(int, args.worker.split("/")))
    elif args.bench_ms and gpu:
        shorten_autotuning(*map(int, args.bench_ms.split(",")))
    begin = time.perf_counter()
    records = run_blocks(args.model, args.batch or (256 if gpu else 2), DTYPES[dtype_name], device,
                         "triton" if args.worker and gpu else "auto", tuple(args.modes), args.max_blocks)
    measure.sync(device)
    record = {"model": args.model, "batch": args.batch or (256 if gpu else 2), "dtype": dtype_name,
              "device": str(device), "worker": args.worker, "bench_ms": args.bench_ms,
              "total_s": time.perf_counter() - begin, "blocks": records,
              "triton_compiles": counter.record() if counter else None}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
