"""The `cuda` backend: ops from the fusedres._C extension. Not implemented yet.

Registered so that `auto` knows its place and an explicit `backend="cuda"` fails with a
clear reason (extension missing, or op not provided by it).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch

from fusedres.backends.base import Backend, device_reasons


@functools.cache
def _extension_built() -> bool:  # cached: `auto` asks on every GPU call
    return importlib.util.find_spec("fusedres._C") is not None


class CudaBackend(Backend):
    name = "cuda"

    def device_types(self) -> tuple[str, ...]:
        return ("cuda",)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        reasons = device_reasons(self, tensors)
        if not _extension_built():
            reasons.append("the fusedres._C extension is not built")
        reasons.append(f"no CUDA kernel for {op} yet (the cuda backend is not implemented)")
        return reasons
