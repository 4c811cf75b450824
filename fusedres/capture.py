"""How fused modules meet PyTorch's program capturers (the "works with" table in the README).

* **torch.fx** (`symbolic_trace`, torchvision's `create_feature_extractor`, timm's FX
  features): a fused block traces as one `call_module` node, as a leaf module would, so the
  traced module runs the fused block itself (same numbers, same gradients, in eval and in
  train mode) and the node is named by the block's path (`layer4.2`). A block that is itself
  the root of the trace cannot call itself: it traces into the original block's ops
  (unfused) and says so once.
* **TorchScript scripting** cannot compile fused blocks (their forward chooses kernels at
  run time and calls torch.library ops): `torch.jit.script` raises one error naming the
  routes that work, before it has touched anything.
* **ONNX export**, either exporter: while `torch.onnx.export` runs, the ops run their
  plain-PyTorch definitions (`fusedres.ops.decompositions`), so the exported graph holds
  standard operators only and needs no fusedres at inference time.

Nothing here keeps state: a failed trace or export leaves a model as it was.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

import torch
from torch import nn

_warned_root: set[type] = set()


def onnx_exporting() -> bool:
    """True while `torch.onnx.export` runs (either exporter). Read per op call: cheap, and
    torch.onnx is not imported just to ask (nothing exports before it is imported)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def is_fx_proxy(x: object) -> bool:
    return isinstance(x, torch.fx.Proxy)


def fx_leaf_call(module: nn.Module, x: torch.fx.Proxy, unfused: Callable[[torch.Tensor], torch.Tensor]):
    """What a fused module's forward returns when torch.fx traces it: one `call_module` node
    (what a tracer records for a leaf module), or, where the module is the trace's root,
    `unfused(x)` traced op by op."""
    tracer = x.tracer
    if getattr(tracer, "root", None) is module:
        if type(module) not in _warned_root:
            _warned_root.add(type(module))
            warnings.warn(f"torch.fx is tracing a {type(module).__name__} as its root module: it traces into the "
                          "unfused ops of the original block. Trace a module that contains it (e.g. "
                          "nn.Sequential(block)) to keep it one fused call.", RuntimeWarning, stacklevel=3)
        return unfused(x)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


def refuse_scripting(module: nn.Module) -> NoReturn:
    """Raised from `__prepare_scriptable__`, which torch.jit.script calls on each module before
    it compiles anything."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__} (a fusedres module: its forward chooses kernels at "
        "run time and calls torch.library ops). Use torch.jit.trace(model, example), torch.export.export(model, "
        "(example,)) or torch.compile(model) instead, or script fusedres.revert(model), which gives the original "
        "torchvision/timm modules back.")
