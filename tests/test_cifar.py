"""The CIFAR networks (fusedres.cifar, fusedres.models.cifar_*), the option-A shortcut and
PlainBlock, against plain-PyTorch definitions written here from the paper (He et al. 2016,
sec. 4.2), in float64: eval outputs, and 3 training steps (outputs, input and parameter
gradients, parameters and running statistics after). The triton backend (interpreted) in
float32 on one block. Tolerances: helpers (1e-10 eval, TRAIN_RTOL training, float64).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, assert_float32_matches_float64, assert_training_matches, randomize_bn
from torch import nn
from torchvision.models import resnet as tv

import fusedres
from fusedres import ext, models
from fusedres.shortcuts import ZeroPadShortcut

BACKENDS = ["torch"] if ext.load_error() else ["torch", "cuda"]

# Parameters of the paper's CIFAR-10 networks (Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M),
# counted: conv1 + bn1 + per stage 2n 3x3 convs and BNs + fc (option A adds none).
PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


def _counted_params(depth: int) -> int:
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16 + 64 * 10 + 10
    inplanes = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += inplanes * width * 9 + width * width * 9 + 4 * width
            inplanes = width
    return total


@pytest.mark.parametrize("kind", ["resnet", "plain"])
@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(kind, depth):
    model = getattr(models, f"cifar_{kind}{depth}")()
    count = sum(p.numel() for p in model.parameters())
    assert count == _counted_params(depth)
    assert abs(count - PAPER_PARAMS[depth]) <= 0.01e6 if depth < 110 else abs(count - 1.7e6) <= 0.05e6
    assert model.depth == depth
    blocks = [m for m in model.modules() if isinstance(m, fusedres.BasicBlock)]
    assert len(blocks) == 3 * (depth - 2) // 6
    assert all(type(b) is (fusedres.PlainBlock if kind == "plain" else fusedres.BasicBlock) for b in blocks)


# ---- plain-PyTorch definitions (the same module names, so state_dicts load) --------------


class _RefBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); option A written as a concat."""

    def __init__(self, inplanes: int, planes: int, stride: int, plain: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.planes, self.plain = stride, planes, plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if not self.plain:
            sub = x[:, :, ::self.stride, ::self.stride]
            zeros = sub.new_zeros(sub.shape[0], self.planes - sub.shape[1], *sub.shape[2:])
            out = out + torch.cat([sub, zeros], dim=1)
        return F.relu(out)


class _RefNet(nn.Module):
    def __init__(self, n: int, plain: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        inplanes = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_RefBlock(inplanes, width, 2 if i and not j else 1, plain))
                inplanes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _pair(plain: bool, backend: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fused = randomize_bn(models.cifar_plain20(backend=backend) if plain else models.cifar_resnet20(backend=backend))
    ref = _RefNet(3, plain)
    ref.load_state_dict(fused.state_dict())  # strict: the same keys (option A has none of its own)
    return ref.double(), fused.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain", [False, True], ids=["resnet20", "plain20"])
def test_cifar20_eval_matches_the_definition(plain, backend):
    ref, fused = _pair(plain, backend)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        assert_close_scaled(fused.eval()(x), ref.eval()(x), 1e-10, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain", [False, True], ids=["resnet20", "plain20"])
def test_cifar20_training_matches_the_definition(plain, backend):
    ref, fused = _pair(plain, backend)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)  # layer3: 4x4 maps, 64 values per channel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_training_matches(ref, fused, x, steps=3)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("stride,inplanes,planes", [(2, 4, 8), (1, 4, 6), (2, 5, 5), (1, 6, 6)])
def test_option_a_block_on_triton_float32(mode, stride, inplanes, planes):
    """Odd spatial sizes (7x9: stride 2 keeps rows and columns 0, 2, ...); K = 9 * planes
    terms per conv, two convs: 4 * sqrt(K) * eps32 of the output's max."""
    torch.manual_seed(0)
    block = randomize_bn(fusedres.BasicBlock(inplanes, planes, stride, backend="triton", shortcut="A"))
    ref = _RefBlock(inplanes, planes, stride, plain=False)
    ref.load_state_dict(block.state_dict())
    ref = ref.double()
    block.train(mode == "train"), ref.train(mode == "train")
    x = torch.randn(2, inplanes, 7, 9)
    assert_float32_matches_float64(block, ref, x, 4 * (9 * planes) ** 0.5 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("backend,mode", [("triton", "eval"), ("triton", "train"), ("torch", "train")])
def test_option_a_makes_no_padded_tensor(backend, mode, monkeypatch):
    """The option-A shortcut is read unpadded (eval: the conv epilogue on triton; train: the
    tail adds the strided view to the first channels): F.pad never runs, forward or backward.
    (The torch backend's eval conv pads: oneDNN's post-op adds a tensor of the output's shape.)"""
    torch.manual_seed(0)
    block = randomize_bn(fusedres.BasicBlock(4, 8, 2, backend=backend, shortcut="A")).train(mode == "train")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def no_pad(*args, **kwargs):
        raise AssertionError("F.pad ran: a padded shortcut was made")

    monkeypatch.setattr(torch.nn.functional, "pad", no_pad)
    out = block(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_option_a_structure_state_dict_and_revert():
    block = fusedres.BasicBlock(16, 32, 2, shortcut="A")
    assert isinstance(block.downsample, ZeroPadShortcut)
    assert not any("downsample" in k for k in block.state_dict())
    assert fusedres.BasicBlock(16, 16, 1, shortcut="A").downsample is None  # same shape: identity
    model = models.cifar_resnet20()
    reverted = fusedres.revert(model)
    blocks = [m for m in reverted.modules() if isinstance(m, tv.BasicBlock)]
    assert blocks and all(type(b) is tv.BasicBlock for b in blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reverted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    plain = fusedres.revert(models.cifar_plain20())
    assert all(type(b) is fusedres.PlainBlock for b in plain.modules() if isinstance(b, tv.BasicBlock))


def test_zero_pad_shortcut_matches_f_pad():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    out = ZeroPadShortcut(3, 7, 2)(x)
    torch.testing.assert_close(out, F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 4)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expects an input \(N, 3, H, W\)"):
        ZeroPadShortcut(3, 7, 2)(torch.randn(2, 4, 5, 6))


@pytest.mark.parametrize("kwargs,match", [
    ({"inplanes": 8, "planes": 4, "stride": 1}, "needs out_channels >= in_channels"),
    ({"inplanes": 4, "planes": 8, "stride": 3}, "supports stride 1 or 2"),
    ({"inplanes": 4, "planes": 8, "stride": 2, "downsample": nn.Identity()}, "pass downsample=None"),
])
def test_option_a_bad_arguments_name_the_block(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        fusedres.BasicBlock(**kwargs, shortcut="A")
    assert "fusedres.BasicBlock(in_channels=" in str(info.value)


def test_unknown_shortcut_is_refused():
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B', got 'C'"):
        fusedres.BasicBlock(4, 4, shortcut="C")


# ---- pre-activation networks --------------------------------------------------------------


@pytest.mark.parametrize("name,depth,paper", [("cifar_preact_resnet110", 110, 1.7e6),
                                              ("cifar_preact_resnet164", 164, 1.7e6)])
def test_preact_parameter_counts_match_the_paper(name, depth, paper):
    model = getattr(models, name)()
    count = sum(p.numel() for p in model.parameters())
    assert model.depth == depth and abs(count - paper) <= 0.05e6, count
    kind = fusedres.PreActBottleneck if depth == 164 else fusedres.PreActBasicBlock
    assert sum(type(m) is kind for m in model.modules()) == 54


def _unfused_twin(model: nn.Module) -> nn.Module:
    """A copy whose pre-activation blocks run their plain-module forward (timm's formula)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, (fusedres.PreActBasicBlock, fusedres.PreActBottleneck)):
            m.forward = m._unfused_forward
    return twin


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
def test_preact_cifar_net_matches_its_modules(bottleneck):
    from fusedres.cifar import CifarPreActResNet

    torch.manual_seed(0)
    model = randomize_bn(CifarPreActResNet(1, bottleneck=bottleneck, backend="torch")).double()
    ref = _unfused_twin(model)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert_close_scaled(model.eval()(x), ref.eval()(x), 1e-10, "eval output")
    assert_training_matches(ref, model, x, steps=3)
