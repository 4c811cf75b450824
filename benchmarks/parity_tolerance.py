"""Why fusedres.testing's low-precision rule takes two PyTorch runs and L2-norm errors.

For each seed: a torchvision model with randomised BN, one SGD step in train mode (the
check's own runs, fusedres.testing.parity), and for every compared tensor (outputs, input
gradient, parameter gradients, buffers) whether it passes error <= 2 * torch_error + 4 eps
under two rules:

* "literal": max-element relative errors, torch_error from one NCHW PyTorch run (the rule
  of tests/test_blocks.py for single blocks);
* "check": L2-norm relative errors, torch_error the larger of PyTorch's NCHW and
  channels_last runs (what fusedres-check uses).

Each rule is applied to the fused model and, as a control, to PyTorch's own channels_last
run (under "check" the control is bounded by itself, so only "literal" is shown for it).

    python benchmarks/parity_tolerance.py                      # resnet50, 224, batch 2, fp32, 4 seeds
    python benchmarks/parity_tolerance.py --model resnet18 --size 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import fusedres
from fusedres.testing import parity, randomize_batchnorm


def _errors(record, exact, norm: bool) -> dict:
    return {k: parity.relative_error(record.tensors[k], e, norm=norm)[0] for k, e in exact.tensors.items()
            if e.is_floating_point()}


def _fails(ours: dict, torch_errors: list[dict], eps: float) -> tuple[int, float]:
    fails, worst = 0, 0.0
    for k, error in ours.items():
        bound = 2 * max(t[k] for t in torch_errors) + 4 * eps
        fails += error > bound
        worst = max(worst, error / bound)
    return fails, worst


def study(model_name: str, size: int, batch: int, dtype: torch.dtype, seed: int) -> str:
    torch.manual_seed(seed)
    model = randomize_batchnorm(getattr(torchvision.models, model_name)(), seed)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    config = parity._Config("auto", ("train",), dtype, torch.device("cpu"), 1, None, seed, parity.LR)
    base = fusedres.revert(model).double()
    fused = fusedres.convert(base)
    start = time.perf_counter()
    exact = parity._run(base, "train", torch.float64, (x,), config, False)
    nchw = parity._run(base, "train", dtype, (x,), config, False)
    cl = parity._run(base, "train", dtype, (x,), config, False, channels_last=True)
    ours = parity._run(fused, "train", dtype, (x,), config, False)
    eps = torch.finfo(dtype).eps
    n = len(exact.tensors)
    lit = _fails(_errors(ours, exact, False), [_errors(nchw, exact, False)], eps)
    lit_cl = _fails(_errors(cl, exact, False), [_errors(nchw, exact, False)], eps)
    chk = _fails(_errors(ours, exact, True), [_errors(nchw, exact, True), _errors(cl, exact, True)], eps)
    return (f"seed {seed}: {n} tensors; literal rule: fused fails {lit[0]} (worst error/bound {lit[1]:.2f}), "
            f"PyTorch channels_last fails {lit_cl[0]} ({lit_cl[1]:.2f}); check rule: fused fails {chk[0]} "
            f"({chk[1]:.2f}) [{time.perf_counter() - start:.0f} s]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, train, 1 SGD step, "
          f"torch {torch.__version__}")
    for seed in range(args.seeds):
        print(study(args.model, args.size, args.batch, getattr(torch, args.dtype), seed), flush=True)


if __name__ == "__main__":
    main()
