"""Parity checks, interleaved timing and peak memory of benchmark candidates."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
        F.cross_entropy(out, labels).backward()
        return Reference(out.detach(), {n: p.grad.detach() for n, p in m.named_parameters()})


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
    """Extra memory one step needs above what is allocated before it (activations, gradients,
    workspaces; model weights and optimizer state excluded).

    GPU: the caching allocator's peak. CPU: the peak of PyTorch's own allocations and frees
    recorded by the profiler (the process RSS is useless here: the C allocator keeps freed
    memory, so after warm-up the RSS hardly moves).
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        sync(device)
        return {"peak_step_MiB": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "method": "torch.cuda.max_memory_allocated - allocated before the step"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    deltas = []  # allocations are charged to the op that made them, frees are "[memory]" events
    for event in prof.events():
        if event.name == "[memory]":
            deltas.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:
            deltas.append((event.time_range.start, event.self_cpu_memory_usage))
    current = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        current += delta
        peak = max(peak, current)
    return {"peak_step_MiB": peak / 2**20, "method": "torch.profiler CPU allocations: peak of allocated - freed"}
