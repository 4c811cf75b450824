"""The train-mode chain: fusedres::conv_bn_stats (conv with a BN+ReLU prologue and batch
statistics) and the blocks that use it when every BN runs on batch statistics."""

import copy

import pytest
import torch
from helpers import assert_close_scaled, assert_train_parity, narrow_resnet, randomize_bn
from torchvision.models import resnet as tv_resnet

import fusedres
from fusedres import ops


def _args(prologue=True, relu=True, groups=1, stride=1, padding=1, channels_last=False, dtype=torch.float64,
          requires_grad=True, residual=False):
    x = torch.randn(2, 8, 7, 9, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8 // groups, 3, 3, dtype=dtype) * 0.3
    scale = torch.rand(8, dtype=dtype) + 0.5 if prologue else None
    shift = torch.randn(8, dtype=dtype) * 0.5 if prologue else None
    out_shape = torch.nn.functional.conv2d(x, w, None, stride, padding, 1, groups).shape
    r = torch.randn(out_shape, dtype=dtype) if residual else None
    tensors = [x, w, scale, shift, r]
    for t in tensors:
        if t is not None:
            t.requires_grad_(requires_grad)
    return (*tensors[:4], relu, [stride, stride], [padding, padding], [1, 1], groups, r)


CASES = [
    pytest.param({}, id="prologue-relu"),
    pytest.param({"relu": False}, id="prologue"),
    pytest.param({"prologue": False}, id="no-prologue"),
    pytest.param({"groups": 4, "stride": 2}, id="groups-stride2"),
    pytest.param({"channels_last": True, "padding": 0}, id="channels_last"),
    pytest.param({"residual": True, "stride": 2}, id="residual"),
]


@pytest.mark.parametrize("case", CASES)
def test_conv_bn_stats_opcheck(case):
    torch.library.opcheck(torch.ops.fusedres.conv_bn_stats.default, (*_args(**case), "torch"))
    if case.get("residual"):
        args = _args(**case)
        with pytest.raises(ValueError, match="residual has shape"):
            ops.conv_bn_stats(*args[:9], "torch", args[9][:, :, :1])


@pytest.mark.parametrize("case", CASES)
def test_conv_bn_stats_gradcheck(case):
    args = _args(**case)
    tensors, rest = [t for t in (*args[:4], args[9]) if t is not None], args[4:9]
    prologue, residual = args[2] is not None, args[9] is not None

    def fn(*ts):
        x, w, *ss = ts
        r = ss.pop() if residual else None
        scale, shift = ss if prologue else (None, None)
        y, mean, var = ops.conv_bn_stats(x, w, scale, shift, *rest, "torch", r)
        # Weight the outputs so that every gradient path (y, mean, var) matters.
        return y * torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).reshape(y.shape), mean * 3, var * 2

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_conv_bn_stats_matches_reference_definition():
    x, w, scale, shift, relu, stride, padding, dilation, groups, r = _args(requires_grad=False, residual=True)
    y, mean, var = ops.conv_bn_stats(x, w, scale, shift, relu, stride, padding, dilation, groups, "torch", r)
    a = torch.relu(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
    expected = torch.nn.functional.conv2d(a, w, None, stride, padding, dilation, groups) + r
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, expected.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected.var(dim=(0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)


def _count_chain_calls(monkeypatch):
    calls = []
    original = ops.conv_bn_stats

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, "conv_bn_stats", counting)
    return calls


@pytest.mark.parametrize("downsample", [False, True])
def test_train_mode_bottleneck_runs_as_chain_and_matches_torchvision(monkeypatch, downsample):
    kwargs = {"inplanes": 16, "planes": 4}
    if downsample:
        kwargs = {"inplanes": 8, "planes": 4, "stride": 2,
                  "downsample": torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                                    torch.nn.BatchNorm2d(16))}
    ref = randomize_bn(tv_resnet.Bottleneck(**kwargs).double()).train()
    fused = fusedres.convert(ref, backend="torch")
    calls = _count_chain_calls(monkeypatch)
    x = torch.randn(2, kwargs["inplanes"], 9, 7, dtype=torch.float64)
    assert_train_parity(ref, fused, x, steps=2)
    convs_per_step = 3 + downsample
    assert len(calls) == 2 * convs_per_step  # 2 training steps
    # The second and third convs apply the previous BN + ReLU in their prologue.
    assert [c[2] is not None for c in calls[:3]] == [False, True, True]


def test_mixed_bn_modes_do_not_use_the_chain(monkeypatch):
    block = randomize_bn(fusedres.Bottleneck(16, 4, backend="torch").double()).train()
    block.bn2.eval()
    calls = _count_chain_calls(monkeypatch)
    block(torch.randn(2, 16, 5, 5, dtype=torch.float64))
    assert calls == []


def test_chain_keeps_batchnorm_errors():
    block = fusedres.BasicBlock(4, 4, backend="torch").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1))


def test_chain_under_autocast_matches_reference_semantics():
    """bf16 autocast on the CPU: within 2x of torchvision's own bf16 error against float64."""
    ref64 = randomize_bn(tv_resnet.BasicBlock(8, 8)).double().train()
    ref = tv_resnet.BasicBlock(8, 8).train()
    ref.load_state_dict(ref64.state_dict())
    fused = fusedres.convert(ref, backend="torch")
    x = torch.randn(4, 8, 9, 9)
    expected = ref64(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = tv_resnet.BasicBlock.forward(ref, x).float()
        mine = fused(x).float()
    eager_error = (eager.double() - expected).abs().max().item()
    error = (mine.double() - expected).abs().max().item()
    assert mine.dtype == torch.float32 and error <= 2 * eager_error + 1e-6, (error, eager_error)


def _losses(model, x, labels, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_short_training_run_tracks_eager(backend):
    """8 SGD steps of a small converted ResNet on a fixed synthetic batch: the fused run's
    losses stay within 2x of eager float32's own distance from a float64 run (plus 1e-5
    relative: both are float32 rounding, amplified step by step by the same dynamics)."""
    torch.manual_seed(0)
    base = randomize_bn(narrow_resnet(tv_resnet.BasicBlock)).train()
    x = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    ref64 = _losses(copy.deepcopy(base).double(), x.double(), labels, 8)
    eager = _losses(copy.deepcopy(base), x, labels, 8)
    fused = _losses(fusedres.convert(copy.deepcopy(base), backend=backend), x, labels, 8)
    assert ref64[-1] < ref64[0]  # it learns
    eager_error = (eager - ref64).abs()
    error = (fused - ref64).abs()
    assert torch.all(error <= 2 * eager_error + 1e-5 * ref64.abs()), (fused, eager, ref64)


@pytest.mark.parametrize("downsample", [False, True])
def test_triton_conv_backward_kernels_in_training(monkeypatch, downsample):
    """FUSEDRES_TRITON_CONV_BACKWARD=triton: the train-mode convs' dgrad and wgrad run the
    Triton kernels; one SGD step's gradients match torchvision in float64 (fp32 kernels:
    1e-4 of each tensor's max is ~100x the observed fp32 error, while a wrong index or a
    missing tap is O(1))."""
    from fusedres.backends import triton_backend
    from fusedres.triton import conv_backward as tcb

    monkeypatch.setattr(triton_backend, "CONV_BACKWARD", "triton")
    calls = []
    for name in ("conv_dgrad", "conv_wgrad"):
        real = getattr(tcb, name)
        monkeypatch.setattr(tcb, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    kwargs = {"inplanes": 16, "planes": 4}
    if downsample:
        kwargs = {"inplanes": 8, "planes": 4, "stride": 2,
                  "downsample": torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                                    torch.nn.BatchNorm2d(16))}
    ref = randomize_bn(tv_resnet.Bottleneck(**kwargs)).train()
    fused = fusedres.convert(ref, backend="triton")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, kwargs["inplanes"], 7, 5)
    x64 = x.double().requires_grad_(True)
    x = x.requires_grad_(True)
    fused(x).square().sum().backward()
    ref64(x64).square().sum().backward()
    convs = 3 + downsample
    assert calls.count("conv_wgrad") == convs and calls.count("conv_dgrad") >= convs - 1
    assert_close_scaled(x.grad.double(), x64.grad, 1e-4, "input grad")
    for (name, p), p64 in zip(fused.named_parameters(), ref64.parameters()):
        assert_close_scaled(p.grad.double(), p64.grad, 1e-4, name)


@pytest.mark.gpu
def test_triton_conv_backward_is_measured_per_shape_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    block = randomize_bn(fusedres.Bottleneck(64, 16, backend="triton")).cuda().train()
    x = torch.randn(8, 64, 14, 14, device="cuda", requires_grad=True)
    block(x).sum().backward()
    files = list((tmp_path / "dispatch").glob("conv_backward-*.json"))
    assert files, "the conv backward choice was not measured and cached"
