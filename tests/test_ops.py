"""The op layer: schemas, fake implementations, autograd, backends against the reference."""

import warnings

import pytest
import torch

import fusedres
from fusedres import ext, reference
from fusedres.backends import BACKENDS, UnsupportedInputError, resolve_backend_name, select_backend
from fusedres.backends.inputs import StatsInputs


def _conv_args(dtype=torch.float64, channels_last=False, residual=False, shortcut=False, groups=1, dilation=1,
               stride=2, requires_grad=False):
    x = torch.randn(2, 8, 9, 7, dtype=dtype)
    w = torch.randn(16, 8 // groups, 3, 3, dtype=dtype) * 0.2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_h, out_w = (9 + 2 * dilation - 2 * dilation - 1) // stride + 1, (7 - 1) // stride + 1
    b = torch.randn(16, dtype=reference.accumulation_dtype(dtype))
    r = torch.randn(2, 16, out_h, out_w, dtype=dtype) if residual else None
    sx = torch.randn(2, 4, 9, 7, dtype=dtype) if shortcut else None
    sw = torch.randn(16, 4, 1, 1, dtype=dtype) * 0.3 if shortcut else None
    tensors = [x, w, b, r, sx, sw]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return (*tensors, [stride, stride], [dilation, dilation], [dilation, dilation], groups, [stride, stride])


CONV_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"residual": True}, id="residual"),
    pytest.param({"shortcut": True}, id="projection"),
    pytest.param({"groups": 4, "stride": 1}, id="groups4"),
    pytest.param({"dilation": 2, "stride": 1}, id="dilation2"),
    pytest.param({"channels_last": True, "residual": True}, id="channels_last"),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bias_act_opcheck(case):
    relu = "shortcut" not in case  # both values covered, without doubling the slow opcheck
    args = _conv_args(requires_grad=True, **case)
    torch.library.opcheck(torch.ops.fusedres.conv_bias_act.default, (*args, relu, None, None, "torch"))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bias_act_gradcheck(case):
    args = _conv_args(requires_grad=True, **case)
    tensors, rest = args[:6], args[6:]

    def fn(*ts):
        return fusedres.ops.conv_bias_act(*ts, *rest, True, "torch")

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_conv_bias_act_cpu_fast_path_matches_reference(case, relu):
    """float32 on the CPU takes oneDNN's fused convolution; it must match the reference
    computed in float64 to float32 accuracy scaled by the reduction length."""
    args64 = _conv_args(**case)
    args32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args64]
    expected = reference.conv_bias_act(*args64, relu)
    out = fusedres.ops.conv_bias_act(*args32, relu, "torch")
    reduction = 8 * 9 + 4
    error = (out.double() - expected).abs().max().item()
    assert error <= 4 * reduction * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert out.stride() == expected.float().contiguous(
        memory_format=reference.conv_output_memory_format(args32[0], args32[1])).stride()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("case", [pytest.param({}, id="plain"), pytest.param({"residual": True}, id="residual"),
                                  pytest.param({"shortcut": True}, id="projection")])
def test_conv_bias_act_when_onednn_refuses_a_shape(case, monkeypatch):
    """A shape this torch's oneDNN cannot run (torch 2.11 refuses some) takes the reference
    path: the right answer, one warning for the shape, then no more warnings or retries."""
    from fusedres.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_mkldnn_failed", set())
    calls = []

    class Refusing:
        def __call__(self, *args):
            calls.append(args)
            raise RuntimeError("could not create a memory")

        binary = __call__

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", Refusing())
    args64 = _conv_args(**case)
    args32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args64]
    expected = reference.conv_bias_act(*args64, True)
    with pytest.warns(RuntimeWarning, match="oneDNN's fused convolution failed"):
        out = fusedres.ops.conv_bias_act(*args32, True, "torch")
    tried = len(calls)
    assert tried >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fusedres.ops.conv_bias_act(*args32, True, "torch")
    assert len(calls) == tried  # remembered: not retried
    error = (out.double() - expected).abs().max().item()
    assert error <= 4 * (8 * 9 + 4) * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert torch.equal(out, again)


PROLOGUE_CASES = [pytest.param({}, id="plain"), pytest.param({"residual": True}, id="residual"),
                  pytest.param({"shortcut": True}, id="projection")]


def _prologue(dtype=torch.float64, requires_grad=False):
    scale = (torch.rand(8, dtype=reference.accumulation_dtype(dtype)) + 0.5).requires_grad_(requires_grad)
    shift = torch.randn(8, dtype=reference.accumulation_dtype(dtype)).requires_grad_(requires_grad)
    return scale, shift


def test_conv_bias_act_prologue_opcheck_and_gradcheck():
    """conv(relu(x*in_scale + in_shift)) + residual: the pre-activation blocks' first conv.
    (One case: opcheck and gradcheck cost a minute each here; the other cases are checked
    against the composition below, gradients included.)"""
    args = _conv_args(requires_grad=True, residual=True)
    scale, shift = _prologue(requires_grad=True)
    torch.library.opcheck(torch.ops.fusedres.conv_bias_act.default, (*args, True, scale, shift, "torch"))
    tensors, rest = args[:6], args[6:]

    def fn(*ts):
        return fusedres.ops.conv_bias_act(*ts[:6], *rest, True, "torch", ts[6], ts[7])

    assert torch.autograd.gradcheck(fn, (*tensors, scale, shift), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"] + ([] if ext.load_error() else ["cuda"]))
@pytest.mark.parametrize("case", PROLOGUE_CASES)
def test_conv_bias_act_prologue_matches_the_composition(backend, case):
    """Every backend against relu(x*s+b) then conv_bias_act, in float64 (triton: float32 in
    the interpreter, 4 * (K = 8*9 + 4) * eps32 of the output's max); input grads too."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    args64 = _conv_args(requires_grad=True, **case)
    scale64, shift64 = _prologue(requires_grad=True)
    expected = reference.conv_bias_act(*args64, True, scale64, shift64)
    composed = reference.conv_bias_act(reference.prologue(args64[0], scale64, shift64, True), *args64[1:], True)
    assert torch.equal(expected, composed)
    args = [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args64]
    scale, shift = (t.detach().to(reference.accumulation_dtype(dtype)).requires_grad_() for t in (scale64, shift64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fusedres.ops.conv_bias_act(*args, True, backend, scale, shift)
    tol = 1e-12 if dtype == torch.float64 else 4 * (8 * 9 + 4) * torch.finfo(torch.float32).eps
    error = (out.double() - expected).abs().max().item()
    assert error <= tol * expected.abs().max().item(), error
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    expected.backward(g)
    for name, ours, theirs in (("x", args[0], args64[0]), ("in_scale", scale, scale64), ("in_shift", shift, shift64)):
        err = (ours.grad.double() - theirs.grad).abs().max().item()
        assert err <= 4 * tol * theirs.grad.abs().max().item(), (name, err)


@pytest.mark.parametrize("backend", ["torch", "triton"] + ([] if ext.load_error() else ["cuda"]))
def test_conv_bias_act_zero_pad_shortcut(backend):
    """shortcut_x without shortcut_weight: the option-A shortcut (shortcut_x's 4 channels at
    stride 2 into the first 4 of 16, zeros in the rest), against the reference's F.pad, with
    the input gradients (triton: float32 in the interpreter, 4 * (K = 8*9) * eps32)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, b, _, sx, _, *rest = _conv_args(shortcut=True)
    args64 = [t.requires_grad_() for t in (x, w, b, sx)]
    expected = reference.conv_bias_act(x, w, b, None, sx, None, *rest, True)
    padded = torch.nn.functional.pad(sx[:, :, ::2, ::2], (0, 0, 0, 0, 0, 12))
    assert torch.equal(expected, reference.conv_bias_act(x, w, b, padded, None, None, *rest, True))
    ours = [t.detach().to(dtype if t is not b else reference.accumulation_dtype(dtype)).requires_grad_()
            for t in args64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fusedres.ops.conv_bias_act(ours[0], ours[1], ours[2], None, ours[3], None, *rest, True, backend)
    tol = 1e-12 if dtype == torch.float64 else 4 * 8 * 9 * torch.finfo(torch.float32).eps
    assert (out.double() - expected).abs().max().item() <= tol * expected.abs().max().item()
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    expected.backward(g)
    for name, mine, theirs in zip(("x", "weight", "bias", "shortcut_x"), ours, args64):
        err = (mine.grad.double() - theirs.grad).abs().max().item()
        assert err <= 4 * tol * theirs.grad.abs().max().item(), (name, err)


def test_conv_bias_act_zero_pad_shortcut_gradcheck():
    x, w, b, _, sx, _, *rest = _conv_args(shortcut=True, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *ts: fusedres.ops.conv_bias_act(ts[0], ts[1], ts[2], None, ts[3], None, *rest, True, "torch"),
        (x, w, b, sx), eps=1e-6, atol=1e-6)


def test_conv_bias_act_prologue_needs_scale_and_shift():
    args = _conv_args()
    with pytest.raises(ValueError, match="in_scale and in_shift must be given together"):
        fusedres.ops.conv_bias_act(*args, True, "torch", _prologue()[0], None)


def test_resnet18_on_a_1x1_final_map_runs_on_the_torch_backend():
    """layer4 of ResNet-18 at 32x32 sees a 1x1 map: oneDNN's fused binary conv of torch 2.11
    refused that ("could not create a memory"); the result must still match torchvision."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    fused = fusedres.convert(model, backend="torch").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether a shape falls back depends on the torch build
        out, expected = fused(x), model.double()(x.double())
    error = (out.double() - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item()


def _bn_args(dtype=torch.float64, requires_grad=False, residual=None):
    y = torch.randn(3, 6, 5, 4, dtype=dtype) * 2 + 1
    acc = reference.accumulation_dtype(dtype)
    scale, bias = torch.randn(6, dtype=acc), torch.randn(6, dtype=acc)
    r = rs = rb = None
    if residual in ("identity", "projection"):
        r = torch.randn(3, 6, 5, 4, dtype=dtype)
    if residual == "projection":
        rs, rb = torch.randn(6, dtype=acc), torch.randn(6, dtype=acc)
    if residual == "option_a":  # 4 of 6 channels, a stride-2 view of a (3, 4, 10, 8) block input
        r = torch.randn(3, 4, 10, 8, dtype=dtype)[:, :, ::2, ::2]
    tensors = [y, scale, bias, r, rs, rb]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("residual", [None, "identity", "projection", "option_a"])
@pytest.mark.parametrize("relu", [True, False])
def test_scale_bias_act_opcheck_and_gradcheck(residual, relu):
    tensors = _bn_args(requires_grad=True, residual=residual)
    torch.library.opcheck(torch.ops.fusedres.scale_bias_act.default, (*tensors, relu, "torch"))
    assert torch.autograd.gradcheck(lambda *t: fusedres.ops.scale_bias_act(*t, relu, "torch"),
                                    [t for t in tensors], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"] + ([] if ext.load_error() else ["cuda"]))
@pytest.mark.parametrize("relu", [True, False])
def test_scale_bias_act_option_a_residual(backend, relu):
    """A residual with fewer channels (the option-A shortcut's strided view of the block
    input, 4 of 6 channels) adds to the first channels only: against F.pad of that view in
    float64, forward and every gradient; the residual's gradient reaches the block input at
    the strided positions and is 0 elsewhere. Elementwise math: float32 within 4 eps."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    y, scale, bias, r, _, _ = _bn_args(residual="option_a")
    x = r._base.requires_grad_()
    ours = [t.detach().to(dtype if t.dim() == 4 else t.dtype).requires_grad_() for t in (y, scale, bias, x)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fusedres.ops.scale_bias_act(*ours[:3], ours[3][:, :, ::2, ::2], None, None, relu, backend)
    args64 = [t.requires_grad_() for t in (y, scale, bias)]
    padded = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 2))
    expected = reference.scale_bias_act(*args64, padded, None, None, relu)
    tol = 1e-15 if dtype == torch.float64 else 4 * torch.finfo(torch.float32).eps
    assert (out.double() - expected).abs().max().item() <= tol * expected.abs().max().item()
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    expected.backward(g)
    for name, mine, theirs in zip(("y", "scale", "bias", "x"), ours, (*args64, x)):
        err = (mine.grad.double() - theirs.grad).abs().max().item()
        assert err <= 8 * 60 * tol * theirs.grad.abs().max().item(), (name, err)  # sums over 60 values
    assert torch.equal(ours[3].grad[:, :, 1::2] != 0, torch.zeros_like(x[:, :, 1::2], dtype=torch.bool))


def test_scale_bias_act_narrow_residual_with_a_scale_is_refused():
    """Only a residual without its own BN may be narrower than y (option A has no BN)."""
    y, scale, bias, _, rs, rb = _bn_args(dtype=torch.float32, residual="projection")
    r = torch.randn(3, 4, 5, 4)
    with pytest.raises(UnsupportedInputError, match="residual has shape"):
        fusedres.ops.scale_bias_act(y, scale, bias, r, rs[:4], rb[:4], True, "triton")


def test_bn_stats_opcheck_gradcheck_and_values():
    y = (torch.randn(3, 6, 5, 4, dtype=torch.float64) * 3 + 1e4).requires_grad_(True)
    torch.library.opcheck(torch.ops.fusedres.bn_stats.default, (y, "torch"))
    assert torch.autograd.gradcheck(lambda t: fusedres.ops.bn_stats(t, "torch"), [y], eps=1e-6, atol=1e-6)
    mean, var = fusedres.ops.bn_stats(y, "torch")
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, y.var(dim=(0, 2, 3), unbiased=False))


def test_conv_bn_stats_with_a_residual_hands_statistics_to_bn_stats_of():
    """With a residual (a pre-activation block's last conv), conv_bn_stats' statistics come
    without a gradient and y is not saved (the user may change it in place); bn_stats_of
    gives them bn_stats' gradient in y: values and gradients as bn_stats(y) itself."""
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 6, 5, dtype=torch.float64, requires_grad=True)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, mean, var = fusedres.ops.conv_bn_stats(x, w, None, None, False, *conv, "torch", r)
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad
    torch.library.opcheck(torch.ops.fusedres.bn_stats_of.default, (y.detach().requires_grad_(), mean, var, "torch"))
    y.mul_(1.0)  # an in-place change of the block output leaves y's own backward intact
    got = fusedres.ops.bn_stats_of(y, mean, var, "torch")
    want = fusedres.ops.bn_stats(y, "torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got[0].sum() * 3 + got[1].sum() + y.square().sum(), (x, w, r), retain_graph=True)
    wants = torch.autograd.grad(want[0].sum() * 3 + want[1].sum() + y.square().sum(), (x, w, r))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_stats_accumulate_in_float32(dtype):
    y = torch.randn(4, 3, 16, 16).to(dtype) + 100
    mean, var = fusedres.ops.bn_stats(y, "torch")
    assert mean.dtype == var.dtype == torch.float32
    exact = y.double()
    torch.testing.assert_close(mean.double(), exact.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), exact.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_explicit_unavailable_backend_raises_with_every_reason():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(UnsupportedInputError, match="the 'cuda' backend cannot run bn_stats") as info:
        fusedres.ops.bn_stats(x.int(), "cuda")
    assert "dtype torch.int32 is not supported by the fusedres._C kernels" in str(info.value) or \
        "not built" in str(info.value)
    # triton runs CPU tensors through the interpreter (tests/conftest.py), but not float64.
    with pytest.raises(UnsupportedInputError, match="the 'triton' backend cannot run bn_stats") as info:
        fusedres.ops.bn_stats(x.double(), "triton")
    assert "float64 is not supported by the Triton kernels" in str(info.value)


def test_auto_on_cpu_picks_the_extension_or_torch_silently(recwarn):
    x = torch.randn(2, 3, 4, 4)
    expected = "torch" if ext.load_error() else "cuda"  # the extension's C++ kernels where built
    assert select_backend("auto", StatsInputs(x)) is BACKENDS[expected]
    assert not [w for w in recwarn if "fusedres" in str(w.message)]


def test_backend_names_and_env_var(monkeypatch):
    assert resolve_backend_name("auto") == "auto"
    monkeypatch.setenv("FUSEDRES_BACKEND", "torch")
    assert resolve_backend_name("auto") == "torch"
    assert resolve_backend_name("triton") == "triton"  # an explicit block setting wins
    monkeypatch.setenv("FUSEDRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="FUSEDRES_BACKEND"):
        resolve_backend_name("auto")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fusedres.Bottleneck(8, 2, backend="fast")


def test_block_with_explicit_unavailable_backend_raises(monkeypatch):
    block = fusedres.BasicBlock(4, 4, backend="triton").train().double()  # no float64 Triton kernels
    with pytest.raises(NotImplementedError, match="triton.*bn_stats.*float64"):
        block(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    monkeypatch.setenv("FUSEDRES_BACKEND", "triton")
    block.backend = "auto"
    with pytest.raises(NotImplementedError, match="triton"):
        block(torch.randn(1, 4, 5, 5, dtype=torch.float64))


# ----- dispatch once per call, narrow catches, loud fallbacks -----

def _count_selections(monkeypatch, module):
    calls = []
    original = module.select_backend

    def counting(name, inputs, tune=False):
        calls.append(inputs.op)
        return original(name, inputs, tune)

    monkeypatch.setattr(module, "select_backend", counting)
    return calls


def test_each_op_chooses_its_backend_once_per_call_forward_and_backward(monkeypatch):
    """The op layer chooses once; the op's body, fake, autograd context and backward reuse
    that choice (choosing again could disagree with the first)."""
    from fusedres.ops import bn as ops_bn
    from fusedres.ops import conv_train as ops_conv_train

    stats_calls = _count_selections(monkeypatch, ops_bn)
    train_calls = _count_selections(monkeypatch, ops_conv_train)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y, mean, var = fusedres.ops.conv_bn_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1, "auto")
    m2, v2 = fusedres.ops.bn_stats(y, "auto")
    scale = torch.rand(6, dtype=torch.float64) + 0.5
    out = fusedres.ops.scale_bias_act(y, scale, mean, None, None, None, True, "auto")
    (out.sum() + m2.sum() + v2.sum() + var.sum()).backward()
    assert train_calls == ["conv_bn_stats"]
    assert stats_calls == ["bn_stats", "scale_bias_act"]
    assert x.grad is not None and w.grad is not None


def test_registered_op_takes_the_chosen_backend_not_auto():
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="fusedres::bn_stats runs the backend fusedres.ops chose, not 'auto'"):
        torch.ops.fusedres.bn_stats(y, "auto")
    torch.testing.assert_close(torch.ops.fusedres.bn_stats(y, "torch"), reference.bn_stats(y))


def test_env_variable_means_the_explicit_backend_for_ops_too(monkeypatch):
    y = torch.randn(2, 3, 4, 4).int()
    monkeypatch.setenv("FUSEDRES_BACKEND", "cuda")
    with pytest.raises(UnsupportedInputError, match="the 'cuda' backend cannot run bn_stats"):
        fusedres.ops.bn_stats(y, "auto")


def test_cudnn_refusal_falls_back_loudly_and_other_errors_surface(monkeypatch, caplog):
    """Only cuDNN's "not supported" means "take the reference path" (logged once); any other
    RuntimeError (a shape bug, an asynchronous CUDA error) is raised."""
    from fusedres.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_cudnn_failed", set())
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)

    def refuse(*args):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    def crash(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse)
    with caplog.at_level("WARNING", logger="fusedres"):
        assert torch_backend._cudnn_conv_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1) is None
    assert (torch.float32, False) in torch_backend._cudnn_failed
    assert any("cuDNN's fused convolution refused torch.float32" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        torch_backend._cudnn_conv_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1)
