"""Speed-of-light numbers for a GPU: a compute peak per card and the measured copy bandwidth.

The roofline floor of a model is the sum over its stages (stem, each residual block,
head; see `workload.block_stages`) of max(FLOPs / peak FLOP/s, bytes / copy bandwidth):
each stage fused into one kernel that reads its input once and writes its output once.
For ResNet-50 in bf16 at 224x224 that is 8.18 GFLOP and ~23 MB per image (DESIGN.md).
"""

from __future__ import annotations

import torch

from fusedres.bench.workload import Stage

# Dense tensor-core throughput a well-tuned GEMM reaches, in FLOP/s, per (card, dtype).
# 790 TFLOP/s is DESIGN.md's working figure for 16-bit on an H100 (the spec sheet says
# 989 for SXM); fp32 means TF32 tensor cores at half that. Unknown cards get no compute
# roof, and the report then gives TFLOP/s without a fraction.
_PEAK_FLOPS = {
    ("H100", "bf16"): 790e12, ("H100", "fp16"): 790e12, ("H100", "fp32"): 395e12,
    ("H200", "bf16"): 790e12, ("H200", "fp16"): 790e12, ("H200", "fp32"): 395e12,
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    for (card, dt), flops in _PEAK_FLOPS.items():
        if card in device_name and dt == dtype:
            return flops
    return None


def measure_copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 20) -> float | None:
    """Bytes read plus written per second by a device-to-device copy (the median of `repeats`)."""
    if device.type != "cuda":
        return None
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times = sorted(times[3:])
    del src, dst
    return 2 * n * 4 / times[len(times) // 2]


def roofline_images_per_second(stages: list[Stage], element_bytes: int, flops_per_s: float | None,
                               bytes_per_s: float | None) -> float | None:
    """Images per second if every stage ran at the roofline (None without both roofs)."""
    if not flops_per_s or not bytes_per_s:
        return None
    seconds = sum(max(s.flops / flops_per_s, s.elements_moved * element_bytes / bytes_per_s) for s in stages)
    return 1.0 / seconds
