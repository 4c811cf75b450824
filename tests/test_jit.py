"""TorchScript: torch.jit.script refuses fused modules with one clear error (before touching
anything); torch.jit.trace works and its graph follows later changes to the parameters, as a
traced torchvision model's does."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import RTOL, assert_close_scaled, convert_no_warning, make_input, randomize_bn_seeded
from torch import nn

import fusedres


def _fused_resnet18() -> nn.Module:
    model = randomize_bn_seeded(torchvision.models.resnet18(num_classes=10).double()).eval()
    return convert_no_warning(model).eval()


@pytest.mark.parametrize("what", ["model", "block", "preact-block", "cifar-model"])
def test_script_raises_one_clear_error_and_changes_nothing(what):
    if what == "model":
        module = _fused_resnet18()
    elif what == "block":
        module = fusedres.Bottleneck(64, 16).double().eval()
    elif what == "preact-block":
        module = fusedres.PreActBottleneck(64, 64).double().eval()
    else:
        module = fusedres.models.cifar_resnet20().double().eval()
    x = make_input(shape=(2, module.conv1.in_channels, 16, 16))
    with torch.no_grad():
        before = module(x)
    children = dict(module.named_modules())
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.jit\.trace.*torch\.export"):
        torch.jit.script(module)
    assert dict(module.named_modules()) == children
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_the_reverted_model_scripts():
    fused = _fused_resnet18()
    scripted = torch.jit.script(fusedres.revert(fused))
    x = make_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert_close_scaled(scripted(x), fused(x), RTOL, "scripted revert")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_trace_follows_parameter_changes(grad):
    fused = _fused_resnet18()
    x = make_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        fused(x)  # folds cached before the trace must not become its constants
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(fused, (x,), check_trace=False)
    with torch.no_grad():
        assert_close_scaled(traced(x), fused(x), RTOL, "traced")
        fused.layer2[0].bn2.running_var.mul_(3.0)  # the traced graph shares the model's tensors
        fused.layer3[1].conv1.weight.mul_(0.5)
        assert_close_scaled(traced(x), fused(x), RTOL, "traced, after the parameters changed")
