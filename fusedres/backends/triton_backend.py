"""The `triton` backend: fused implicit-GEMM kernels. Not implemented yet.

It is registered so that `auto` knows where Triton kernels will slot in and so that an
explicit `backend="triton"` fails with a clear reason instead of silently running
something else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from fusedres.backends.base import Backend, device_reasons


class TritonBackend(Backend):
    name = "triton"

    def device_types(self) -> tuple[str, ...]:
        return ("cuda",)

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> list[str]:
        reasons = device_reasons(self, tensors)
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed")
        reasons.append(f"no Triton kernel for {op} yet (the triton backend is not implemented)")
        return reasons
