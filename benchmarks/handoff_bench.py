"""What the pre-activation statistics hand-off (fusedres/handoff.py) saves in training.

One training step (forward + backward) of timm's resnetv2_50, fused, torch backend, fp32
channels_last on this machine's CPU: norm1's statistics handed from the previous block
against a `bn_stats` pass per block (the hand-off switched off), interleaved rounds.

    python benchmarks/handoff_bench.py [BATCH] [SIZE] [ROUNDS]     # defaults 8 64 7
"""

from __future__ import annotations

import statistics
import sys
import time
from unittest import mock

import timm
import torch

import fusedres
from fusedres import handoff


def main(batch: int = 8, size: int = 64, rounds: int = 7) -> None:
    torch.manual_seed(0)
    model = fusedres.convert(timm.create_model("resnetv2_50", num_classes=10), backend="torch")
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def step_ms() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        return (time.perf_counter() - start) * 1e3

    for _ in range(2):  # warm-up
        step_ms()
    times: dict[str, list[float]] = {"hand-off": [], "bn_stats pass": []}
    for _ in range(rounds):
        times["hand-off"].append(step_ms())
        with mock.patch.object(handoff, "recall", return_value=None):
            times["bn_stats pass"].append(step_ms())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: resnetv2_50 training step, "
          f"batch {batch}, {size}x{size}, fp32 channels_last")
    for name, ms in times.items():
        print(f"{name:14s} median {statistics.median(ms):8.1f} ms  (min {min(ms):.1f}, {len(ms)} rounds)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
