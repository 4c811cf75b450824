"""Non-trivial BatchNorm state for a freshly built model, on the caller's own copy."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm of `model`, in place
    (returned), from a generator seeded with `seed`: running_mean ~ N(0, 0.5^2), running_var
    ~ U(0.5, 2), weight ~ N(1, 0.3^2), bias ~ N(0, 0.3^2) (tests/helpers.py randomize_bn's
    distributions).

    Why: a freshly initialised BN (mean 0, var 1, weight 1, bias 0) is the identity up to
    eps, which makes eval-mode folding trivially right; a real checkpoint is not like that.
    Use it on a model without a checkpoint only: never on the weights you ship.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "var":
            r = torch.rand(t.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        else:
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            r = {"mean": r * 0.5, "weight": 1.0 + 0.3 * r, "bias": 0.3 * r}[kind]
        return r.to(t.dtype)

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            for t, kind in ((module.running_mean, "mean"), (module.running_var, "var"), (module.weight, "weight"),
                            (module.bias, "bias")):
                if t is not None:
                    t.copy_(draw(t, kind).to(t.device))
    return model
