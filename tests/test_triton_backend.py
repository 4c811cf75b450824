"""The `triton` backend: fusedres::conv_bias_act through the Triton kernel, single ops, whole
blocks and a small converted ResNet against the reference / torchvision in float64.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so channel counts and spatial sizes stay tiny. GPU-marked tests cover
bfloat16, torch.compile and the cuDNN fast path of the torch backend.

Tolerances (float32, IEEE products, fp32 accumulation; the tests force allow_tf32=False):

* one conv: a length-K fp32 sum is off by at most K*eps32 times the sum of the magnitudes
  of its terms (the classic gamma_K bound); the elementwise check below uses that sum of
  magnitudes (`mag`) with the random-rounding estimate (4*sqrt(K) + 2)*eps32, as
  tests/test_triton_conv.py does. float16 adds one rounding of the output (and of
  nothing else: operands are exact in fp16), <= eps16/2 * mag: we allow 2*eps16*mag.
* whole blocks and models, max-abs error relative to max|expected| (assert_close_scaled):
  the rounding errors of a length-K fp32 sum add up like a random walk, ~sqrt(K)*eps32
  relative to the sum's magnitude (the worst case, K*eps32, needs every rounding to go the
  same way), and each conv's error passes through the later convs scaled by their O(1)
  gain (randomize_bn keeps BN scales near 1, weights are Kaiming-initialised), so we allow
  4 * (number of convs in sequence) * sqrt(K_max) * eps32: ~2e-5 for a block, ~1e-4 for
  the small ResNet, while the observed errors are ~1e-7 relative. A semantic slip (wrong
  bias, padding, stride, residual, bf16/TF32 operands) shows at 1e-3 or worse.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import ClassVar

import pytest
import torch
import torchvision.models.resnet as tv
from helpers import assert_close_scaled, narrow_resnet, randomize_bn
from torch import nn

import fusedres
from fusedres import reference
from fusedres.backends import BACKENDS, UnsupportedInputError, select_backend
from fusedres.backends.inputs import ConvInputs, OpInputs, StatsInputs, TailInputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
CL = torch.channels_last
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# ---------------------------------------------------------------------------------------
# The op, through fusedres.ops.conv_bias_act(..., backend="triton")


def _op_args(dtype, *, x_format=torch.contiguous_format, w_format=torch.contiguous_format, residual=False,
             shortcut=False, groups=1, stride=1, residual_dtype=None):
    x = torch.randn(2, 16, 7, 9).to(DEVICE, dtype).contiguous(memory_format=x_format)
    w = (torch.randn(24, 16 // groups, 3, 3) / math.sqrt(16 // groups * 9)).to(DEVICE, dtype) \
        .contiguous(memory_format=w_format)
    b = torch.randn(24, device=DEVICE)  # folded biases are float32
    p, q = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    r = torch.randn(2, 24, p, q).to(DEVICE, residual_dtype or dtype).contiguous(memory_format=x_format) \
        if residual else None
    sx = sw = None
    if shortcut:
        sx = torch.randn(2, 12, 7, 9).to(DEVICE, dtype).contiguous(memory_format=x_format)
        sw = (torch.randn(24, 12, 1, 1) / math.sqrt(12)).to(DEVICE, dtype)
    return [x, w, b, r, sx, sw, [stride, stride], [1, 1], [1, 1], groups, [stride, stride]]


def _reference64(args, relu, absolute=False):
    def d(t):
        return None if not isinstance(t, torch.Tensor) else (t.double().abs() if absolute else t.double())

    return reference.conv_bias_act(*[d(a) for a in args[:6]], *args[6:], relu and not absolute)


def _expected_stride(args, shape):
    fmt = reference.conv_output_memory_format(args[0], args[1])
    return torch.empty(shape).contiguous(memory_format=fmt).stride()


OP_CASES = [
    pytest.param({}, id="nchw"),
    pytest.param({"x_format": CL, "w_format": CL, "residual": True}, id="channels_last-residual"),
    pytest.param({"w_format": CL, "stride": 2}, id="nchw-x-channels_last-w-stride2"),
    pytest.param({"x_format": CL, "shortcut": True, "stride": 2}, id="projection-stride2"),
    pytest.param({"groups": 4, "residual": True}, id="groups4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", OP_CASES)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_op_matches_reference(case, dtype, relu):
    args = _op_args(dtype, **case)
    out = fusedres.ops.conv_bias_act(*args, relu, "triton")
    expected = _reference64(args, relu)
    mag = _reference64(args, relu, absolute=True)
    assert out.dtype == dtype and out.shape == expected.shape
    # The memory format the op's fake promises, i.e. PyTorch's convolution's.
    assert out.stride() == _expected_stride(args, expected.shape)
    k = 9 * 16 // args[9] + (12 if case.get("shortcut") else 0) + 2
    factor = (4 * math.sqrt(k) + 2) * EPS32 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    worst = ((out.double() - expected).abs() / (factor * mag + 1e-30)).max().item()
    assert worst <= 1.0, f"max error / bound = {worst:.3f}"


def test_op_float32_residual_with_float16_conv():
    """Under autocast an identity shortcut arrives in float32: it is added in fp32 (as the
    reference does), not rounded to float16 first."""
    args = _op_args(torch.float16, residual=True, residual_dtype=torch.float32)
    args[3] = args[3] * 1000  # large: rounding it to fp16 before the add would show
    out = fusedres.ops.conv_bias_act(*args, True, "triton")
    assert out.dtype == torch.float16
    exact, mag = _reference64(args, True), _reference64(args, True, absolute=True)
    # One rounding to fp16 (<= eps16/2 relative, to nearest) plus the fp32 conv error;
    # rounding the residual first would cost up to twice that.
    bound = torch.finfo(torch.float16).eps / 2 * exact.abs() + (4 * math.sqrt(146) + 2) * EPS32 * mag
    worst = ((out.double() - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"max error / bound = {worst:.3f}"


def test_op_nan_propagates():
    args = _op_args(torch.float32, x_format=CL)
    args[0][1, 3, 2, 4] = float("nan")
    out = fusedres.ops.conv_bias_act(*args, True, "triton")
    assert torch.equal(out.isnan(), reference.conv_bias_act(*args, True).isnan())


def test_op_empty_batch():
    args = _op_args(torch.float32)
    args[0] = args[0][:0]
    out = fusedres.ops.conv_bias_act(*args, True, "triton")
    assert out.shape == (0, 24, 7, 9)


def test_triton_op_opcheck():
    """fusedres::triton_conv_bias_act: schema, fake implementation, and (under the
    interpreter, where it is an opaque custom op) AOT dispatch. On a GPU the same checks
    trace the triton_op's wrap_triton launch."""
    from fusedres.triton import ops as triton_ops

    x = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=CL)
    w = torch.randn(8, 16, 3, 3, device=DEVICE) * 0.2
    b = torch.randn(8, device=DEVICE)
    r = torch.randn(2, 8, 3, 3, device=DEVICE)
    sx, sw = torch.randn(2, 4, 5, 6, device=DEVICE), torch.randn(8, 4, 1, 1, device=DEVICE)
    op = torch.ops.fusedres.triton_conv_bias_act.default
    assert triton_ops.TRACEABLE == (not INTERPRET)
    torch.library.opcheck(op, (x, w, b, r, None, None, [2, 2], [1, 1], [1, 1], 1, [1, 1], True, None, None))
    torch.library.opcheck(op, (x, w, None, None, sx, sw, [2, 2], [1, 1], [1, 1], 1, [2, 2], False, None, None))
    scale, shift = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)  # prologue, option A
    torch.library.opcheck(op, (x, w, b, None, sx[:, :4], None, [2, 2], [1, 1], [1, 1], 1, [2, 2], True, scale, shift))


# ---------------------------------------------------------------------------------------
# When the backend declines, and what auto does


def _small_args(dtype=torch.float32, device="cpu"):
    x = torch.randn(1, 4, 5, 5, dtype=dtype, device=device)
    w = torch.randn(4, 4, 3, 3, dtype=dtype, device=device)
    return [x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, [1, 1]]


def test_cpu_without_interpreter_declines_with_the_fix(monkeypatch):
    from fusedres.triton import common

    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(UnsupportedInputError, match="the 'triton' backend cannot run conv_bias_act") as info:
        fusedres.ops.conv_bias_act(*_small_args(), True, "triton")
    assert "inputs are on cpu" in str(info.value) and "TRITON_INTERPRET=1" in str(info.value)


@pytest.mark.parametrize("dtype, match", [
    pytest.param(torch.float64, "float64 is not supported by the Triton kernels", id="float64"),
])
def test_unsupported_dtype_raises_with_reason(dtype, match):
    with pytest.raises(UnsupportedInputError, match=match):
        fusedres.ops.conv_bias_act(*_small_args(dtype, DEVICE), True, "triton")


def _conv(x, weight, bias=None, residual=None, shortcut_x=None, shortcut_weight=None):
    return ConvInputs(x, weight, bias, residual, shortcut_x, shortcut_weight, [1, 1], [1, 1], [1, 1], 1, [1, 1], True)


def _tail(y, scale, bias, residual=None, residual_scale=None, residual_bias=None):
    return TailInputs(y, scale, bias, residual, residual_scale, residual_bias, True)


@dataclasses.dataclass(frozen=True)
class _NoSuchOpInputs(OpInputs):
    op: ClassVar[str] = "no_such_op"
    main: ClassVar[str] = "x"
    x: torch.Tensor


def test_reasons_for_dtypes_and_ops():
    triton = BACKENDS["triton"]
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    assert triton.not_supported_reasons(_conv(x, torch.randn(4, 4, 3, 3, device=DEVICE))) == []
    # fp32 bias with fp16 activations is fine; a weight in another dtype is not.
    half = x.half()
    assert triton.not_supported_reasons(_conv(half, half.new_ones(4, 4, 3, 3), torch.ones(4, device=DEVICE))) == []
    assert triton.not_supported_reasons(_conv(half, half.new_ones(4, 4, 3, 3), None,
                                              torch.ones(1, 4, 5, 5, device=DEVICE))) == []
    reasons = triton.not_supported_reasons(_conv(half, torch.ones(4, 4, 3, 3, device=DEVICE)))
    assert reasons == ["mixed dtypes: x is torch.float16 but weight is torch.float32 (the Triton kernel "
                       "multiplies them in one dtype)"]
    reasons = triton.not_supported_reasons(_conv(x.int(), x.int()))
    assert len(reasons) == 1 and "torch.int32 is not supported" in reasons[0]
    # The train-mode BatchNorm ops: fp16/bf16/fp32 activations, any floating per-channel vectors.
    vec = torch.ones(4, device=DEVICE)
    assert triton.not_supported_reasons(StatsInputs(half)) == []
    assert triton.not_supported_reasons(_tail(half, vec, vec, x, vec, vec)) == []
    (reason,) = triton.not_supported_reasons(StatsInputs(x.double()))
    assert "float64 is not supported" in reason
    reasons = triton.not_supported_reasons(_tail(x, vec.int(), vec, x[:, :, :2]))
    assert len(reasons) == 2 and "scale is torch.int32" in reasons[0] and "do not broadcast" in reasons[1]
    # Fewer channels without a residual scale is the option-A shortcut (the rest add 0); with one it is not.
    assert triton.not_supported_reasons(_tail(x, vec, vec, x[:, :2])) == []
    (reason,) = triton.not_supported_reasons(_tail(x, vec, vec, x[:, :2], vec, vec))
    assert "do not broadcast" in reason
    assert triton.not_supported_reasons(_NoSuchOpInputs(x)) == ["no Triton kernel for no_such_op"]


def test_every_tensor_is_checked_mixed_shortcut_dtype(monkeypatch):
    """A float32 projection shortcut with a float16 conv: the whole input is checked, so
    auto falls back (to a backend that casts) and an explicit triton names the reason."""
    x = torch.randn(2, 4, 6, 6, device=DEVICE).half()
    w = torch.randn(8, 4, 3, 3, device=DEVICE).half() * 0.2
    sx = torch.randn(2, 4, 6, 6, device=DEVICE)
    sw = torch.randn(8, 4, 1, 1, device=DEVICE) * 0.2
    args = (x, w, None, None, sx, sw, [1, 1], [1, 1], [1, 1], 1, [1, 1], True)
    reasons = BACKENDS["triton"].not_supported_reasons(ConvInputs(*args))
    assert reasons == [f"mixed dtypes: x is torch.float16 but {name} is torch.float32 (the Triton kernel multiplies "
                       f"them in one dtype)" for name in ("shortcut_x", "shortcut_weight")]
    with pytest.raises(UnsupportedInputError, match="triton' backend cannot run conv_bias_act: mixed dtypes: x is "
                                                    "torch.float16 but shortcut_x is torch.float32"):
        fusedres.ops.conv_bias_act(*args, "triton")
    # A float32 residual is fine (the kernel reads it in fp32).
    residual = torch.randn(2, 8, 6, 6, device=DEVICE)
    assert BACKENDS["triton"].not_supported_reasons(ConvInputs(x, w, None, residual, None, None, *args[6:])) == []
    # auto: triton declines (on the CPU, pretend it targets the CPU as it does under the
    # interpreter) and the next backend runs the input, with one warning naming the reason.
    monkeypatch.setattr(type(BACKENDS["triton"]), "device_types", lambda self: ("cuda", "cpu"))
    with pytest.warns(RuntimeWarning, match="runs on the '(cuda|torch)' backend because triton: mixed dtypes"):
        out = fusedres.ops.conv_bias_act(*args, "auto")
    expected = reference.conv_bias_act(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    assert_close_scaled(out.double(), expected, 4 * 36 * 2**-10)


def test_auto_on_cpu_never_picks_triton(recwarn):
    args = _small_args()
    assert select_backend("auto", ConvInputs(*args, True), tune=True) is not BACKENDS["triton"]
    assert not [w for w in recwarn if "fusedres" in str(w.message)]


def test_train_mode_on_explicit_triton_runs_and_declines_float64():
    """Train mode runs on the triton backend (tests/test_triton_bn.py checks the numbers);
    float64 is declined, naming the first op that meets it (bn_stats, or conv_bn_stats where
    the block computes its statistics with the conv)."""
    block = fusedres.BasicBlock(4, 4, backend="triton").train().to(DEVICE)
    assert block(torch.randn(2, 4, 5, 5, device=DEVICE)).shape == (2, 4, 5, 5)
    with pytest.raises(UnsupportedInputError, match="cannot run (conv_)?bn_stats: float64 is not supported"):
        block.double()(torch.randn(2, 4, 5, 5, device=DEVICE, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Whole blocks and a small ResNet against torchvision in float64


def _block_pair(kind, inplanes, planes, stride=1, groups=1, base_width=64, projection=None):
    tv_cls, fused_cls = (tv.BasicBlock, fusedres.BasicBlock) if kind == "basic" else (tv.Bottleneck,
                                                                                     fusedres.Bottleneck)
    out = planes * tv_cls.expansion
    if projection is None:
        projection = stride != 1 or inplanes != out
    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) \
        if projection else None
    ref = randomize_bn(tv_cls(inplanes, planes, stride, downsample, groups, base_width)).eval()
    fused = fused_cls(inplanes, planes, stride, copy.deepcopy(downsample), groups, base_width, backend="triton")
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused.eval().to(DEVICE)


def _max_reduction(model: nn.Module) -> int:
    return max(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
               for m in model.modules() if isinstance(m, nn.Conv2d))


BLOCKS = [
    pytest.param("basic", 8, 8, 1, 1, 64, False, id="basic-identity"),
    pytest.param("basic", 8, 16, 2, 1, 64, True, id="basic-stride2-downsample"),
    pytest.param("bottleneck", 16, 4, 1, 1, 64, False, id="bottleneck-identity"),
    pytest.param("bottleneck", 8, 4, 1, 1, 64, True, id="bottleneck-downsample-stride1"),
    pytest.param("bottleneck", 16, 8, 2, 1, 64, True, id="bottleneck-stride2-downsample"),
    pytest.param("bottleneck", 16, 8, 2, 4, 16, True, id="resnext-groups4-stride2"),
    pytest.param("bottleneck", 32, 8, 1, 4, 32, False, id="resnext-groups4-identity"),
]


@pytest.mark.parametrize("kind,inplanes,planes,stride,groups,base_width,channels_last", BLOCKS)
def test_block_eval_float32_against_torchvision_float64(kind, inplanes, planes, stride, groups, base_width,
                                                        channels_last):
    ref, fused = _block_pair(kind, inplanes, planes, stride, groups, base_width)
    x = torch.randn(2, inplanes, 9, 7, dtype=torch.float64)
    xf = x.float().to(DEVICE)
    if channels_last:
        xf = xf.contiguous(memory_format=CL)
        fused = fused.to(memory_format=CL)
    with torch.no_grad():
        expected = ref(x)
        actual = fused(xf)
        expected32 = copy.deepcopy(ref).float().to(DEVICE, memory_format=CL if channels_last else
                                                   torch.contiguous_format)(xf)
    assert actual.dtype == torch.float32
    assert actual.stride() == expected32.stride(), "torchvision's memory format"
    n_convs = 3 if kind == "bottleneck" else 2
    assert_close_scaled(actual.cpu().double(), expected, 4 * n_convs * math.sqrt(_max_reduction(ref)) * EPS32,
                        "block output")


@pytest.mark.parametrize("block, kwargs", [
    pytest.param(tv.BasicBlock, {}, id="resnet-basic"),
    pytest.param(tv.Bottleneck, {"groups": 4, "width_per_group": 16}, id="resnext-bottleneck"),
])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_converted_narrow_resnet_against_torchvision_float64(block, kwargs, channels_last):
    ref = randomize_bn(narrow_resnet(block, **kwargs)).eval()
    fused = fusedres.convert(ref, backend="triton").to(DEVICE).eval()
    assert sum(isinstance(m, (fusedres.BasicBlock, fusedres.Bottleneck)) for m in fused.modules()) == 4
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    xf = x.float().to(DEVICE)
    if channels_last:
        xf = xf.contiguous(memory_format=CL)
        fused = fused.to(memory_format=CL)
    with torch.no_grad():
        expected = ref.double()(x)
        actual = fused(xf)
    # 1 stem conv + 4 blocks of 2 or 3 convs in sequence.
    n_convs = 1 + 4 * (3 if block is tv.Bottleneck else 2)
    assert_close_scaled(actual.cpu().double(), expected, 4 * n_convs * math.sqrt(_max_reduction(ref)) * EPS32,
                        "logits")


def test_compile_fullgraph_block_on_triton_backend():
    """torch.compile traces a block on the triton backend without graph breaks (on the CPU
    the Triton op is opaque and runs in the interpreter at run time)."""
    torch._dynamo.reset()
    ref, fused = _block_pair("bottleneck", 16, 8, stride=2)
    x = torch.randn(2, 16, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = fused(x)
        actual = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------
# GPU only: bfloat16, torch.compile, the cuDNN fast path


def _low_precision_error(ref64, model, x64, dtype):
    """(our error, torchvision's error) of `model` and of torchvision in `dtype` vs float64."""
    ref_low = copy.deepcopy(ref64).to("cuda", dtype, memory_format=CL)
    x = x64.to("cuda", dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        exact = ref64(x64)
        theirs = ref_low(x).cpu().double()
        ours = model.to("cuda", dtype, memory_format=CL)(x).cpu().double()
    scale = exact.abs().max().item()
    return (ours - exact).abs().max().item() / scale, (theirs - exact).abs().max().item() / scale


@pytest.mark.gpu
@pytest.mark.parametrize("kind,inplanes,planes,stride,groups,base_width,channels_last", BLOCKS)
def test_block_bfloat16_gpu(kind, inplanes, planes, stride, groups, base_width, channels_last):
    ref, fused = _block_pair(kind, inplanes, planes, stride, groups, base_width)
    x = torch.randn(4, inplanes, 14, 14, dtype=torch.float64)
    ours, theirs = _low_precision_error(ref, fused, x, torch.bfloat16)
    assert ours <= 2 * theirs + 4 * torch.finfo(torch.bfloat16).eps, (ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_resnet18_low_precision_gpu(dtype):
    ref = randomize_bn(tv.resnet18(num_classes=10)).eval().double()
    fused = fusedres.convert(ref, backend="triton").eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours, theirs = _low_precision_error(ref, fused, x, dtype)
    assert ours <= 2 * theirs + 4 * torch.finfo(dtype).eps, (ours, theirs)


@pytest.mark.gpu
def test_compile_fullgraph_resnet18_triton_gpu():
    torch._dynamo.reset()
    model = randomize_bn(fusedres.models.resnet18(num_classes=10, backend="triton")).eval()
    model = model.to("cuda", torch.float16, memory_format=CL)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, fullgraph=True)(x)
    assert_close_scaled(actual.float(), expected.float(), 1e-2, "compiled logits")


@pytest.mark.gpu
def test_compile_triton_op_directly_gpu():
    """The triton_op traced by inductor (wrap_triton launch, pruned autotune configs)."""
    torch._dynamo.reset()
    op = torch.ops.fusedres.triton_conv_bias_act.default
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args(torch.float16, x_format=CL,
                                                                               residual=True)]

    def f(x, w, b, r):
        return op(x, w, b, r, None, None, [1, 1], [1, 1], [1, 1], 1, [1, 1], True)

    expected = f(*args[:4])
    actual = torch.compile(f, fullgraph=True)(*args[:4])
    torch.testing.assert_close(actual, expected)
    assert actual.stride() == expected.stride()
    assert_close_scaled(actual.double().cpu(), _reference64(args, True).cpu(), 4 * torch.finfo(torch.float16).eps,
                        "compiled triton op")


@pytest.mark.parametrize("case", [
    pytest.param({}, id="relu"),
    pytest.param({"x_format": CL, "w_format": CL, "residual": True}, id="add-relu"),
    pytest.param({"x_format": CL, "shortcut": True, "stride": 2}, id="projection"),
    pytest.param({"residual": True, "residual_dtype": torch.float64}, id="nchw-residual-other-dtype"),
])
def test_torch_backend_cudnn_path_plumbing_on_cpu(case, monkeypatch):
    """The cuDNN fast path's argument plumbing, with the two ATen ops replaced by plain
    PyTorch of the same schema (they only run on CUDA): bias cast to x's dtype, z = the
    residual or the shortcut conv, the output memory format, the non-finite guard."""
    from fusedres.backends import torch_backend

    seen = []

    def conv_relu(x, w, bias, stride, padding, dilation, groups):
        seen.append(("relu", bias.dtype))
        return torch.relu(torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups))

    def conv_add_relu(x, w, z, alpha, bias, stride, padding, dilation, groups):
        seen.append(("add_relu", bias.dtype, z.dtype, z.stride()))
        return torch.relu(torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)
    monkeypatch.setattr(torch_backend, "_use_cudnn",
                        lambda x, w, relu, with_z, *others: relu and torch_backend._all_finite(x, w, *others))
    args = _op_args(torch.float32, **case)
    backend = BACKENDS["torch"]
    out = backend._cudnn_conv_bias_act(ConvInputs(*args, True))
    expected = _reference64(args, True)
    assert out.dtype == torch.float32 and out.stride() == _expected_stride(args, expected.shape)
    assert_close_scaled(out.double(), expected, 4 * 160 * EPS32, "fused output")
    z = case.get("residual") or case.get("shortcut")
    assert seen[0][:2] == ("add_relu" if z else "relu", torch.float32)
    if z:
        assert seen[0][2] == torch.float32 and seen[0][3] == torch.empty(expected.shape).contiguous(
            memory_format=reference.conv_output_memory_format(args[0], args[1])).stride()
    assert backend._cudnn_conv_bias_act(ConvInputs(*args, False)) is None  # no ReLU: the reference path
    args[0][0, 0, 0, 0] = float("inf")
    assert backend._cudnn_conv_bias_act(ConvInputs(*args, True)) is None  # non-finite input: the reference path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    pytest.param({}, id="relu"),
    pytest.param({"x_format": CL, "w_format": CL, "residual": True}, id="add-relu"),
    pytest.param({"x_format": CL, "shortcut": True, "stride": 2}, id="projection"),
    pytest.param({"groups": 4, "residual": True}, id="groups4-nchw"),
])
def test_torch_backend_cudnn_fast_path_gpu(case, dtype, monkeypatch):
    calls = []
    for name in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args(dtype, **case)]
    out = fusedres.ops.conv_bias_act(*args, True, "torch")
    assert calls == ["cudnn_convolution_add_relu" if case.get("residual") or case.get("shortcut")
                     else "cudnn_convolution_relu"]
    expected = _reference64(args, True).cpu()
    assert out.dtype == dtype and out.stride() == _expected_stride(args, expected.shape)
    tol = 4 * 160 * EPS32 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert_close_scaled(out.cpu().double(), expected, tol, "cuDNN fused output")
    # NaN propagates (the fused ReLU would map it to 0): the guard takes the reference path.
    calls.clear()
    args[0][0, 1, 2, 3] = float("nan")
    out = fusedres.ops.conv_bias_act(*args, True, "torch")
    assert calls == [] and torch.equal(out.isnan(), reference.conv_bias_act(*args, True).isnan())


def _conv_backward_inputs(device="cpu"):
    from fusedres.backends.inputs import ConvBackwardInputs

    a = torch.randn(2, 4, 6, 6, device=device)
    w = torch.randn(8, 4, 3, 3, device=device)
    return ConvBackwardInputs(torch.randn(2, 8, 6, 6, device=device), a, w, [1, 1], [1, 1], [1, 1], 1, True, True)


def test_forced_triton_conv_backward_that_cannot_run_raises(monkeypatch):
    """FUSEDRES_TRITON_CONV_BACKWARD=triton under torch.compile tracing (fake tensors): an
    error, not a quiet switch to ATen; an unknown value is an error too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedres.backends import triton_backend

    monkeypatch.setattr(triton_backend, "CONV_BACKWARD", "triton")
    with FakeTensorMode():
        inputs = _conv_backward_inputs()
        with pytest.raises(UnsupportedInputError, match="FUSEDRES_TRITON_CONV_BACKWARD=triton cannot run while "
                                                        "torch.compile traces"):
            triton_backend._conv_backward_choice(inputs)
    monkeypatch.setattr(triton_backend, "CONV_BACKWARD", "fast")
    with pytest.raises(ValueError, match="FUSEDRES_TRITON_CONV_BACKWARD='fast'; expected auto, aten or triton"):
        triton_backend._conv_backward_choice(_conv_backward_inputs())
    monkeypatch.setattr(triton_backend, "CONV_BACKWARD", "auto")
    assert triton_backend._conv_backward_choice(_conv_backward_inputs()).name == "aten"  # off CUDA


def test_elementwise_backward_fallback_is_logged_once(caplog, monkeypatch):
    """A Triton backward pass handed tensors its kernel does not take (float64 here) runs the
    PyTorch formula, and says so once on the fusedres logger."""
    from fusedres.backends import log

    monkeypatch.setattr(log, "_logged", set())
    triton = BACKENDS["triton"]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    with caplog.at_level("INFO", logger="fusedres"):
        for _ in range(2):
            out = triton.prologue(x, scale, shift, True)
            torch.testing.assert_close(out, reference.prologue(x, scale, shift, True))
    lines = [r.getMessage() for r in caplog.records if "computes the recomputed prologue with PyTorch ops" in
             r.getMessage()]
    assert len(lines) == 1
