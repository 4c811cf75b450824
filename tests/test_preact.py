"""Fused pre-activation blocks (fusedres.preact) against timm's ResNetV2 blocks.

float64 on the CPU with randomised BatchNorm: eval outputs (helpers.RTOL), and 3 SGD steps
of training (outputs, input and parameter gradients, parameters, running statistics;
helpers.TRAIN_RTOL). Narrow ResNetV2s (widths 8..64, one block per stage) run in seconds;
the real resnetv2_18/50/50d are checked in eval. The triton backend (interpreted) runs one
block in float32.
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from helpers import (
    RTOL,
    _single_intra_op_thread,  # noqa: F401  (autouse fixture: imported, it applies to this module)
    assert_close_scaled,
    assert_float32_matches_float64,
    assert_training_matches,
    freeze_all_bn,
    randomize_bn_seeded,
)
from torch import nn

import fusedres
from fusedres import ext, preact

timm = pytest.importorskip("timm")
resnetv2 = pytest.importorskip("timm.models.resnetv2")
from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402

BACKENDS = ["torch"] if ext.load_error() else ["torch", "cuda"]
KINDS = {"basic": {"basic": True, "bottle_ratio": 1.0}, "bottleneck": {}, "bottleneck_d": {"avg_down": True}}
FUSED = {"PreActBasic": fusedres.PreActBasicBlock, "PreActBottleneck": fusedres.PreActBottleneck}


def _narrow(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = resnetv2.ResNetV2(layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_chs=8, num_classes=10,
                              conv_layer=create_conv2d, norm_layer=BatchNormAct2d, **KINDS[kind]).double()
    return randomize_bn_seeded(model, seed, draw_dtype=torch.get_default_dtype()).eval()


def _convert(model: nn.Module, backend: str = "torch") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fusedres.convert(model, backend=backend)
    blocks = [m for m in model.modules() if type(m).__name__ in FUSED]
    fused_blocks = [m for m in fused.modules() if isinstance(m, preact.PreActBlockMixin)]
    assert blocks and len(fused_blocks) == len(blocks)
    assert [type(m) for m in fused_blocks] == [FUSED[type(b).__name__] for b in blocks]
    return fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_matches_timm(kind, backend):
    model = _narrow(kind)
    fused = _convert(model, backend)
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_close_scaled(fused(x), model(x), RTOL, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_matches_timm(kind, backend):
    model = _narrow(kind)
    fused = _convert(model, backend)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_training_matches(model, fused, x, steps=3)


def test_training_takes_the_statistics_chain():
    """Plain training runs each conv as conv_bn_stats (the previous norm in its prologue):
    basic blocks 2 convs each, plus a projection where a stage starts; no scale_bias_act
    pass writes a pre-activation."""
    fused = _convert(_narrow("basic"))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with mock.patch.object(preact.ops, "conv_bn_stats", wraps=preact.ops.conv_bn_stats) as stats, \
            mock.patch.object(preact.ops, "scale_bias_act", wraps=preact.ops.scale_bias_act) as sba:
        fused.train()(x)
    projections = sum(m.downsample is not None for m in fused.modules() if isinstance(m, preact.PreActBlockMixin))
    assert stats.call_count == 4 * 2 + projections and sba.call_count == 0


def test_norm1_statistics_come_from_the_previous_block():
    """Only the first block reads its input for norm1's statistics (bn_stats); every later
    block takes those its predecessor's last conv computed with the shortcut added
    (fusedres.handoff). The parity tests above run this path against timm."""
    fused = _convert(_narrow("bottleneck"))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with mock.patch.object(preact.ops, "bn_stats", wraps=preact.ops.bn_stats) as bn_stats:
        fused.train()(x)
    assert bn_stats.call_count == 1


def test_a_changed_block_output_gets_fresh_statistics():
    """An in-place change of a block's output between two blocks (its version moves), or another
    tensor, makes the next block compute norm1's statistics itself: the result and gradients
    match running the same two blocks with nothing handed on."""
    torch.manual_seed(0)
    first, second = (fusedres.PreActBasicBlock(8, 8, backend="torch").double().train() for _ in range(2))
    randomize_bn_seeded(first, 1), randomize_bn_seeded(second, 2)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)

    def run(change):
        out = first(x)
        if change:
            out = out.mul_(1.5) if change == "in-place" else out * 1.5
        return second(out)

    for change in (None, "in-place", "new tensor"):
        with mock.patch.object(preact.ops, "bn_stats", wraps=preact.ops.bn_stats) as bn_stats:
            got = run(change)
        # The first block's pass over x; the second's own only after a change.
        assert bn_stats.call_count == (1 if change is None else 2), change
        (gx,) = torch.autograd.grad(got.sum(), x)
        with mock.patch.object(preact.handoff, "recall", return_value=None):
            want = run(change)
        (wx,) = torch.autograd.grad(want.sum(), x)
        assert_close_scaled(got, want, 1e-12, str(change))
        assert_close_scaled(gx, wx, 1e-12, str(change))


def test_frozen_norms_train_like_timm():
    """Norms in eval mode inside a training model: the general path (folded convs), gradients too."""
    model = _narrow("bottleneck")
    fused = _convert(model)
    for m in (model, fused):
        m.train()
        freeze_all_bn(m)
    assert_training_matches(model, fused, torch.randn(2, 3, 64, 64, dtype=torch.float64), steps=2, train=False)


@pytest.mark.parametrize("name,blocks", [("resnetv2_18", 8), ("resnetv2_50", 16), ("resnetv2_50d", 16)])
def test_timm_resnetv2_models_convert_and_revert(name, blocks):
    torch.manual_seed(0)
    model = randomize_bn_seeded(timm.create_model(name, pretrained=False, num_classes=10), 0).eval()
    fused = _convert(model)
    assert sum(isinstance(m, preact.PreActBlockMixin) for m in fused.modules()) == blocks
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # float32: 50 layers deep, reductions of up to 4608 terms: 1e-4 of the output's max
        assert_close_scaled(fused(x), model(x), 1e-4, "eval output")
    reverted = fusedres.revert(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
    assert list(reverted.state_dict()) == list(model.state_dict())


def test_group_norm_blocks_stay_timm_with_one_warning():
    """BiT's blocks (GroupNormAct, StdConv2d) are not BN-ReLU: convert leaves them, saying why."""
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    with pytest.warns(RuntimeWarning, match="left 16 block\\(s\\) unfused.*GroupNormAct") as record:
        fused = fusedres.convert(model)
    assert len(record) == 1
    assert not any(isinstance(m, preact.PreActBlockMixin) for m in fused.modules())


@pytest.mark.parametrize("cls,timm_cls", [(fusedres.PreActBasicBlock, "PreActBasic"),
                                          (fusedres.PreActBottleneck, "PreActBottleneck")])
@pytest.mark.parametrize("stride,in_chs,out_chs", [(1, 16, 16), (2, 16, 32)])
def test_constructors_mirror_timm(cls, timm_cls, stride, in_chs, out_chs):
    """Same keys and shapes as timm's block built with plain convs and BatchNormAct2d (a
    projection where the shape changes); same outputs after loading its state_dict."""
    proj = resnetv2.DownsampleConv if (stride != 1 or in_chs != out_chs) else None
    torch.manual_seed(0)
    theirs = getattr(resnetv2, timm_cls)(in_chs, out_chs, stride=stride, conv_layer=create_conv2d,
                                         norm_layer=BatchNormAct2d, proj_layer=proj).double()
    ours = cls(in_chs, out_chs, stride=stride, backend="torch").double()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    randomize_bn_seeded(theirs, 1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, in_chs, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert_close_scaled(ours.eval()(x), theirs.eval()(x), RTOL, "eval")
    assert_training_matches(theirs, ours, x, steps=2)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("in_chs,stride", [(8, 2), (16, 1)], ids=["projection", "identity"])
def test_triton_float32_block(mode, in_chs, stride):
    """Interpreted Triton, float32, against timm's block in float64 (identity in eval: norm1
    in conv1's prologue, inside the kernel). Tolerance: three convs of up to 9 * 8 = 72 terms
    and BN statistics over at least 2 * 5 * 5 = 50 values: 4 * 3 * sqrt(72) * eps32."""
    torch.manual_seed(0)
    proj = resnetv2.DownsampleConv if stride != 1 or in_chs != 16 else None
    theirs = resnetv2.PreActBottleneck(in_chs, 16, stride=stride, conv_layer=create_conv2d,
                                       norm_layer=BatchNormAct2d, proj_layer=proj)
    randomize_bn_seeded(theirs, 1)
    ours = fusedres.PreActBottleneck(in_chs, 16, stride=stride, backend="triton")
    ours.load_state_dict(theirs.state_dict())
    theirs = theirs.double()
    ours.train(mode == "train"), theirs.train(mode == "train")
    x = torch.randn(2, in_chs, 10, 10)
    assert_float32_matches_float64(ours, theirs, x, 4 * 3 * 72 ** 0.5 * torch.finfo(torch.float32).eps)


def test_bad_input_names_the_block():
    block = fusedres.PreActBasicBlock(8, 8)
    with pytest.raises(ValueError, match=r"fusedres.PreActBasicBlock\(in_channels=8.*expects 8 input channels"):
        block(torch.randn(2, 4, 8, 8))


def test_revert_of_own_blocks_keeps_them():
    block = fusedres.PreActBottleneck(8, 32)
    assert type(fusedres.revert(nn.Sequential(block))[0]) is fusedres.PreActBottleneck
    assert copy.deepcopy(block)._fold_cache is not block._fold_cache
