"""Per-block benchmark cases: every distinct residual block of a model, ready to time.

Used by the pytest-benchmark suite in benchmarks/. A case is one block shape (its first
occurrence in the model), one mode ("inference": eval forward; "training": train-mode
forward + backward) and one candidate ("eager", "compile_max_autotune" or
"fusedres_<backend>"), in channels_last at the chosen dtype.

Models: torchvision's ResNets (`fusedres.bench.workload.MODELS`), timm's pre-activation
`resnetv2_*` (`timm.create_model`) and fusedres's CIFAR networks (`cifar_*`, 32x32). "eager"
is the model's own block: torchvision's or timm's, or for the CIFAR networks, whose blocks
are fusedres's, the same block running its plain-module forward (`workload.eager_blocks`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import fusedres
from fusedres.bench import measure
from fusedres.bench.workload import (
    ALL_MODELS,
    activate_fused_blocks,
    build_model,
    default_image_size,
    eager_blocks,
    randomize_bn,
)

# Class names of the blocks a case can be (their fused subclasses included).
_BLOCK_CLASSES = {"BasicBlock", "Bottleneck", "PlainBlock", "PreActBasic", "PreActBottleneck",
                  "PreActBasicBlock"}


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in _BLOCK_CLASSES


@dataclass(frozen=True)
class BlockShape:
    model: str
    name: str  # "layer1.0", "stages.0.blocks.0"
    in_shape: tuple[int, int, int]  # C, H, W of one image
    downsample: bool

    @property
    def id(self) -> str:
        c, h, w = self.in_shape
        return f"{self.model}.{self.name}-{c}x{h}x{w}{'-ds' if self.downsample else ''}"


def build_any(model_name: str, seed: int = 0) -> nn.Module:
    """A torchvision ResNet or fusedres CIFAR network (`workload.build_model`: eager), or a
    timm resnetv2_*, float32, random weights with trained-like BatchNorm state."""
    if model_name in ALL_MODELS:
        return build_model(model_name, seed)
    if not model_name.startswith("resnetv2_"):
        raise ValueError(f"unknown model {model_name!r}: a torchvision ResNet or fusedres CIFAR network "
                         f"({', '.join(ALL_MODELS)}), or timm's resnetv2_*")
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    randomize_bn(model, seed)
    return model


def distinct_blocks(model_name: str, image_size: int | None = None) -> list[BlockShape]:
    """Blocks with a new (input shape, downsample, output shape) signature, in model order."""
    model = build_any(model_name).eval()
    size = default_image_size(model_name) if image_size is None else image_size
    names = {id(m): n for n, m in model.named_modules()}
    shapes, seen = [], set()

    def record(block: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        key = (tuple(inputs[0].shape[1:]), block.downsample is not None, tuple(output.shape[1:]))
        if key not in seen:
            seen.add(key)
            shapes.append(BlockShape(model_name, names[id(block)], key[0], key[1]))

    hooks = [m.register_forward_hook(record) for m in model.modules() if _is_block(m)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def get_block(shape: BlockShape) -> nn.Module:
    return build_any(shape.model).get_submodule(shape.name)


class BlockCase:
    """One block, one candidate, one mode: `check()` for parity, `step()` to time."""

    def __init__(self, shape: BlockShape, candidate: str, mode: str, batch: int, dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> None:
        self.mode, self.device, self.dtype = mode, device, dtype
        self.block32 = get_block(shape).to(device).train(mode == "training")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *shape.in_shape, generator=gen).to(device)
        self.x32 = x.contiguous(memory_format=torch.channels_last)
        self.x = self.x32.to(dtype)
        self.grad = torch.randn(self._out_shape(), generator=gen).to(device, dtype)
        self.block = self._make(candidate)

    def _out_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            one = copy.deepcopy(self.block32).eval()(self.x32[:1])
        return (self.x32.shape[0], *one.shape[1:])

    def _make(self, candidate: str) -> nn.Module:
        block = copy.deepcopy(self.block32).to(self.dtype, memory_format=torch.channels_last)
        # eager_blocks / activate_fused_blocks touch only fusedres-native blocks (the CIFAR
        # networks'); convert only torchvision's and timm's.
        if candidate == "eager":
            return eager_blocks(block)
        if candidate == "compile_max_autotune":
            return torch.compile(eager_blocks(block), mode="max-autotune")
        if candidate.startswith("fusedres_"):
            backend = candidate.removeprefix("fusedres_")
            return activate_fused_blocks(fusedres.convert(block, backend=backend), backend)
        raise ValueError(f"unknown block candidate {candidate!r}")

    def _make_fp32_reference(self) -> nn.Module:
        return eager_blocks(copy.deepcopy(self.block32))

    def _run(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> list[torch.Tensor]:
        if self.mode == "inference":
            with torch.inference_mode():
                return [module(x).float().clone()]
        x = x.detach().requires_grad_(True)
        out = module(x)
        out.backward(grad.to(out.dtype))
        return [out.detach().float(), x.grad.float()]

    def step(self) -> None:
        if self.mode == "inference":
            with torch.inference_mode():
                self.block(self.x)
        else:
            x = self.x.detach().requires_grad_(True)
            self.block(x).backward(self.grad)
        measure.sync(self.device)

    def check(self) -> dict[str, float]:
        """Relative errors (max-norm) of output (and input gradient) against fp32, and the tolerance.

        Raises AssertionError when this candidate is off by more than 2x what eager PyTorch
        shows in the same dtype (the benchmark must not time a wrong kernel)."""
        ref = self._run(self._make_fp32_reference(), self.x32, self.grad.float())
        eager = self._run(self._make("eager"), self.x, self.grad)
        mine = self._run(self.block, self.x, self.grad)
        names = ["output", "input_grad"]
        yard = {n: _rel(e, r) for n, e, r in zip(names, eager, ref)}
        errors = {n: _rel(m, r) for n, m, r in zip(names, mine, ref)}
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        tolerance = measure.parity_tolerance(dtype_name, errors, yard)
        if not measure.passes(errors, tolerance):
            raise AssertionError(f"parity failed: errors {errors} > tolerance {tolerance}")
        return {**{f"error_{k}": v for k, v in errors.items()}, **{f"tolerance_{k}": v for k, v in tolerance.items()}}


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def flush_l2(device: torch.device, _buffer: dict = {}) -> None:  # noqa: B006 (one buffer per process)
    """Evict the GPU's L2 cache (50 MB on an H100) by writing 256 MiB, so a block's inputs
    are read from HBM as they would be inside a full network."""
    if device.type != "cuda":
        return
    buf = _buffer.get(device)
    if buf is None:
        buf = _buffer[device] = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    buf.zero_()
    torch.cuda.synchronize(device)
