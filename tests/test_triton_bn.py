"""Train-mode BatchNorm on the triton backend: the kernels of fusedres.triton.bn against the
float64 reference (forward) and torch.autograd of the reference in float64 (backward), the
backend wiring, and whole blocks in train mode against torchvision in float64.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1),
with 16x16 / 32x16 tiles, so the odd shapes below (C = 5..40, N*H*W = 30..70) cover several
row and channel tiles and their masked tails. Every buffer the launchers allocate is
pre-filled with NaN (`_poison`), so an element or a partial sum a kernel fails to write
shows up as NaN where the reference has none.

Error bounds (u32 = eps32/2 is float32's unit roundoff; mag is the float64 sum of the
magnitudes of the terms that make up a value, which bounds every rounding made while
combining them):

* elementwise results (scale_bias_act, dy, dresidual, bn_stats' backward): a handful of fp32
  operations, each off by <= u32 relative to its operands, so the fp32 value is within
  ~4*u32*mag = 2*eps32*mag; then one cast to the output dtype, <= eps_out/2*|value| when
  rounding to nearest, < eps_out*|value| when truncating (the interpreter's bf16): we allow
  2*eps32*mag + eps_out*|exact| (for fp32 outputs the second term is just one more eps32;
  |exact| is floored at the dtype's smallest normal number, where subnormals start).
* per-channel sums over M = N*H*W terms (dscale, dbias, dresidual_scale): whatever the
  order of summation, a sum of M fp32 terms is within (M-1)*u32*sum|terms| of the exact
  sum (Higham's gamma bound), the fp32 products add u32 each: we allow (M+2)*eps32*sum|terms|.
* bn_stats: the kernel works on deviations from each tile's own mean, so its errors scale
  with R^2 = max|y - mean|^2, not with mean^2 (see test_bn_stats_large_mean); mean within
  eps32*|mean| + (M+2)*eps32*R, variance within 4*(M+4)*eps32*R^2 (the gamma bound applied
  to the sums of d and d^2, d = y - tile mean, |d| <= 2R).
* whole blocks: see `_block_rtol`.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torchvision.models.resnet as tv
from helpers import assert_close_scaled, randomize_bn
from torch import nn

import fusedres
from fusedres import reference
from fusedres.backends import BACKENDS
from fusedres.backends.inputs import StatsInputs
from fusedres.triton import bn as tbn
from fusedres.triton import common
from fusedres.triton import prologue as tpro

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
CL = torch.channels_last
EPS32 = torch.finfo(torch.float32).eps
FORMATS = {"nchw": torch.contiguous_format, "cl": CL}


def poison_empty(*args, **kwargs):
    """common.empty with NaN-filled floating-point buffers (integer ones, the conv kernel's
    statistics counts, stay as allocated)."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(common, "empty", poison_empty)


def record_bn_kernels(monkeypatch, record):
    """Make the kernels of the BatchNorm ops call record(name) when they run: bn_stats,
    scale_bias_act, scale_bias_act_backward and bn_stats_backward, which is
    conv_bn_stats_grad_y without grad_y (other calls of it are conv_bn_stats backwards)."""
    for name in ("bn_stats", "scale_bias_act", "scale_bias_act_backward"):
        real = getattr(tbn, name)
        monkeypatch.setattr(tbn, name, lambda *a, _real=real, _name=name: record(_name) or _real(*a))
    real = tpro.conv_bn_stats_grad_y
    monkeypatch.setattr(tpro, "conv_bn_stats_grad_y",
                        lambda gy, *a: (gy is None and record("bn_stats_backward")) or real(gy, *a))


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # F.conv2d in the block tests


def _act(shape, dtype, fmt="nchw", scale=1.0, shift=0.0):
    t = torch.randn(shape, dtype=torch.float64) * scale + shift
    return t.to(DEVICE, dtype).contiguous(memory_format=FORMATS[fmt])


def _vec(c, dtype=torch.float32):
    return torch.randn(c, dtype=torch.float64).to(DEVICE, dtype)


def _d(t):
    return None if t is None else t.detach().double().cpu()


def _canonical_stride(t):
    return torch.empty(t.shape).contiguous(memory_format=reference.suggest_memory_format(t)).stride()


def _check_elementwise(actual, exact, mag, what):
    """|actual - exact| <= 2*eps32*mag + eps_out*max(|exact|, tiny_out) elementwise (see the
    module doc; below the smallest normal number tiny_out the spacing of the output dtype is
    eps_out*tiny_out, e.g. 6e-8 for float16)."""
    info = torch.finfo(actual.dtype)
    assert torch.equal(actual.isnan().cpu(), exact.isnan()), f"{what}: NaNs differ"
    ok = ~exact.isnan()
    err = (actual.double().cpu() - exact).abs()[ok]
    bound = (2 * EPS32 * mag + info.eps * exact.abs().clamp(min=info.smallest_normal))[ok]
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max error / bound = {worst:.3f}"


def _check_sum(actual, exact, magnitude_sum, m, what):
    """A per-channel sum of m terms: |actual - exact| <= (m+2)*eps32*sum|terms|."""
    assert actual.dtype == torch.float32 and actual.shape == exact.shape, what
    assert torch.equal(actual.isnan().cpu(), exact.isnan()), f"{what}: NaNs differ"
    ok = ~exact.isnan()
    err = (actual.double().cpu() - exact).abs()[ok]
    worst = (err / ((m + 2) * EPS32 * magnitude_sum[ok] + 1e-300)).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max error / bound = {worst:.3f}"


SHAPES = [
    pytest.param((2, 5, 3, 5), id="2x5x3x5"),
    pytest.param((2, 40, 7, 5), id="2x40x7x5"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


# ---------------------------------------------------------------------------------------
# bn_stats


def _check_stats(y, mean, var):
    exact_mean, exact_var = reference.bn_stats(_d(y))
    m = y.numel() // y.shape[1]
    r = (_d(y) - exact_mean.reshape(1, -1, 1, 1)).abs().amax(dim=(0, 2, 3))
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (y.shape[1],)
    mean_err = (mean.double().cpu() - exact_mean).abs()
    assert (mean_err <= EPS32 * exact_mean.abs() + (m + 2) * EPS32 * r).all(), mean_err.max()
    var_err = (var.double().cpu() - exact_var).abs()
    assert (var_err <= 4 * (m + 4) * EPS32 * r.square()).all(), var_err.max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [*SHAPES, pytest.param((3, 17, 4, 5), id="3x17x4x5")])
def test_bn_stats_matches_reference(shape, fmt, dtype):
    y = _act(shape, dtype, fmt, scale=2.0, shift=0.5)
    _check_stats(y, *tbn.bn_stats(y))


def test_bn_stats_large_mean(monkeypatch):
    """1e4 + N(0, 1) in fp32 over 4096 pixels (128 tiles): the variance must be ~1 to
    fp32 precision, not to mean^2 * eps32 ~ 12. The kernel only sums deviations from each
    tile's mean (|d| <= a few units) and combines the tiles in fp64, so the bound of
    `_check_stats` applies with R ~ 4: ~4e-3 absolute worst case by the gamma bound, observed
    ~1e-7. We assert 1e-4 relative, 25x the (log2(32) + few) * eps32 ~ 4e-6 that tree or
    32-term sequential tile sums give, and show that the naive E[y^2] - E[y]^2 in fp32
    (what a one-pass sum / sum-of-squares kernel computes) is far outside it."""
    y = _act((16, 3, 16, 16), torch.float32, "cl", scale=1.0, shift=1e4)
    mean, var = tbn.bn_stats(y)
    _check_stats(y, mean, var)
    exact_mean, exact_var = reference.bn_stats(_d(y))
    assert ((var.double().cpu() - exact_var).abs() <= 1e-4 * exact_var).all(), (var, exact_var)
    assert ((mean.double().cpu() - exact_mean).abs() <= EPS32 * exact_mean.abs()).all()
    y32 = y.float()
    naive = y32.square().mean(dim=(0, 2, 3)) - y32.mean(dim=(0, 2, 3)).square()
    assert ((naive.double().cpu() - exact_var).abs() > 1e-4 * exact_var).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_bn_stats_nan_and_inf_like_reference():
    y = _act((2, 6, 5, 7), torch.float32, "cl")
    y[1, 1, 2, 3] = float("nan")
    y[0, 3, 4, 6] = float("inf")
    y[1, 4, 0, 0] = float("-inf")
    mean, var = tbn.bn_stats(y)
    exact_mean, exact_var = reference.bn_stats(y.cpu())
    for actual, exact in ((mean, exact_mean), (var, exact_var)):
        assert torch.equal(actual.isnan().cpu(), exact.isnan())
        assert torch.equal(actual.isposinf().cpu(), exact.isposinf())
        assert torch.equal(actual.isneginf().cpu(), exact.isneginf())
    finite = exact_var.isfinite()
    assert finite.sum() == 3


def test_bn_stats_empty_and_constant():
    mean, var = tbn.bn_stats(torch.empty(0, 3, 4, 4, device=DEVICE))
    assert mean.isnan().all() and var.isnan().all()  # torch.mean of nothing
    y = torch.full((2, 3, 5, 7), 3.7, device=DEVICE)
    mean, var = tbn.bn_stats(y)
    assert torch.equal(var, torch.zeros(3, device=DEVICE)) and torch.allclose(mean, torch.full_like(mean, 3.7))


# ---------------------------------------------------------------------------------------
# scale_bias_act


def _sba_inputs(shape, dtype, y_fmt, r_fmt, residual, r_dtype=None):
    c = shape[1]
    y = _act(shape, dtype, y_fmt, scale=2.0)
    r = rs = rb = None
    if residual in ("identity", "scaled"):
        r = _act(shape, r_dtype or dtype, r_fmt)
    if residual == "scaled":
        rs, rb = _vec(c), _vec(c)
    return y, _vec(c), _vec(c), r, rs, rb


def _sba_exact(y, scale, bias, r, rs, rb, relu):
    exact = reference.scale_bias_act(*map(_d, (y, scale, bias, r, rs, rb)), relu)
    mag = reference.scale_bias_act(*[None if t is None else _d(t).abs() for t in (y, scale, bias, r, rs, rb)],
                                   False)
    return exact, mag


RESIDUALS = ["none", "identity", "scaled"]
LAYOUTS = [pytest.param(("nchw", "nchw"), id="nchw"), pytest.param(("cl", "cl"), id="cl"),
           pytest.param(("cl", "nchw"), id="cl-y-nchw-res")]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scale_bias_act_matches_reference(shape, dtype, layout, residual, relu):
    args = _sba_inputs(shape, dtype, *layout, residual)
    out = tbn.scale_bias_act(*args, relu)
    exact, mag = _sba_exact(*args, relu)
    assert out.dtype == dtype and out.stride() == _canonical_stride(args[0])
    _check_elementwise(out, exact, mag, "out")


@pytest.mark.parametrize("r_dtype", [torch.float32, torch.float64], ids=["fp32-res", "fp64-res"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scale_bias_act_mixed_dtypes(dtype, r_dtype):
    """Under autocast the identity shortcut can arrive in float32 next to a low-precision y:
    it is added in fp32 (bf16 also checks the interpreter's truncating cast, see the doc)."""
    args = _sba_inputs((2, 24, 5, 5), dtype, "cl", "nchw", "identity", r_dtype)
    args = (*args[:3], args[3] * 100, *args[4:])
    out = tbn.scale_bias_act(*args, True)
    exact, mag = _sba_exact(*args, True)
    assert out.dtype == dtype
    _check_elementwise(out, exact, mag, "out")


def test_scale_bias_act_nan_propagates():
    y, scale, bias, r, rs, rb = _sba_inputs((2, 7, 5, 5), torch.float32, "cl", "cl", "scaled")
    y[0, 2, 1, 1] = float("nan")
    r[1, 5, 3, 4] = float("nan")
    y[1, 1, 0, 0] = float("-inf")
    out = tbn.scale_bias_act(y, scale, bias, r, rs, rb, True)
    expected = reference.scale_bias_act(y, scale, bias, r, rs, rb, True)
    assert out.isnan().sum() == 2 and torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())


# ---------------------------------------------------------------------------------------
# Backward kernels against torch.autograd of the reference in float64

NEEDS = [
    pytest.param((True,) * 6, id="all"),
    pytest.param((True, False, False, False, False, True), id="dy-dresbias"),
    pytest.param((False, True, True, True, True, False), id="sums-dres"),
]


def _sba_backward_case(shape, dtype, layout, residual, relu, needs):
    args = _sba_inputs(shape, dtype, *layout, residual)
    y, scale, bias, r, rs, rb = args
    out = tbn.scale_bias_act(*args, relu)
    grad = _act(shape, dtype, layout[0])
    actual = tbn.scale_bias_act_backward(grad, out if relu else None, y, scale, r, rs, needs)

    leaves = [None if t is None else _d(t).requires_grad_(True) for t in args]
    exact_out = reference.scale_bias_act(*leaves, relu)
    present = [t for t in leaves if t is not None]
    exact = dict(zip([i for i, t in enumerate(leaves) if t is not None],
                     torch.autograd.grad(exact_out, present, _d(grad))))
    g = _d(grad).masked_fill(exact_out.detach() <= 0, 0) if relu else _d(grad)
    return args, actual, exact, g


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("layout", LAYOUTS[:2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scale_bias_act_backward_matches_autograd(shape, dtype, layout, residual, relu, needs):
    (y, scale, bias, r, rs, rb), actual, exact, g = _sba_backward_case(shape, dtype, layout, residual, relu,
                                                                        needs)
    want = tbn.sba_backward_outputs(needs, r, rs)
    assert [a is not None for a in actual] == list(want)
    m = shape[0] * shape[2] * shape[3]
    dims = (0, 2, 3)
    if want[0]:
        assert actual[0].dtype == dtype and actual[0].stride() == _canonical_stride(y)
        _check_elementwise(actual[0], exact[0], (g * _d(scale).reshape(1, -1, 1, 1)).abs(), "dy")
    if want[1]:
        _check_sum(actual[1], exact[1], (g * _d(y)).abs().sum(dims), m, "dscale")
    if want[2]:
        _check_sum(actual[2], exact[2], g.abs().sum(dims), m, "dbias")
    if want[3]:
        assert actual[3].dtype == r.dtype and actual[3].stride() == _canonical_stride(r)
        factor = _d(rs).reshape(1, -1, 1, 1) if rs is not None else 1.0
        _check_elementwise(actual[3], exact[3], (g * factor).abs(), "dresidual")
    if want[4]:
        _check_sum(actual[4], exact[4], (g * _d(r)).abs().sum(dims), m, "dresidual_scale")
    if want[5]:
        _check_sum(actual[5], exact[5], g.abs().sum(dims), m, "dresidual_bias")
        if want[2]:
            assert actual[5].data_ptr() != actual[2].data_ptr()


def test_scale_bias_act_backward_nothing_needed_and_empty_batch():
    y, scale, bias, r, rs, rb = _sba_inputs((2, 6, 3, 3), torch.float32, "cl", "cl", "scaled")
    assert tbn.scale_bias_act_backward(y, None, y, scale, r, rs, (False,) * 6) == (None,) * 6
    e = y[:0]
    dy, dscale, dbias, dr, drs, drb = tbn.scale_bias_act_backward(e, e, e, scale, r[:0], rs, (True,) * 6)
    assert dy.shape == dr.shape == (0, 6, 3, 3)
    for s in (dscale, dbias, drs, drb):
        assert torch.equal(s, torch.zeros(6, device=DEVICE))


def test_scale_bias_act_backward_nan():
    """A NaN output passes its gradient (masked_fill(out <= 0) leaves it), a NaN in y
    poisons that channel's dscale only."""
    y, scale, bias, r, rs, rb = _sba_inputs((2, 6, 5, 5), torch.float32, "cl", "cl", "scaled")
    y[1, 2, 3, 3] = float("nan")
    out = tbn.scale_bias_act(y, scale, bias, r, rs, rb, True)
    grad = _act(y.shape, torch.float32, "cl")
    actual = tbn.scale_bias_act_backward(grad, out, y, scale, r, rs, (True,) * 6)
    expected = BACKENDS["torch"].scale_bias_act_backward(grad, out, y, scale, r, rs, (True,) * 6)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a.isnan(), e.isnan()), i
    assert actual[1].isnan().sum() == 1 and actual[0].isnan().sum() == 0


GRADS = [pytest.param((True, True), id="mean-var"), pytest.param((True, False), id="mean"),
         pytest.param((False, True), id="var")]


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_stats_backward_matches_autograd(shape, dtype, fmt, grads):
    y = _act(shape, dtype, fmt, scale=2.0, shift=3.0)
    mean, _ = tbn.bn_stats(y)
    c, m = shape[1], y.numel() // shape[1]
    gm = _vec(c) if grads[0] else None
    gv = _vec(c) if grads[1] else None
    dy = tpro.conv_bn_stats_grad_y(None, y, mean, gm, gv)
    assert dy.dtype == dtype and dy.stride() == _canonical_stride(y)

    y64 = _d(y).requires_grad_(True)
    mean64, var64 = reference.bn_stats(y64)
    outs, gouts = zip(*[(o, _d(g)) for o, g in ((mean64, gm), (var64, gv)) if g is not None])
    (exact,) = torch.autograd.grad(outs, y64, gouts)

    def ch(t):
        return t.reshape(1, -1, 1, 1)

    mag = torch.zeros(())
    if gm is not None:
        mag = mag + ch(_d(gm)).abs() / m
    if gv is not None:
        # The kernel uses the fp32 mean of the forward: its rounding moves every y - mean.
        shift = (_d(mean) - mean64.detach()).abs()
        mag = mag + ((y64.detach() - ch(mean64.detach())).abs() + ch(shift) / EPS32) * ch(_d(gv)).abs() * 2 / m
    _check_elementwise(dy, exact, mag.expand(shape), "dy")


# ---------------------------------------------------------------------------------------
# The backend and the ops


def test_ops_on_triton_backend_run_the_triton_kernels_forward_and_backward(monkeypatch):
    calls = []
    record_bn_kernels(monkeypatch, calls.append)
    y = _act((2, 6, 5, 5), torch.float32, "cl").requires_grad_(True)
    r = _act((2, 6, 5, 5), torch.float32, "cl").requires_grad_(True)
    mean, var = fusedres.ops.bn_stats(y, "triton")
    scale = torch.rsqrt(var + 1e-5)
    out = fusedres.ops.scale_bias_act(y, scale, -mean * scale, r, None, None, True, "triton")
    out.square().sum().backward()
    assert sorted(calls) == ["bn_stats", "bn_stats_backward", "scale_bias_act", "scale_bias_act_backward"]
    # The same on the torch backend, compared: float32 both ways.
    y2, r2 = y.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    mean2, var2 = fusedres.ops.bn_stats(y2, "torch")
    scale2 = torch.rsqrt(var2 + 1e-5)
    out2 = fusedres.ops.scale_bias_act(y2, scale2, -mean2 * scale2, r2, None, None, True, "torch")
    out2.square().sum().backward()
    assert len(calls) == 4, "the torch backend ran a Triton kernel"
    assert_close_scaled(out, out2, 1e-5, "out")
    assert_close_scaled(y.grad, y2.grad, 1e-5, "y.grad")
    assert_close_scaled(r.grad, r2.grad, 1e-5, "residual.grad")


def test_declines_cpu_without_interpreter_and_float64(monkeypatch):
    from fusedres.backends import UnsupportedInputError

    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(UnsupportedInputError, match="cannot run bn_stats: float64 is not supported"):
        fusedres.ops.bn_stats(y.double().to(DEVICE), "triton")
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(UnsupportedInputError, match="cannot run scale_bias_act: inputs are on cpu.*TRITON_INTERPRET=1"):
        fusedres.ops.scale_bias_act(y, torch.ones(3), torch.zeros(3), None, None, None, True, "triton")
    # auto never picks triton for CPU tensors, interpreter or not.
    assert fusedres.backends.select_backend("auto", StatsInputs(y)) is not BACKENDS["triton"]


def test_backward_ops_opcheck():
    """The opaque backward ops of the triton backend: schema, fake (shapes, strides,
    placeholders for gradients not computed) and AOT dispatch."""
    y, scale, bias, r, rs, rb = _sba_inputs((2, 6, 3, 5), torch.float32, "cl", "nchw", "scaled")
    out = tbn.scale_bias_act(y, scale, bias, r, rs, rb, True)
    op = torch.ops.fusedres.triton_scale_bias_act_backward.default
    torch.library.opcheck(op, (out, out, y, scale, r, rs, [True] * 6))
    torch.library.opcheck(op, (out, None, y, scale, None, None, [True, False, True, False, False, False]))
    mean, _ = tbn.bn_stats(y)
    torch.library.opcheck(torch.ops.fusedres.triton_conv_bn_stats_grad_y.default, (None, y, mean, mean, None))


@pytest.mark.parametrize("residual", ["identity", "scaled"])
def test_public_ops_opcheck_on_triton(residual):
    """fusedres::scale_bias_act / bn_stats with backend="triton": fake, autograd
    registration and AOT dispatch (its backward traced through the backward ops)."""
    y, scale, bias, r, rs, rb = _sba_inputs((2, 6, 3, 5), torch.float32, "cl", "cl", residual)
    tensors = [t if t is None else t.requires_grad_(True) for t in (y, scale, bias, r, rs, rb)]
    torch.library.opcheck(torch.ops.fusedres.scale_bias_act.default, (*tensors, True, "triton"))
    torch.library.opcheck(torch.ops.fusedres.bn_stats.default, (y, "triton"))


# ---------------------------------------------------------------------------------------
# Whole blocks in train mode against torchvision in float64


def _block_pair(kind, inplanes, planes, stride):
    tv_cls, fused_cls = (tv.BasicBlock, fusedres.BasicBlock) if kind == "basic" else (tv.Bottleneck,
                                                                                     fusedres.Bottleneck)
    out = planes * tv_cls.expansion
    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) \
        if stride != 1 or inplanes != out else None
    ref = randomize_bn(tv_cls(inplanes, planes, stride, downsample))
    fused = fused_cls(inplanes, planes, stride, copy.deepcopy(downsample), backend="triton")
    fused.load_state_dict(ref.state_dict())
    return ref.double(), fused.to(DEVICE)


def _block_rtol(ref: nn.Module, x: torch.Tensor) -> float:
    """max-abs error relative to max|expected| for a float32 block vs float64.

    Every value is a chain of reductions: conv sums of K = Cin/groups*KH*KW terms (input
    grads too), BN statistics and BN / weight gradients summed over M = N*H*W pixels. The
    rounding errors of a length-L fp32 sum add up like a random walk, ~sqrt(L)*eps32
    relative to the magnitude of the sum (the worst case, L*eps32, needs every rounding to
    go the same way), and each layer's error passes through the later layers with O(1)
    gain (Kaiming weights, BN scales near 1, normalised activations). Forward and backward
    each pass through the block's convs and BNs, so we allow
    4 * 2 * (number of convs) * sqrt(max(K, M)) * eps32 (3e-5 to 4e-5 here; observed <= 6e-7); a
    semantic slip (a wrong count, a biased/unbiased mix-up, a missing gradient term) is
    1e-2 or worse at these sizes.
    """
    convs = [m for m in ref.modules() if isinstance(m, nn.Conv2d)]
    k = max(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] for m in convs)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    return 4 * 2 * len(convs) * math.sqrt(max(k, m)) * EPS32


def _train_steps(model, x, steps=2, lr=0.01, frozen=()):
    """`steps` SGD steps on loss = mean(out * proj) (fixed projections), with the BNs named
    in `frozen` in eval mode; per step the output, the input grad and the parameter grads,
    as float64 on the CPU."""
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    records = []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        proj = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        opt.zero_grad()
        (out * proj).mean().backward()
        records.append({"output": _d(out), "input grad": _d(xi.grad),
                        **{f"grad of {n}": _d(p.grad) for n, p in model.named_parameters()}})
        opt.step()
    return records


TRAIN_BLOCKS = [
    pytest.param("basic", 8, 16, 2, "nchw", (), id="basic-stride2-downsample"),
    pytest.param("basic", 8, 8, 1, "cl", (), id="basic-identity-channels_last"),
    pytest.param("bottleneck", 16, 8, 2, "nchw", (), id="bottleneck-stride2-downsample"),
    pytest.param("bottleneck", 16, 8, 2, "cl", (), id="bottleneck-stride2-downsample-channels_last"),
    # One frozen BN (fine-tuning): the other BNs take the per-pair path, bn_stats + scale_bias_act.
    pytest.param("bottleneck", 16, 8, 2, "cl", ("bn1",), id="bottleneck-stride2-downsample-bn1-frozen"),
    pytest.param("basic", 8, 16, 2, "nchw", ("downsample.1",), id="basic-stride2-downsample-frozen"),
]


@pytest.mark.parametrize("kind,inplanes,planes,stride,fmt,frozen", TRAIN_BLOCKS)
def test_block_train_float32_against_torchvision_float64(kind, inplanes, planes, stride, fmt, frozen, monkeypatch):
    calls = set()
    record_bn_kernels(monkeypatch, calls.add)
    ref, fused = _block_pair(kind, inplanes, planes, stride)
    x = torch.randn(2, inplanes, 9, 7, dtype=torch.float64)
    xf = x.float().to(DEVICE).contiguous(memory_format=FORMATS[fmt])
    if fmt == "cl":
        fused = fused.to(memory_format=CL)
    expected = _train_steps(ref, x, frozen=frozen)
    actual = _train_steps(fused, xf, frozen=frozen)
    # The block tail always runs scale_bias_act. With every BN in training the block is a
    # chain of conv_bn_stats ops (fusedres.ops.conv_train) whose conv kernel computes the
    # statistics in its epilogue and whose backward folds their gradient, so bn_stats and
    # bn_stats_backward run only when a BN takes the per-pair path (frozen BN).
    assert {"scale_bias_act", "scale_bias_act_backward"} <= calls
    if frozen:
        assert {"bn_stats", "bn_stats_backward"} <= calls
    rtol = _block_rtol(ref, x)
    for step, (exp, act) in enumerate(zip(expected, actual)):
        assert exp.keys() == act.keys()
        for what, e in exp.items():
            assert_close_scaled(act[what], e, rtol, f"{what} in step {step}")
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert buf.item() == ref_buffers[name].item(), name
        else:
            assert_close_scaled(_d(buf), ref_buffers[name], rtol, f"buffer {name} after 2 steps")


def test_compile_fullgraph_train_block_on_triton_backend(monkeypatch):
    """torch.compile traces a train-mode block on the triton backend, forward and backward,
    without graph breaks; at run time the opaque ops run the Triton kernels (on a CPU in the
    interpreter)."""
    torch._dynamo.reset()
    ref, fused = _block_pair("bottleneck", 16, 4, 2)
    x = torch.randn(2, 16, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    twin = copy.deepcopy(fused).train()
    xe = x.clone().requires_grad_(True)
    twin(xe).square().sum().backward()
    calls = []
    real = tbn.scale_bias_act_backward
    monkeypatch.setattr(tbn, "scale_bias_act_backward", lambda *a: calls.append(1) or real(*a))
    xc = x.clone().requires_grad_(True)
    compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
    compiled(xc).square().sum().backward()
    assert calls  # at least the block tail's scale_bias_act
    assert_close_scaled(xc.grad, xe.grad, 1e-5, "input grad")
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        assert_close_scaled(p.grad, q.grad, 1e-5, f"grad of {name}")


# ---------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,inplanes,planes,stride,fmt,frozen", TRAIN_BLOCKS[2:4])
def test_block_train_autocast_gpu(kind, inplanes, planes, stride, fmt, frozen, dtype):
    """AMP training step: our output and grads may be off from float64 by at most 2x
    torchvision's own (same autocast dtype) error, plus a small floor."""
    ref, fused = _block_pair(kind, inplanes, planes, stride)
    x = torch.randn(8, inplanes, 28, 28, dtype=torch.float64)
    exact = _train_steps(ref, x, steps=1)[0]
    theirs_model = copy.deepcopy(ref).float().to("cuda", memory_format=CL)
    xc = x.float().cuda().contiguous(memory_format=CL)
    with torch.autocast("cuda", dtype=dtype):
        theirs = _train_steps(theirs_model, xc, steps=1)[0]
        ours = _train_steps(fused.to(memory_format=CL), xc, steps=1)[0]
    for what, e in exact.items():
        scale = e.abs().max().item()
        err_ours = (ours[what] - e).abs().max().item() / scale
        err_theirs = (theirs[what] - e).abs().max().item() / scale
        assert err_ours <= 2 * err_theirs + 4 * torch.finfo(dtype).eps, (what, err_ours, err_theirs)


@pytest.mark.gpu
def test_compile_inductor_train_resnet18_triton_gpu():
    torch._dynamo.reset()
    model = randomize_bn(fusedres.models.resnet18(num_classes=10, backend="triton")).cuda().train()
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    twin = copy.deepcopy(model)
    expected = twin(x)
    expected.square().mean().backward()
    actual = torch.compile(model, fullgraph=True)(x)
    actual.square().mean().backward()
    assert_close_scaled(actual.detach().float(), expected.detach().float(), 1e-3, "logits")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close_scaled(p.grad, q.grad, 1e-2, f"grad of {name}")
