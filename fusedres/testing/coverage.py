"""Fusion coverage and the backend that ran each block, for a parity check.

Coverage comes from what `fusedres.convert` itself says: the fused blocks it made (each
one's `describe()`, and its `unfusable_reasons()` where it would run its unfused forward
after all) and the blocks its one RuntimeWarning names as left unfused, with their reasons.

Backends are observed, not predicted: during each forward of the fused model a
TorchDispatchMode sees every registered `fusedres::*` op with the backend name
`fusedres.ops` chose for it (the op's `backend` argument), and the CPU plan's oneDNN calls
(`mkldnn::_convolution_pointwise`, which `fusedres.cpu_plan` makes directly). Ops nested
inside those are not seen (a mode is off inside its own handler), so the torch backend's
own oneDNN call counts as "torch". Each fused block's `forward` and `forward_with_bound`
are wrapped on the check's private copy to say whose ops they are (instance attributes:
no hooks, so the stem still hands its NaN/Inf bound from block to block as in production).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv_resnet

import fusedres
from fusedres import stem
from fusedres.blocks import FusedBlockMixin
from fusedres.preact import PreActBlockMixin
from fusedres.testing.report import NO_FUSED_OP, BlockInfo

FUSED_TYPES = (FusedBlockMixin, PreActBlockMixin)
STEM = "<stem>"
CPU_PLAN = "cpu_plan"  # fusedres.cpu_plan: prepacked oneDNN convolutions (the torch backend's CPU eval path)
_CPU_PLAN_OPS = ("mkldnn::_convolution_pointwise",)
_KERNEL_OP_BACKENDS = (("fusedres::ext_", "cuda"), ("fusedres::triton_", "triton"))  # whose kernels they are
_CONVERT_WARNING = re.compile(r"^fusedres\.convert left \d+ block\(s\) unfused: (?P<items>.*)$", re.S)


def convert_with_coverage(model: nn.Module, backend: str) -> tuple[nn.Module, list[BlockInfo], list[str]]:
    """(fusedres.convert(model) — a copy, every block and stem it fused or left alone, the
    other RuntimeWarnings convert gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fusedres.convert(model, backend=backend)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    unfused, other = _unfused_from_warnings(messages)
    order = {name: i for i, (name, _) in enumerate(fused.named_modules())}
    blocks = [*_stems(fused), *_fused_blocks(fused), *unfused]
    blocks.sort(key=lambda b: (b.kind != "stem", order.get(b.name, len(order))))
    return fused, blocks, other


def _fused_blocks(model: nn.Module) -> list[BlockInfo]:
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, FUSED_TYPES):
            reasons = module.unfusable_reasons()
            blocks.append(BlockInfo(name or "<root>", module.describe(), fused=not reasons,
                                    reasons=[f"runs its unfused forward: {r}" for r in reasons]))
    return blocks


def _unfused_from_warnings(messages: list[str]) -> tuple[list[BlockInfo], list[str]]:
    """The blocks convert's warning names ("name: reason; reason | name: ..."), and the other messages."""
    blocks, other = [], []
    for message in messages:
        match = _CONVERT_WARNING.match(message)
        if match is None:
            other.append(message)
            continue
        for item in match["items"].split(" | "):
            name, _, reasons = item.partition(": ")
            blocks.append(BlockInfo(name, "left as it is by fusedres.convert", fused=False,
                                    reasons=[r for r in reasons.split("; ") if r]))
    return blocks, other


def _is_resnet(module: nn.Module) -> bool:
    cls = type(module)
    return isinstance(module, tv_resnet.ResNet) or (cls.__module__ == "timm.models.resnet" and cls.__name__ == "ResNet")


def _stems(model: nn.Module) -> list[BlockInfo]:
    """The stem of each torchvision / timm ResNet in `model`: fused by convert, or why not."""
    stems = []
    for name, module in model.named_modules():
        if stem.BACKEND_ATTR in module.__dict__:
            stems.append(BlockInfo(_stem_name(name), "conv1 + bn1 + ReLU", fused=True, kind="stem"))
        elif _is_resnet(module):
            stems.append(BlockInfo(_stem_name(name), "conv1 + bn1 + ReLU", fused=False, kind="stem",
                                   reasons=["not a plain nn.Conv2d + BatchNorm2d + nn.ReLU stem (e.g. timm's "
                                            "deep stem), left as it is"]))
    return stems


def _stem_name(model_name: str) -> str:
    return f"{model_name}.{STEM}" if model_name else STEM


def op_label(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The backend a dispatched op stands for: a fusedres op's `backend` argument, CPU_PLAN
    for the plan's oneDNN call, None for anything else."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    if schema.name.startswith("fusedres::"):
        for i, argument in enumerate(schema.arguments):
            if argument.name == "backend":
                return str(kwargs.get("backend", args[i] if i < len(args) else "?"))
        # A kernel op a backend calls directly (the extension's ext_bn_finalize, ...).
        for prefix, backend in _KERNEL_OP_BACKENDS:
            if schema.name.startswith(prefix):
                return backend
        return schema.name
    if schema.name in _CPU_PLAN_OPS:
        return CPU_PLAN
    return None


class BackendRecorder(TorchDispatchMode):
    """While entered, records which backends ran the fused ops of each block of `model` (a
    private copy: its blocks' forwards are wrapped in place). Ops outside any block count
    for the stem when the model has a fused one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.names: list[str] = []
        self.root = None
        for name, module in model.named_modules():
            if stem.BACKEND_ATTR in module.__dict__ and self.root is None:
                self.root = _stem_name(name)
                self.names.append(self.root)
            if isinstance(module, FUSED_TYPES):
                block = name or "<root>"
                self.names.append(block)
                module.forward = self._wrap(block, module.forward)
                if hasattr(module, "forward_with_bound"):
                    module.forward_with_bound = self._wrap(block, module.forward_with_bound)

    def _wrap(self, name: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            self.stack.append(name)
            try:
                return method(*args, **kwargs)
            finally:
                self.stack.pop()

        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.stack[-1] if self.stack else self.root
        if owner is not None:
            label = op_label(func, args, kwargs)
            if label is not None:
                self.seen[owner].add(label)
        return func(*args, **kwargs)

    def labels(self) -> dict[str, str]:
        """{block name: "torch" / "cpu_plan" / "triton+torch" / NO_FUSED_OP}."""
        return {name: "+".join(sorted(self.seen[name])) or NO_FUSED_OP for name in self.names}


def force_unfused(model: nn.Module) -> list[str]:
    """Make every fused block of `model` (one that `fusedres.revert` leaves fused: a
    PlainBlock, a pre-activation block not made from timm's) run its own unfused forward, so
    the reference never runs a fused op; returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, FUSED_TYPES):
            module.forward = module._unfused_forward
            if hasattr(module, "forward_with_bound"):
                module.forward_with_bound = _unbounded(module)
            names.append(name or "<root>")
    return names


def _unbounded(module: nn.Module) -> Callable:
    def forward_with_bound(x, bound):
        return module(x), None

    return forward_with_bound
