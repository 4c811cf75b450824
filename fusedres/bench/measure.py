"""Parity checks, interleaved timing and peak memory of benchmark candidates."""

from __future__ import annotations

import copy
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fusedres.bench import workload
from fusedres.bench.candidates import Runner, tf32
from fusedres.bench.workload import Workload

# Relative error of logits (max-norm) and of the gradient vector (2-norm) against the fp32
# reference may be at most PARITY_FACTOR x what eager PyTorch in the same dtype shows,
# and never needs to be below the floor (eager can be accidentally exact in fp32).
PARITY_FACTOR = 2.0
PARITY_FLOOR = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
# Eager PyTorch itself is the yardstick; it fails only when grossly off (NaN, broken setup).
YARDSTICK_CAP = {"fp32": 1e-2, "fp16": 5e-2, "bf16": 2e-1}


@dataclass
class Reference:
    logits: torch.Tensor
    grads: dict[str, torch.Tensor]


def reference_outputs(model: nn.Module, work: Workload, x: torch.Tensor, labels: torch.Tensor) -> Reference:
    """fp32 NCHW eager with TF32 off: the numbers every candidate is checked against."""
    m = copy.deepcopy(model).to(work.device)
    with tf32(False if work.device.type == "cuda" else None):
        if work.mode == "inference":
            with torch.inference_mode():
                return Reference(m.eval()(x).float(), {})
        out = m.train()(x)
        workload.loss(work.model, out, labels).backward()
        return Reference(out.detach(), {n: p.grad.detach() for n, p in m.named_parameters() if p.requires_grad})


def relative_errors(logits: torch.Tensor, grads: dict[str, torch.Tensor], ref: Reference) -> dict[str, float]:
    """{"logits": max|d|/max|ref|, "grads": ||d||_2/||ref||_2 over every parameter gradient}."""
    logits = logits.to(ref.logits.device)
    errors = {"logits": ((logits - ref.logits).abs().max() / ref.logits.abs().max()).item()}
    if ref.grads:
        missing = sorted(set(ref.grads) - set(grads))
        if missing:
            errors["grads"] = float("inf")
            return errors
        diff = sum(((grads[n].to(g.device) - g).double().pow(2).sum() for n, g in ref.grads.items()))
        norm = sum(g.double().pow(2).sum() for g in ref.grads.values())
        errors["grads"] = (diff / norm).sqrt().item()
    return errors


def parity_tolerance(dtype: str, errors: dict[str, float], yardstick_errors: dict[str, float] | None
                     ) -> dict[str, float]:
    """The tolerance for each error in `errors`; no yardstick means this is the yardstick."""
    if yardstick_errors is None:
        return dict.fromkeys(errors, YARDSTICK_CAP[dtype])
    return {k: max(PARITY_FACTOR * yardstick_errors[k], PARITY_FLOOR[dtype]) for k in errors}


def passes(errors: dict[str, float], tolerance: dict[str, float]) -> bool:
    # NaN compares False, so a NaN error fails.
    return all(errors[k] <= tolerance[k] for k in errors)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(runner: Runner, iters: int, device: torch.device) -> float:
    """Milliseconds per iteration over `iters` back-to-back steps (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            runner.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        runner.step()
    return (time.perf_counter() - begin) * 1000 / iters


def time_interleaved(runners: dict[str, Runner], repeats: int, warmup: int, iters: int, device: torch.device,
                     on_progress: Callable[[str], None]) -> dict[str, list[float]]:
    """Warm every runner up, then time them round-robin so drift (clocks, heat, noisy
    neighbours) hits every candidate alike. Returns ms per iteration for each repeat."""
    for name, runner in runners.items():
        for _ in range(warmup):
            runner.step()
        sync(device)
        on_progress(f"warm-up {name}")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):
        for name, runner in runners.items():
            times[name].append(time_iterations(runner, iters, device))
            on_progress(f"repeat {r + 1}/{repeats} {name}")
    return times


def summarize(ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0}


def peak_step_memory(runner: Runner, device: torch.device) -> dict[str, float | str | None]:
    """Extra memory one step needs above what is in use before it (activations, gradients,
    workspaces; model weights and optimizer state excluded).

    GPU: the caching allocator's peak. CPU: how much the process's peak resident set grows
    during the step, after malloc_trim has handed the C allocator's free pages back to the
    OS (without that, freed memory stays resident and after warm-up the RSS hardly moves).
    It sees every allocation (PyTorch's, oneDNN's, inductor-compiled code's) and needs no
    profiler (torch.profiler starts kineto, which prints to stderr). Linux with glibc only;
    elsewhere (or with another malloc preloaded, which malloc_trim does not reach) None or
    an undercount.
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        sync(device)
        return {"peak_step_MiB": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "method": "torch.cuda.max_memory_allocated - allocated before the step"}
    grown = peak_rss_growth(runner.step)
    if grown is None:
        return {"peak_step_MiB": None, "method": "not measured: needs Linux (/proc/self/clear_refs) and glibc"}
    return {"peak_step_MiB": grown / 2**20,
            "method": "peak RSS (VmHWM) growth during the step, after gc and malloc_trim(0)"}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (given there in kB), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_rss_growth(fn: Callable[[], object]) -> int | None:
    """Bytes by which the process's peak RSS grows while `fn()` runs; None where the peak
    cannot be reset (not Linux) or freed memory cannot be released first (no glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    gc.collect()
    malloc_trim(0)  # free heap pages go back to the OS: reusing them in fn() shows in the RSS again
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        before = _status_bytes("VmHWM")
    except OSError:
        return None
    fn()
    return max(_status_bytes("VmHWM") - before, 0)
