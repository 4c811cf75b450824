"""The interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class UnsupportedInputError(NotImplementedError):
    """An explicitly requested backend cannot run this input (the message says why)."""


class Backend:
    """One way to run the fusedres ops. Subclasses implement the ops they support."""

    name: str = ""

    def device_types(self) -> tuple[str, ...]:
        """Device types this backend targets; `auto` skips it silently elsewhere."""
        raise NotImplementedError

    def targets(self, device_type: str) -> bool:
        types = self.device_types()
        return "*" in types or device_type in types

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        """Why this backend cannot run `op` on `tensors` (the op's tensor arguments in
        order, None for an absent optional one); empty when it can."""
        raise NotImplementedError

    # The op set. Signatures mirror fusedres.reference.
    def conv_bias_act(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend does not implement conv_bias_act")

    def bn_stats(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"the {self.name} backend does not implement bn_stats")

    def scale_bias_act(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend does not implement scale_bias_act")


def device_reasons(backend: Backend, tensors: Sequence[torch.Tensor | None]) -> list[str]:
    """Reasons shared by all backends: the inputs' device types."""
    wanted = backend.device_types()
    devices = sorted({t.device.type for t in tensors if t is not None})
    bad = [d for d in devices if not backend.targets(d)]
    if bad:
        return [f"inputs are on {', '.join(bad)}; the {backend.name} backend runs on {', '.join(wanted)}"]
    return []
