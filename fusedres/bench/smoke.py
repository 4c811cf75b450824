"""Smoke check: every backend, eval and train mode, on a small ResNet and one ResNet-50 block.

    python -m fusedres.bench.smoke --out smoke.txt [--device cuda|cpu] [--dtype bf16|fp16|fp32]

Cases: `fusedres.convert` of torchvision resnet18 at a small image size, and ResNet-50's
layer2.0 Bottleneck (stride 2, projection shortcut), each in eval mode (model cast to the
dtype) and train mode (fp32 weights under autocast, or plain fp32), for backends auto,
triton, cuda and torch. Each is compared with a float64 eager torchvision reference; the
output, input gradient and parameter gradients (train) may be off by at most 2x what eager
torchvision in the same regime is off (with the floors of `measure.PARITY_FLOOR`), the rule
of the benchmark CLI. One line per case (PASS / FAIL / UNAVAILABLE, errors and reason) is
appended to --out and flushed, so a run cut short keeps every finished case.

On a CPU the triton backend runs only in the Triton interpreter, which must be chosen before
Python imports triton (torch imports it with fusedres): run with TRITON_INTERPRET=1 in the
environment, as the test suite does; otherwise triton is reported UNAVAILABLE with the
backend's reason. Meant to run with FUSEDRES_TRITON_AUTOTUNE=0 (one config: few compiles).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

BACKENDS: tuple[str, ...] = ("auto", "triton", "cuda", "torch")
MODES: tuple[str, ...] = ("eval", "train")
CASE_KINDS: tuple[str, ...] = ("resnet18", "bottleneck")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # fp32 torchvision module on the CPU, fixed weights
    input_shape: tuple[int, ...]


@dataclass
class Result:
    status: str  # "PASS" | "FAIL" | "UNAVAILABLE"
    errors: dict[str, float]
    tolerance: dict[str, float]
    seconds: float
    reason: str = ""


def cases(batch: int, image_size: int, block_size: int, kinds: tuple[str, ...] = CASE_KINDS) -> list[Case]:
    from fusedres.bench import blocks
    from fusedres.bench.workload import build_model

    shape = next(s for s in blocks.distinct_blocks("resnet50", image_size=64) if s.name == "layer2.0")
    every = {
        "resnet18": Case(f"resnet18-{image_size}px", lambda: build_model("resnet18"),
                         (batch, 3, image_size, image_size)),
        "bottleneck": Case(f"resnet50.layer2.0-{shape.in_shape[0]}x{block_size}x{block_size}",
                           lambda: blocks.get_block(shape), (batch, shape.in_shape[0], block_size, block_size)),
    }
    return [every[k] for k in kinds]


def _run(module: nn.Module, x: torch.Tensor, proj: torch.Tensor, mode: str,
         autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Output, and in train mode the input gradient and every parameter gradient, as float64."""
    if mode == "eval":
        with torch.inference_mode():
            return {"output": module.eval()(x).double()}
    module.train()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        out = module(x)
    out.backward(proj.to(out.dtype))
    grads = {f"grad.{n}": p.grad.double() for n, p in module.named_parameters() if p.grad is not None}
    return {"output": out.detach().double(), "input_grad": x.grad.double(), **grads}


def _errors(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max-norm relative error of the output and input gradient; 2-norm relative error over all
    parameter gradients together (as `measure.relative_errors`). A missing gradient is inf."""
    errors = {k: ((mine[k] - ref[k]).abs().max() / ref[k].abs().max()).item() if k in mine else float("inf")
              for k in ("output", "input_grad") if k in ref}
    names = [k for k in ref if k.startswith("grad.")]
    if names:
        if any(k not in mine for k in names):
            errors["param_grads"] = float("inf")
        else:
            diff = sum((mine[k] - ref[k]).pow(2).sum() for k in names)
            norm = sum(ref[k].pow(2).sum() for k in names)
            errors["param_grads"] = (diff / norm).sqrt().item()
    return errors


def _regime(module: nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype
            ) -> tuple[nn.Module, torch.Tensor, torch.dtype | None]:
    """How a user runs it: channels_last; eval cast to the dtype; train fp32 weights under autocast."""
    module = copy.deepcopy(module).to(x.device, memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    if mode == "eval":
        return module.to(dtype), x.to(dtype), None
    return module, x, (dtype if dtype != torch.float32 else None)


def check_case(case: Case, mode: str, backends: tuple[str, ...], device: torch.device, dtype: torch.dtype,
               dtype_name: str, seed: int = 0) -> Iterator[tuple[str, Result]]:
    """("eager", its result) first (it sets the tolerance), then one result per backend."""
    import fusedres
    from fusedres.bench import measure

    torch.manual_seed(seed)
    module = case.build()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.input_shape, generator=gen).to(device)
    with torch.no_grad():
        out_shape = copy.deepcopy(module).eval()(x[:1].cpu()).shape[1:]
    proj = torch.randn((case.input_shape[0], *out_shape), generator=gen).to(device)
    ref = _run(copy.deepcopy(module).to(device).double(), x.double(), proj.double(), mode, None)

    begin = time.perf_counter()
    m, xi, autocast = _regime(module, x, mode, dtype)
    eager = _errors(_run(m, xi, proj, mode, autocast), ref)
    cap = measure.parity_tolerance(dtype_name, eager, None)
    yield "eager", Result("PASS" if measure.passes(eager, cap) else "FAIL", eager, cap, time.perf_counter() - begin)

    for backend in backends:
        begin = time.perf_counter()
        try:
            m, xi, autocast = _regime(module, x, mode, dtype)
            mine = _run(fusedres.convert(m, backend=backend, inplace=True), xi, proj, mode, autocast)
            measure.sync(device)
        except fusedres.UnsupportedInputError as e:
            yield backend, Result("UNAVAILABLE", {}, {}, time.perf_counter() - begin, str(e))
            continue
        except Exception as e:  # a broken backend is reported, the others still run
            yield backend, Result("FAIL", {}, {}, time.perf_counter() - begin, f"{type(e).__name__}: {e}")
            continue
        errors = _errors(mine, ref)
        tolerance = measure.parity_tolerance(dtype_name, errors, eager)
        status = "PASS" if measure.passes(errors, tolerance) else "FAIL"
        yield backend, Result(status, errors, tolerance, time.perf_counter() - begin)


def format_line(case: str, mode: str, dtype_name: str, who: str, r: Result) -> str:
    parts = [f"{r.status:<11} {case} {mode} {who} {dtype_name}"]
    if r.errors:
        parts.append(" ".join(f"{k} {v:.2e}<={r.tolerance[k]:.2e}" if v <= r.tolerance[k] else
                              f"{k} {v:.2e}>{r.tolerance[k]:.2e}" for k, v in r.errors.items()))
    parts.append(f"({r.seconds:.1f} s)")
    if r.reason:
        parts.append("reason: " + " ".join(r.reason.split()))
    return " | ".join(parts)


def run(argv: list[str] | None = None, stream: TextIO | None = None) -> list[str]:
    """Run every case, append one line per case to --out (flushed) and echo it; return the lines."""
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="file the result lines are appended to")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--batch", type=int, help="default: 8 on a GPU, 4 on a CPU")
    p.add_argument("--image-size", type=int, default=64, help="resnet18 input size (default 64)")
    p.add_argument("--block-size", type=int, help="the Bottleneck's input H=W (default: 16 GPU, 8 CPU)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--cases", nargs="+", choices=CASE_KINDS, default=list(CASE_KINDS))
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    stream = stream or sys.stdout
    lines: list[str] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for case in cases(args.batch or (8 if gpu else 4), args.image_size, args.block_size or (16 if gpu else 8),
                          tuple(args.cases)):
            for mode in args.modes:
                for who, result in check_case(case, mode, tuple(args.backends), device, dtype, dtype_name):
                    line = format_line(case.name, mode, dtype_name, who, result)
                    lines.append(line)
                    f.write(line + "\n")
                    f.flush()
                    print(line, file=stream, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    lines = run(argv)
    sys.exit(1 if any(line.startswith("FAIL") for line in lines) else 0)


if __name__ == "__main__":
    main()
