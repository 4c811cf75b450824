"""The CPU inference path (fusedres.cpu_plan, fusedres.finite_guard, fusedres.stem):
prepacked oneDNN convolutions, NaN/Inf semantics from bounds, the fused stem."""

import copy
import io
import math
import warnings

import pytest
import torch
import torchvision
import torchvision.models.resnet as tv
from helpers import assert_close_scaled, randomize_bn
from test_blocks import make_pair

import fusedres
from fusedres import cpu_plan, finite_guard, stem

pytestmark = pytest.mark.skipif(not cpu_plan.DTYPES, reason="this torch has no oneDNN pointwise convolution")

PLAN_DTYPES = sorted(cpu_plan.DTYPES, key=str)
CASES = [
    pytest.param("basic", 8, 8, 1, id="basic-identity"),
    pytest.param("basic", 8, 16, 2, id="basic-projection"),
    pytest.param("bottleneck", 16, 4, 1, id="bottleneck-identity"),
    pytest.param("bottleneck", 16, 8, 2, id="bottleneck-projection"),
]


class CallCounter:
    """Counts the calls of one function a test swaps in through monkeypatch."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _plan_calls(monkeypatch) -> CallCounter:
    counter = CallCounter(cpu_plan.BlockPlan.run)
    monkeypatch.setattr(cpu_plan.BlockPlan, "run", lambda self, *a: counter(self, *a))
    return counter


@pytest.mark.parametrize("kind,inplanes,planes,stride", CASES)
@pytest.mark.parametrize("dtype", PLAN_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
def test_plan_matches_torchvision(kind, inplanes, planes, stride, dtype, channels_last, batch, monkeypatch):
    """Within 2x PyTorch's own error against float64, in the layout PyTorch returns."""
    reference, fused = make_pair(kind, inplanes, planes, stride, dtype=torch.float64)
    exact_model = copy.deepcopy(reference).eval()
    reference, fused = reference.to(dtype).eval(), fused.to(dtype).eval()
    x = torch.randn(batch, inplanes, 9, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _plan_calls(monkeypatch)
    with torch.no_grad():
        exact = exact_model(x)
        expected, actual = reference(x.to(dtype)), fused(x.to(dtype))
    assert calls.calls == 1 and fused._fold_cache.plan is not None
    assert actual.dtype == dtype and actual.stride() == expected.stride()
    scale = exact.abs().max().item()
    torch_error = (expected.double() - exact).abs().max().item() / scale
    our_error = (actual.double() - exact).abs().max().item() / scale
    assert our_error <= 2 * torch_error + 4 * torch.finfo(dtype).eps, (our_error, torch_error)


@pytest.mark.parametrize("kind,inplanes,planes,stride", CASES)
def test_nchw_float32_with_large_activations_runs_nchw(kind, inplanes, planes, stride, monkeypatch):
    """Input elements > 4x weight elements: NCHW oneDNN calls with the plain weights, no layout copies."""
    reference, fused = make_pair(kind, inplanes, planes, stride, dtype=torch.float32)
    reference.eval()
    fused.eval()
    x = torch.randn(3, inplanes, 40, 36)
    modes = []
    original = cpu_plan.PackedConv.__call__
    monkeypatch.setattr(cpu_plan.PackedConv, "__call__",
                        lambda self, *a, dense=False, **k: modes.append(dense) or original(self, *a, dense=dense, **k))
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    assert modes and all(modes)
    assert actual.is_contiguous() and actual.stride() == expected.stride()
    assert_close_scaled(actual, expected, 1e-5, "output")


def test_plan_is_not_used_with_autograd_or_an_explicit_other_backend(monkeypatch):
    _, fused = make_pair("basic", 8, 8, dtype=torch.float32)
    fused.eval()
    calls = _plan_calls(monkeypatch)
    x = torch.randn(2, 8, 5, 5)
    fused(x)  # autograd on: the op path, differentiable
    with torch.no_grad():
        fused.train()
        fused(x)  # batch statistics
    assert calls.calls == 0


@pytest.mark.parametrize("where", ["input_nan", "input_inf", "weight_nan", "running_var_inf", "overflow"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_nan_and_inf_propagate_like_torchvision(where, kind, context):
    reference, fused = make_pair(kind, 16, 4 if kind == "bottleneck" else 16, dtype=torch.float32)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        if where == "input_nan":
            x[0, 1, 2, 2] = float("nan")
        elif where == "input_inf":
            x[1, 0, 0, 0] = float("inf")
        elif where == "overflow":  # finite everywhere, but conv1's sums overflow to +-inf
            x.abs_().mul_(3e38 / x.abs().max())
        for model in (reference, fused):
            if where == "weight_nan":
                model.conv2.weight[0, 0, 0, 0] = float("nan")
            elif where == "running_var_inf":
                model.bn1.running_var[1] = float("inf")
            elif where == "overflow":
                model.conv1.weight.abs_()
    reference.eval()
    fused.eval()
    with torch.no_grad() if context == "no_grad" else torch.inference_mode():
        expected, actual = reference(x), fused(x)
        if where == "overflow":
            # Folding BN moves where a sum overflows, so the reference is the same folded
            # model on fusedres's reference path (oneDNN off), not torchvision.
            with torch.backends.mkldnn.flags(enabled=False):
                expected = fused(x)
    if where != "running_var_inf":  # 1/sqrt(inf) is 0: that channel is just zero
        assert torch.isnan(expected).any() or torch.isinf(expected).any()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert_close_scaled(actual[finite], expected[finite], 1e-5, "finite values")


def test_remembered_bound_skips_the_next_blocks_pass_until_it_is_written(monkeypatch):
    blocks = [make_pair("basic", 8, 8, dtype=torch.float32)[1].eval() for _ in range(2)]
    measured = CallCounter(finite_guard.max_abs)
    monkeypatch.setattr(finite_guard, "max_abs", measured)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = blocks[0](x)
        blocks[1](y)
        assert measured.calls == 1  # block 1 knew the bound of block 0's output
        y[0, 0, 0, 0] = float("nan")  # a write after the bound was recorded
        out = blocks[1](y)
        assert measured.calls == 2 and torch.isnan(out).any()
    with torch.inference_mode():  # no version counters: every block input is read
        blocks[1](blocks[0](x))
        assert measured.calls == 4


def test_check_finite_off_skips_the_guard(monkeypatch):
    _, fused = make_pair("basic", 8, 8, dtype=torch.float32)
    fused.eval()
    monkeypatch.setenv(finite_guard.CHECK_ENV, "0")
    monkeypatch.setattr(finite_guard, "max_abs", lambda x: pytest.fail("the guard ran"))
    with torch.no_grad():
        fused(torch.randn(2, 8, 5, 5))
    assert fused._fold_cache.plan is not None


def test_a_refused_shape_is_logged_once_and_takes_the_general_path(monkeypatch, caplog):
    reference, fused = make_pair("bottleneck", 16, 8, 2, dtype=torch.float32)
    reference.eval()
    fused.eval()
    calls = CallCounter(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("could not create a memory")))
    monkeypatch.setattr(cpu_plan.PackedConv, "__call__", lambda self, *a, **k: calls(*a, **k))
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad(), caplog.at_level("INFO", logger="fusedres"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the general path's oneDNN call works: nothing to warn about
        first, second = fused(x), fused(x)
        expected = reference(x)
    messages = [r.getMessage() for r in caplog.records if "prepacked" in r.getMessage()]
    assert len(messages) == 1 and "(2, 16, 6, 6)" in messages[0]
    assert calls.calls == 1  # not retried
    for actual in (first, second):
        assert_close_scaled(actual, expected, 1e-5, "output")


def test_inference_tensor_parameters_warn_and_stay_correct():
    reference, _ = make_pair("basic", 8, 8, dtype=torch.float32)
    reference.eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        fused = fusedres.convert(reference)  # its parameters are inference tensors
        with pytest.warns(RuntimeWarning, match="inference tensors"):
            actual = fused(x)
        assert_close_scaled(actual, reference(x), 1e-5, "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_max_abs_bounds_and_flags_non_finite(dtype, layout):
    x = torch.randn(2, 5, 4, 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, ::2]
    true_max = x.abs().max().item()
    assert true_max <= finite_guard.max_abs(x) < math.inf
    assert finite_guard.max_abs(x[:0]) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 0, 1, 1] = bad
        assert finite_guard.max_abs(y) == math.inf


def test_weight_terms_of_non_finite_weights_never_allow_the_fused_path():
    w = torch.randn(4, 3, 3, 3)
    packed = cpu_plan.PackedConv(w, torch.randn(4), [1, 1], [1, 1], [1, 1], 1)
    assert packed.bound(2.0) == pytest.approx(2.0 * w.abs().sum(dim=(1, 2, 3)).max().item()
                                              + packed.bias_max, rel=1e-6)
    w[0, 0, 0, 0] = float("nan")
    assert cpu_plan.PackedConv(w, None, [1, 1], [1, 1], [1, 1], 1).bound(0.0) == math.inf
    zero = cpu_plan.PackedConv(torch.zeros(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], 1)
    assert zero.bound(math.inf) == math.inf  # inf * 0 is NaN in the conv: not finite


# The fused stem -----------------------------------------------------------------------


def _resnet18():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=7)).eval()


def test_convert_fuses_the_stem_and_revert_restores_it():
    model = _resnet18()
    fused = fusedres.convert(model)
    assert type(fused) is stem.FusedResNet and isinstance(fused, tv.ResNet)
    assert fused.state_dict().keys() == model.state_dict().keys()
    back = fusedres.revert(fused)
    assert type(back) is tv.ResNet
    assert stem.CACHE_ATTR not in back.__dict__ and stem.BACKEND_ATTR not in back.__dict__
    assert type(fusedres.models.resnet18()) is stem.FusedResNet


@pytest.mark.parametrize("dtype", PLAN_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_resnet_matches_torchvision(dtype, channels_last, monkeypatch):
    model = _resnet18()
    exact_model = copy.deepcopy(model).double()
    fused = fusedres.convert(model).to(dtype)
    reference = copy.deepcopy(model).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fused, reference = fused.to(memory_format=torch.channels_last), reference.to(memory_format=torch.channels_last)
    stem_calls = CallCounter(stem._planned)
    monkeypatch.setattr(stem, "_planned", stem_calls)
    with torch.no_grad():
        exact, expected, actual = exact_model(x), reference(x.to(dtype)), fused(x.to(dtype))
    assert stem_calls.calls == 1
    scale = exact.abs().max().item()
    torch_error = (expected.double() - exact).abs().max().item() / scale
    our_error = (actual.double() - exact).abs().max().item() / scale
    assert our_error <= 2 * torch_error + 4 * torch.finfo(dtype).eps, (our_error, torch_error)


def test_fused_resnet_trains_and_pickles_like_torchvision():
    model = _resnet18()
    fused = fusedres.convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model, fused = model.double().train(), fused.double().train()
    model(x).sum().backward()
    fused(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert_close_scaled(q.grad, p.grad, 1e-9, name)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is stem.FusedResNet
    loaded.eval()
    model.eval()
    with torch.no_grad():
        assert_close_scaled(loaded(x), model(x), 1e-10, "logits")


def test_fused_resnet_chains_bounds_under_inference_mode_unless_hooked(monkeypatch):
    model = _resnet18()
    fused = fusedres.convert(model)
    measured = CallCounter(finite_guard.max_abs)
    monkeypatch.setattr(finite_guard, "max_abs", measured)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = fused(x)
        chained = measured.calls
        assert 1 <= chained <= 3  # the image, and again only where a chained bound grew too loose
        assert_close_scaled(out, model(x), 1e-5, "logits")

        def poison(module, args, output):
            output[0, 0, 0, 0] = float("nan")

        handle = fused.layer2[0].register_forward_hook(poison)
        poisoned = fused(x)
        handle.remove()
    assert measured.calls > 2 * chained  # layer2 ran block by block through module calls
    assert torch.isnan(poisoned[0]).all() and not torch.isnan(poisoned[1]).any()


def test_stem_nan_propagates_like_torchvision():
    model = _resnet18()
    fused = fusedres.convert(model)
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 3, 3] = float("nan")
    with torch.no_grad():
        assert torch.equal(torch.isnan(fused(x)), torch.isnan(model(x)))


def test_timm_stem():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("resnet18", num_classes=5)).eval()
    fused = fusedres.convert(model)
    assert type(fused).__name__ == "FusedTimmResNet"
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_scaled(fused(x), model(x), 1e-5, "logits")
    assert type(fusedres.revert(fused)) is type(model)
    deep = fusedres.convert(timm.create_model("resnet18d", num_classes=5))
    assert type(deep).__name__ == "ResNet"  # a deep stem stays as it is


# The op path's guard (fusedres.backends.torch_backend) -----------------------------------


def _op(x, weight):
    return fusedres.ops.conv_bias_act(x, weight, torch.randn(weight.shape[0]), None, None, None, [1, 1], [1, 1],
                                      [1, 1], 1, [1, 1], True, "torch")


def test_op_checks_a_weight_once_per_version(monkeypatch):
    from fusedres.backends import torch_backend

    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    summed = CallCounter(torch_backend._all_finite)
    monkeypatch.setattr(torch_backend, "_all_finite", summed)
    with torch.no_grad():
        _op(x, weight)
        _op(x, weight)
        assert summed.calls == 3  # the weight once, the activations (and bias) per call
        weight[0, 0, 1, 1] = float("nan")  # a new version: checked again
        out = _op(x, weight)
    assert torch.isnan(out[:, 0]).all() and not torch.isnan(out[:, 1:]).any()


def test_op_check_finite_off(monkeypatch):
    from fusedres.backends import torch_backend

    monkeypatch.setenv(finite_guard.CHECK_ENV, "0")
    monkeypatch.setattr(torch_backend, "_all_finite", lambda *t: pytest.fail("the guard ran"))
    with torch.no_grad():
        _op(torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3))
