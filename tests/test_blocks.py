"""Single fused blocks against torchvision's: every block shape option, BN option,
dtype, memory format and autocast, in eval and train mode."""

import copy

import pytest
import torch
import torchvision.models.resnet as tv
from helpers import assert_close_scaled, assert_train_parity, randomize_bn
from torch import nn

import fusedres


def make_pair(kind: str, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
              dilation: int = 1, projection: bool | None = None, dtype=torch.float64, **bn_kwargs):
    """A torchvision block and a fused block with identical parameters."""
    tv_cls, fused_cls = (tv.BasicBlock, fusedres.BasicBlock) if kind == "basic" else (tv.Bottleneck,
                                                                                     fusedres.Bottleneck)
    outplanes = planes * tv_cls.expansion
    if projection is None:
        projection = stride != 1 or inplanes != outplanes

    def norm(c):
        return nn.BatchNorm2d(c, **bn_kwargs)

    downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm(outplanes)) \
        if projection else None
    reference = tv_cls(inplanes, planes, stride, downsample, groups, base_width, dilation, norm)
    randomize_bn(reference)
    reference = reference.to(dtype)
    fused = fused_cls(inplanes, planes, stride, copy.deepcopy(downsample), groups, base_width, dilation, norm)
    fused = fused.to(dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


BLOCK_CONFIGS = [
    pytest.param("basic", 8, 8, 1, 1, 64, 1, id="basic-identity"),
    pytest.param("basic", 8, 16, 2, 1, 64, 1, id="basic-stride2-projection"),
    pytest.param("bottleneck", 16, 4, 1, 1, 64, 1, id="bottleneck-identity"),
    pytest.param("bottleneck", 8, 4, 1, 1, 64, 1, id="bottleneck-projection-stride1"),
    pytest.param("bottleneck", 16, 8, 2, 1, 64, 1, id="bottleneck-stride2"),
    pytest.param("bottleneck", 16, 8, 2, 4, 16, 1, id="bottleneck-groups4"),
    pytest.param("bottleneck", 32, 8, 1, 1, 64, 2, id="bottleneck-dilation2"),
]


@pytest.mark.parametrize("kind,inplanes,planes,stride,groups,base_width,dilation", BLOCK_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_block_eval_and_train_float64(kind, inplanes, planes, stride, groups, base_width, dilation, channels_last):
    reference, fused = make_pair(kind, inplanes, planes, stride, groups, base_width, dilation)
    x = torch.randn(2, inplanes, 9, 7, dtype=torch.float64)  # odd sizes on purpose
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference.eval()
    fused.eval()
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    assert_close_scaled(actual, expected, 1e-12, "eval output")
    assert actual.stride() == expected.stride()
    assert_train_parity(reference, fused, x, steps=3, rtol=1e-12, later_rtol=1e-10)
    actual = fused(x)
    assert actual.stride() == reference(x).stride()


BN_OPTIONS = [
    pytest.param({"momentum": None}, id="momentum-none"),
    pytest.param({"momentum": 0.3}, id="momentum-0.3"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
    pytest.param({"affine": False}, id="affine-false"),
    pytest.param({"eps": 1e-3}, id="eps"),
]


@pytest.mark.parametrize("bn_kwargs", BN_OPTIONS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_batchnorm_options(kind, bn_kwargs):
    reference, fused = make_pair(kind, 8, 4, stride=2, projection=True, **bn_kwargs)
    x = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    assert_train_parity(reference, fused, x, steps=4, rtol=1e-12, later_rtol=1e-10)
    # Switching back to eval: running stats (or batch stats without them) as torchvision.
    reference.eval()
    fused.eval()
    with torch.no_grad():
        assert_close_scaled(fused(x), reference(x), 1e-12, "eval after training")


def test_mixed_train_and_eval_batchnorm():
    """Frozen BNs in a training block (detection-style fine-tuning) are honoured per layer."""
    reference, fused = make_pair("bottleneck", 8, 4, stride=2, projection=True)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    for frozen in (["bn1"], ["bn3"], ["downsample.1"], ["bn2", "downsample.1"]):
        for model in (reference, fused):
            model.train()
            for name in frozen:
                model.get_submodule(name).eval()
        assert_train_parity(reference, fused, x, steps=2, rtol=1e-12, later_rtol=1e-10)


def test_eval_mode_gradients_reach_input_and_parameters():
    reference, fused = make_pair("bottleneck", 8, 4, stride=2)
    reference.eval()
    fused.eval()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    grads = []
    for model in (reference, fused):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close_scaled(b, a, 1e-12, "eval-mode gradient")


# Low precision: compare both implementations against the float64 result; ours may be
# off by at most 2x (+ a small floor) what torchvision's own low-precision path is off.
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def _low_precision_check(reference64, fused64, x64, dtype, mode, channels_last):
    reference, fused = copy.deepcopy(reference64).to(dtype), copy.deepcopy(fused64).to(dtype)
    x = x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        reference, fused = (m.to(memory_format=torch.channels_last) for m in (reference, fused))
    for m in (reference64, reference, fused):
        m.train(mode == "train")
    with torch.no_grad():
        exact = reference64(x64)
        expected, actual = reference(x), fused(x)
    assert actual.dtype == expected.dtype == dtype
    assert actual.stride() == expected.stride()
    scale = exact.abs().max().item()
    torch_error = (expected.double() - exact).abs().max().item() / scale
    our_error = (actual.double() - exact).abs().max().item() / scale
    assert our_error <= 2 * torch_error + 4 * torch.finfo(dtype).eps, (our_error, torch_error)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_low_precision(dtype, mode, channels_last):
    reference, fused = make_pair("bottleneck", 16, 8, stride=2)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    _low_precision_check(reference, fused, x, dtype, mode, channels_last)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_autocast_bfloat16_cpu(mode):
    reference, fused = make_pair("bottleneck", 16, 8, stride=2, dtype=torch.float32)
    reference64 = copy.deepcopy(reference).double()
    x = torch.randn(2, 16, 8, 8)
    for m in (reference, fused, reference64):
        m.train(mode == "train")
    with torch.no_grad():
        exact = reference64(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, actual = reference(x), fused(x)
    assert actual.dtype == expected.dtype
    scale = exact.abs().max().item()
    torch_error = (expected.double() - exact).abs().max().item() / scale
    our_error = (actual.double() - exact).abs().max().item() / scale
    assert our_error <= 2 * torch_error + 4 * torch.finfo(torch.bfloat16).eps, (our_error, torch_error)
    if mode == "train":
        for name, buf in fused.named_buffers():
            ref_buf = dict(reference.named_buffers())[name]
            assert_close_scaled(buf.double(), ref_buf.double(), 2e-2, name)


def test_channels_last_weights_with_nchw_input_give_channels_last_output():
    reference, fused = make_pair("bottleneck", 16, 4, dtype=torch.float32)
    reference.eval().to(memory_format=torch.channels_last)
    fused.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert actual.stride() == expected.stride()
    assert_close_scaled(actual, expected, 1e-5, "output")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_nan_and_inf_propagate_like_torchvision(mode):
    reference, fused = make_pair("basic", 4, 4, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    reference.train(mode == "train")
    fused.train(mode == "train")
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_empty_batch(mode):
    reference, fused = make_pair("bottleneck", 8, 4, stride=2, dtype=torch.float32)
    reference.train(mode == "train")
    fused.train(mode == "train")
    x = torch.randn(0, 8, 6, 6)
    expected, actual = reference(x), fused(x)
    assert actual.shape == expected.shape == (0, 16, 3, 3)
    for name, buf in fused.named_buffers():
        assert torch.equal(buf, dict(reference.named_buffers())[name]), name


def test_torchvision_resnet_accepts_fused_blocks_and_checkpoints():
    from torchvision.models import ResNet

    model = ResNet(fusedres.Bottleneck, [1, 1, 1, 1], num_classes=5)
    reference = ResNet(tv.Bottleneck, [1, 1, 1, 1], num_classes=5)
    model.load_state_dict(reference.state_dict())
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert fusedres.Bottleneck.expansion == 4 and fusedres.BasicBlock.expansion == 1


def test_unfusable_block_runs_torchvision_forward_with_one_warning():
    block = fusedres.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c))
    reference = tv.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c))
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 5)
    with pytest.warns(RuntimeWarning, match="GroupNorm") as record:
        out = block(x)
        block(x)
    assert len([w for w in record if "unfused" in str(w.message)]) == 1
    torch.testing.assert_close(out, reference(x))
