"""The main job until the benchmark CLI exists: convert a ResNet-50, check parity, time it.

    python -m fusedres.demo [--batch 8] [--size 224] [--repeats 7] [--model resnet50]

Eval mode, on the current device (CUDA if available, else CPU). The baselines and the
fused model are timed interleaved, in the same process, after warm-up; the median of
`--repeats` runs is reported with the spread (min-max).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import fusedres


def _randomize_bn(model: torch.nn.Module) -> None:
    """Pretrained-like BN state, so the parity check exercises folding."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    _sync(x.device)
    start = time.perf_counter()
    model(x)
    _sync(x.device)
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=fusedres.models.__all__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    torch.manual_seed(0)
    eager = getattr(torchvision.models, args.model)().eval()
    _randomize_bn(eager)
    eager.to(device)
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused_cl = fusedres.convert(eager_cl)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    candidates = {
        "torchvision eager, NCHW": (eager, x),
        "torchvision eager, channels_last": (eager_cl, x_cl),
        "fusedres, channels_last": (fused_cl, x_cl),
    }
    print(f"fusedres {fusedres.__version__} | torch {torch.__version__} | device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"{args.model}, eval, batch {args.batch}, {args.size}x{args.size}, {dtype}")

    with torch.inference_mode():
        expected = eager(x).double()
        actual = fused_cl(x_cl).double()
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        ok = error < 1e-4
        print(f"parity: max |fused - eager| / max |eager| = {error:.2e} ({'ok' if ok else 'FAILED'})")
        if not ok:
            raise SystemExit("fusedres output does not match torchvision; not timing it")
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.warmup):
            for model, inp in candidates.values():
                model(inp)
        for _ in range(args.repeats):
            for name, (model, inp) in candidates.items():
                times[name].append(_time_once(model, inp))

    base = statistics.median(times["torchvision eager, NCHW"])
    base_cl = statistics.median(times["torchvision eager, channels_last"])
    print(f"\n{'candidate':<36}{'median ms':>11}{'min-max ms':>17}{'img/s':>9}{'vs NCHW':>9}{'vs CL':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<36}{med:>11.1f}{min(ts):>8.1f}-{max(ts):<8.1f}{args.batch * 1000 / med:>9.1f}"
              f"{base / med:>8.2f}x{base_cl / med:>6.2f}x")


if __name__ == "__main__":
    main()
