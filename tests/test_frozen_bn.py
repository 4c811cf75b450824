"""FrozenBatchNorm2d (torchvision's, which timm uses too; timm's FrozenBatchNormAct2d): its
scale and shift are constants, so a block runs the inference fusion in train mode too, with
gradients to the conv weights and the input.

Float64 throughout: fused against the original modules at the package's float64 bounds
(helpers.RTOL for eval outputs; 1e-9 of the largest value for gradients, which go through
a few more reductions). Detection models: torchvision's FPN detectors built as their
ImageNet-weights constructors build them (FrozenBatchNorm2d, trainable_backbone_layers=3),
at 64x64 so that they run in seconds.
"""

from __future__ import annotations

import copy
import warnings

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
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

import fusedres

GRAD_RTOL = 1e-9


def randomize_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like buffers in every frozen BN (they start at mean 0, var 1, weight 1, bias 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
                c, dtype = m.weight.numel(), m.weight.dtype
                m.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen, dtype=dtype) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=dtype) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
    return model


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output, [input grad, every trainable parameter's grad]) of one forward + backward."""
    xi = x.clone().requires_grad_()
    out = model(xi)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [xi, *params])
    return out.detach(), list(grads)


def _assert_same_training(original: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    out, grads = _grads(original, x)
    fused_out, fused_grads = _grads(fused, x)
    assert_close_scaled(fused_out, out, RTOL, "train-mode output")
    assert len(grads) == len(fused_grads)
    for i, (g, f) in enumerate(zip(grads, fused_grads)):
        assert_close_scaled(f, g, GRAD_RTOL, "input grad" if i == 0 else f"grad of parameter {i - 1}")


@pytest.mark.parametrize("size", [3, 9])  # 3: every conv applies its BN after it in training; 9: some fold
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "bottleneck-projection", "resnext"])
def test_frozen_blocks_fuse_in_eval_and_train(kind, size):
    from torchvision.models import resnet as tv

    frozen = FrozenBatchNorm2d
    if kind == "basic":
        block = tv.BasicBlock(16, 16, norm_layer=frozen)
    elif kind == "resnext":
        block = tv.Bottleneck(64, 16, groups=4, base_width=16, norm_layer=frozen)
    else:
        stride, inp = (2, 32) if kind == "bottleneck-projection" else (1, 64)
        ds = nn.Sequential(nn.Conv2d(inp, 64, 1, stride, bias=False), frozen(64)) if stride == 2 else None
        block = tv.Bottleneck(inp, 16, stride=stride, downsample=ds, norm_layer=frozen)
    block = randomize_frozen(block.double())
    fused = convert_no_warning(nn.Sequential(block))[0]
    assert isinstance(fused, fusedres.BasicBlock | fusedres.Bottleneck) and not fused.unfusable_reasons()
    x = make_input(shape=(2, block.conv1.in_channels, size, size))
    for train in (False, True):
        block.train(train)
        fused.train(train)
        with torch.no_grad():
            assert_close_scaled(fused(x), block(x), RTOL, f"output, train={train}")
        _assert_same_training(block, fused, x)


@pytest.mark.parametrize("size,folded", [(16, 3), (2, 0)], ids=["large-output", "small-output"])
def test_frozen_block_in_train_mode_folds_where_the_weights_are_smaller(monkeypatch, size, folded):
    """Train mode runs the inference fusion (folded conv_bias_act) where a conv's weights are
    smaller than its output; otherwise conv + one scale_bias_act pass (folding under autograd
    would cost a pass over the weights each way). Never FrozenBatchNorm2d's own forward."""
    from torchvision.models import resnet as tv

    block = randomize_frozen(tv.Bottleneck(64, 16, norm_layer=FrozenBatchNorm2d).double())
    fused = convert_no_warning(nn.Sequential(copy.deepcopy(block)))[0].train()
    x = make_input(shape=(2, 64, size, size)).requires_grad_()
    block.train()(x).sum().backward()
    expected, x.grad = x.grad, None
    calls = {"conv_bias_act": 0, "scale_bias_act": 0}
    for name in calls:
        real = getattr(fusedres.ops, name)
        monkeypatch.setattr(fusedres.blocks.ops, name,
                            lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1)
                            or _real(*a, **k))
    monkeypatch.setattr(FrozenBatchNorm2d, "forward", lambda *_: pytest.fail("FrozenBatchNorm2d.forward ran"))
    fused(x).sum().backward()
    assert calls == {"conv_bias_act": folded, "scale_bias_act": 3 - folded}
    assert_close_scaled(x.grad, expected, GRAD_RTOL, "input grad")


def test_load_state_dict_of_frozen_buffers_refolds():
    model = randomize_frozen(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).double()).eval()
    fused = convert_no_warning(model).eval()
    assert type(fused).__name__ == "FusedResNet"  # the stem is fused too
    x = make_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        first = fused(x)
        other = randomize_frozen(copy.deepcopy(model), seed=7)
        fused.load_state_dict(other.state_dict())
        assert_close_scaled(fused(x), other(x), RTOL, "after load_state_dict")
        assert (fused(x) - first).abs().max() > 1e-3


def test_frozen_resnet_trains_like_torchvision_stem_included():
    model = randomize_frozen(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=10).double())
    fused = convert_no_warning(model)
    _assert_same_training(model.train(), fused.train(), make_input(shape=(2, 3, 32, 32)))


def test_mixed_frozen_and_batch_norm_block_is_fused_and_right():
    from torchvision.models import resnet as tv

    block = tv.Bottleneck(64, 16)
    block.bn2 = FrozenBatchNorm2d(16)
    block = randomize_frozen(randomize_bn_seeded(block.double()))
    fused = convert_no_warning(nn.Sequential(copy.deepcopy(block)))[0]
    assert not fused.unfusable_reasons()
    x = make_input(shape=(4, 64, 8, 8))
    _assert_same_training(block.train(), fused.train(), x)
    for name, buf in block.named_buffers():  # bn1/bn3's running statistics moved as nn.BatchNorm2d's
        assert_close_scaled(dict(fused.named_buffers())[name].double(), buf.double(), RTOL, name)


def test_timm_frozen_models_fuse():
    timm = pytest.importorskip("timm")
    from timm.layers import freeze_batch_norm_2d

    for name in ("resnet50", "resnetv2_50"):
        model = randomize_frozen(freeze_batch_norm_2d(
            randomize_bn_seeded(timm.create_model(name, num_classes=10).double())))
        fused = convert_no_warning(model)
        kinds = (fusedres.Bottleneck, fusedres.PreActBottleneck)
        assert sum(isinstance(m, kinds) for m in fused.modules()) == 16
        x = make_input(shape=(2, 3, 32, 32))
        with torch.no_grad():
            assert_close_scaled(fused.eval()(x), model.eval()(x), RTOL, name)
        _assert_same_training(model.train(), fused.train(), x)


# ---- torchvision's detection models ---------------------------------------------------

def _detector(kind: str) -> nn.Module:
    """As `<kind>_resnet50_fpn(weights=...)` builds it, without the download: FrozenBatchNorm2d,
    trainable_backbone_layers=3; 64x64 images; every box kept so that eval output is rich."""
    torch.manual_seed(0)
    size = {"min_size": 64, "max_size": 64}
    if kind in ("retinanet", "fcos"):
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3,
                                       returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        cls = RetinaNet if kind == "retinanet" else FCOS
        model = cls(backbone, num_classes=91, score_thresh=0.0, **size)
    else:
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
        cls = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "keypointrcnn": KeypointRCNN}[kind]
        model = cls(backbone, num_classes=2 if kind == "keypointrcnn" else 91, box_score_thresh=0.0, **size)
    return randomize_frozen(model.double())


def _targets(kind: str) -> list[dict]:
    target = {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0]], dtype=torch.float64), "labels": torch.tensor([1])}
    if kind == "maskrcnn":
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        target["masks"][0, 6:50, 5:40] = 1
    if kind == "keypointrcnn":  # torchvision insists on float32 keypoints
        target["keypoints"] = torch.tensor([[[10.0 + i, 12.0, 1.0] for i in range(17)]])
    return [target, copy.deepcopy(target)]


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos"])
def test_detection_models_fuse_every_block_and_detect_the_same(kind):
    model = _detector(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fusedres.convert(model)
    blocks = [n for n, m in fused.named_modules() if isinstance(m, fusedres.Bottleneck)]
    assert len(blocks) == 16 and all(n.startswith("backbone.body.layer") for n in blocks)
    images = [make_input(seed=s, shape=(3, 64, 64)).abs().clamp(max=1) for s in (1, 2)]

    with torch.no_grad():
        expected, got = model.eval()(images), fused.eval()(images)
    assert sum(len(e["boxes"]) for e in expected) > 0
    for e, g in zip(expected, got):
        assert list(e) == list(g)
        assert torch.equal(e["labels"], g["labels"])
        for key in e:
            if e[key].is_floating_point():
                assert_close_scaled(g[key], e[key], 1e-9, key)

    model.train()
    fused.train()
    losses = []
    for m in (model, fused):
        torch.manual_seed(3)  # the proposal samplers draw at random
        loss = m(images, _targets(kind))
        total = sum(loss.values())
        params = [p for p in m.parameters() if p.requires_grad]
        losses.append((loss, torch.autograd.grad(total, params)))
    (loss, grads), (fused_loss, fused_grads) = losses
    assert list(loss) == list(fused_loss)
    for key in loss:
        assert_close_scaled(fused_loss[key].detach(), loss[key].detach(), 1e-9, key)
    # Relative to the largest gradient of all: some are exactly 0 mathematically (a softmax
    # head's bias), so their own scale is rounding noise.
    largest = max(g.abs().max().item() for g in grads)
    for i, (g, f) in enumerate(zip(grads, fused_grads)):
        assert (f - g).abs().max().item() <= GRAD_RTOL * largest, f"gradient {i}"
