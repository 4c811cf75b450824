"""Rows of the README's "works with" table not covered by their own files: torch.export,
timm's features_only and torchvision's DeepLabV3 (dilated blocks) on converted models.
(FX: test_fx.py; ONNX: test_onnx.py; jit: test_jit.py; FrozenBatchNorm2d and detection:
test_frozen_bn.py; compile: test_compile.py; pickle/deepcopy: test_convert.py; DDP:
test_distributed.py.)

Float64; eval outputs within helpers.RTOL of the original model's, train-mode gradients
within 1e-9 of the largest.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import (  # noqa: F401
    RTOL,
    _single_intra_op_thread,
    assert_close_scaled,
    convert_no_warning,
    make_input,
    randomize_bn_seeded,
)

import fusedres

FUSED = (fusedres.BasicBlock, fusedres.Bottleneck)


def _fused(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = randomize_bn_seeded(model.double())
    return model, convert_no_warning(model)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_export_keeps_the_fused_ops_and_the_numbers(train):
    original, fused = _fused(torchvision.models.resnet18(num_classes=10))
    original.train(train)
    fused.train(train)
    x = make_input(shape=(2, 3, 32, 32))
    program = torch.export.export(fused, (x,))
    assert any("fusedres" in str(n.target) for n in program.graph.nodes)
    exported = program.module()
    if not train:
        with torch.no_grad():
            assert_close_scaled(exported(x), original(x), RTOL, "exported, eval")
        return
    xi = x.clone().requires_grad_()
    out = exported(xi)
    grads = torch.autograd.grad(out.square().mean(), [xi, *exported.parameters()])
    xo = x.clone().requires_grad_()
    expected = torch.autograd.grad(original(xo).square().mean(), [xo, *original.parameters()])
    assert_close_scaled(out.detach(), original(x).detach(), 1e-9, "exported, train")
    largest = max(g.abs().max().item() for g in expected)
    for g, e in zip(grads, expected):
        assert (g - e).abs().max().item() <= 1e-9 * largest


def test_timm_features_only():
    timm = pytest.importorskip("timm")
    original, fused = _fused(timm.create_model("resnet50d", features_only=True))
    assert sum(isinstance(m, FUSED) for m in fused.modules()) == 16
    x = make_input(shape=(2, 3, 64, 64))
    with torch.no_grad():
        expected, got = original.eval()(x), fused.eval()(x)
    assert len(got) == len(expected) == 5
    for e, g in zip(expected, got):
        assert_close_scaled(g, e, RTOL, "feature")


def test_deeplabv3_dilated_blocks_fuse():
    from torchvision.models.segmentation import deeplabv3_resnet50

    original, fused = _fused(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False))
    blocks = [m for m in fused.modules() if isinstance(m, FUSED)]
    assert len(blocks) == 16 and any(b.conv2.dilation != (1, 1) for b in blocks)
    x = make_input(shape=(1, 3, 48, 48))
    with torch.no_grad():
        assert_close_scaled(fused.eval()(x)["out"], original.eval()(x)["out"], RTOL, "deeplabv3")
