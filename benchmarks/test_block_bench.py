"""Per-block benchmarks: every distinct block shape of ResNet-18 and ResNet-50, timm's
pre-activation ResNetV2-50, and the CIFAR ResNet-56 (option-A shortcuts) and plain-56 (at 32x32).

    python -m pytest benchmarks/ --benchmark-json=blocks.json           # GPU: full grid
    python -m pytest benchmarks/                                        # CPU: a small subset

GPU cases (batch $FUSEDRES_BENCH_BATCH, default 256; dtype $FUSEDRES_BENCH_DTYPE, default
bf16) skip on a CPU; the CPU subset runs eight blocks at batch 2 in fp32. Every case is
checked against fp32 before it is timed; the L2 cache is flushed before every GPU round.
Candidates that cannot run an input (a backend not built, training on a backend without
training kernels) skip with the reason.
"""

import os

import pytest
import torch

from fusedres.backends import UnsupportedInputError
from fusedres.bench import blocks
from fusedres.bench.workload import DTYPES

GPU_BATCH = int(os.environ.get("FUSEDRES_BENCH_BATCH", "256"))
GPU_DTYPE = DTYPES[os.environ.get("FUSEDRES_BENCH_DTYPE", "bf16")]
CANDIDATES = ("eager", "fusedres_auto", "fusedres_torch", "fusedres_triton", "fusedres_cuda")
MODES = ("inference", "training")
CPU_SUBSET = {"resnet18.layer1.0", "resnet18.layer2.0", "resnet50.layer1.0", "resnet50.layer4.1",
              "resnetv2_50.stages.0.blocks.0", "resnetv2_50.stages.1.blocks.1", "cifar_resnet56.layer2.0",
              "cifar_plain56.layer2.1"}
# torch.compile max-autotune takes ~a minute per block: only where a target names it.
MAX_AUTOTUNE_BLOCKS = {"resnet50.layer1.0", "resnet50.layer1.1"}

SHAPES = [shape for model in ("resnet18", "resnet50", "resnetv2_50", "cifar_resnet56", "cifar_plain56")
          for shape in blocks.distinct_blocks(model)]


def _params():
    for shape in SHAPES:
        where = f"{shape.model}.{shape.name}"
        names = CANDIDATES + (("compile_max_autotune",) if where in MAX_AUTOTUNE_BLOCKS else ())
        for mode in MODES:
            for cand in names:
                yield pytest.param(shape, mode, cand, "cuda", id=f"cuda-{shape.id}-{mode}-{cand}",
                                   marks=pytest.mark.gpu)
                if where in CPU_SUBSET and cand in ("eager", "fusedres_torch"):
                    yield pytest.param(shape, mode, cand, "cpu", id=f"cpu-{shape.id}-{mode}-{cand}")


@pytest.mark.parametrize(("shape", "mode", "candidate", "device"), list(_params()))
def test_block(benchmark, shape, mode, candidate, device):
    gpu = device == "cuda"
    batch, dtype = (GPU_BATCH, GPU_DTYPE) if gpu else (2, torch.float32)
    dev = torch.device(device)
    try:
        case = blocks.BlockCase(shape, candidate, mode, batch, dtype, dev)
        parity = case.check()
    except UnsupportedInputError as e:
        pytest.skip(f"{candidate} cannot run this block: {e}")
    benchmark.group = f"{device}-{shape.id}-{mode}"
    benchmark.extra_info.update({"block": shape.id, "mode": mode, "candidate": candidate, "batch": batch,
                                 "dtype": str(dtype).removeprefix("torch."), "device": device, **parity})
    benchmark.pedantic(case.step, setup=lambda: blocks.flush_l2(dev), rounds=20 if gpu else 3,
                       warmup_rounds=3 if gpu else 1, iterations=1)
