"""Shared test helpers: randomised BN state and comparisons against torchvision."""

from __future__ import annotations

import copy

import torch
from torch import nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN state so that folding and BN math are really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str = "") -> None:
    """max|actual - expected| <= rtol * max|expected|.

    Reductions (conv, BN statistics, weight gradients) make the absolute error of every
    element scale with the magnitude of the whole tensor, not of that element; an
    elementwise relative check would fail on elements that happen to be near zero.
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{msg}: NaNs differ"
    a, e = actual.double().masked_fill(both_nan, 0), expected.double().masked_fill(both_nan, 0)
    error = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert error <= rtol * scale + 1e-300, f"{msg}: max abs error {error:.3e} > {rtol:.1e} * max|expected| {scale:.3e}"


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.01):
    """`steps` SGD steps on a fixed random projection of the output; returns
    (outputs, input grads, [{name: grad}] per step)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    outputs, input_grads, grads = [], [], []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        proj = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        # A mean keeps the updates small, so 3 steps do not blow the weights up and
        # amplify rounding differences chaotically.
        loss = (out * proj).mean()
        opt.zero_grad()
        loss.backward()
        outputs.append(out.detach())
        input_grads.append(xi.grad.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return outputs, input_grads, grads


def assert_train_parity(reference: nn.Module, fused: nn.Module, x: torch.Tensor, steps: int = 3,
                        rtol: float = 1e-10, later_rtol: float = 1e-6) -> None:
    """Outputs, input grads and parameter grads of every step, and buffers after `steps`
    steps, agree with `reference`.

    The first step is checked at `rtol`. Later steps start from weights that already
    differ by rounding, and training a deep net with small BN batches amplifies that
    ~100x per step: torchvision against itself (NCHW vs channels_last, float64) drifts
    to 3e-8 of the largest gradient after 3 steps on ResNet-50. `later_rtol` allows
    for that drift and still catches semantic errors (wrong momentum or variance
    estimator, a missing gradient term), which show at 1e-3 or worse.
    """
    ref_out, ref_gx, ref_grads = train_steps(reference, x, steps)
    out, gx, grads = train_steps(fused, x, steps)
    for step in range(steps):
        tol = rtol if step == 0 else later_rtol
        assert_close_scaled(out[step], ref_out[step], tol, f"output of step {step}")
        assert_close_scaled(gx[step], ref_gx[step], tol, f"input gradient of step {step}")
        assert ref_grads[step].keys() == grads[step].keys()
        for name, grad in ref_grads[step].items():
            assert_close_scaled(grads[step][name], grad, tol, f"gradient of {name} in step {step}")
    ref_buffers = dict(reference.named_buffers())
    assert ref_buffers.keys() == dict(fused.named_buffers()).keys()
    for name, buf in fused.named_buffers():
        assert_close_scaled(buf, ref_buffers[name], rtol if steps == 1 else later_rtol, f"buffer {name}")


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
