"""fusedres.triton.conv_backward (conv_dgrad, conv_wgrad) against torch.ops.aten.convolution_backward
in float64.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
the shapes are tiny; they still cover several M tiles with tails, both K-loop variants of each
kernel (tap mode when the channels reduced per tap are a multiple of 16, flat mode otherwise),
every stride phase of dgrad (including phases without any contributing tap and empty phases)
and split-K in wgrad (including splits that get no pixels).

The inputs are made in float64 and rounded to the kernel's dtype; the reference is computed
from the rounded values in float64, so input rounding is not part of the error. Error bounds,
elementwise, with mag = the same backward of |grad_out|, |x|, |weight| (the sum of the
magnitudes of all terms of that output) and L the reduction length (dgrad: KH*KW*OCg terms;
wgrad: N*P*Q pixels, plus SPLIT for the sum of the split-K partials):

* accumulation: a dot product of L terms computed in fp32 in any order (tl.dot's blocking,
  FMAs, split-K partials summed afterwards: every term goes through at most L additions)
  errs by at most gamma_L * mag, gamma_L = L*u / (1 - L*u), u = eps32/2 (Higham, Accuracy and
  Stability of Numerical Algorithms, 3.1); fp16/bf16 products are exact in fp32. We allow
  L * eps32 * mag, i.e. ~2 gamma_L. This is the whole float32 bound (the fp32 output is not
  rounded again). It is loose but still sharp enough: on these shapes a 1% error of every
  output exceeds it 200x or more in float32 and 4x or more in float16 (measured).
* float16 / bfloat16 outputs add one rounding of the fp32 result: <= eps/2 * |ref| <= eps/2 * mag
  (round to nearest); we allow eps * mag. The interpreter truncates fp32 -> bf16, up to a full
  ulp: <= eps_bf16 * mag, we allow 2x that.
* float32 on a GPU with torch.backends.cudnn.allow_tf32 (TF32 dot, like cuDNN): each operand
  keeps 10 mantissa bits, <= 2**-9 relative per product -> 2**-9 * mag, we allow 2x that. The
  tests default to allow_tf32=False (IEEE) except test_float32_gpu.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedres.triton import common
from fusedres.triton import conv_backward as cb

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
CL = torch.channels_last
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _case(c, oc, hw, k, stride=1, pad=0, dil=1, groups=1, n=2, nchw=False):
    return dict(n=n, c=c, oc=oc, hw=hw, k=k, stride=stride, pad=pad, dil=dil, groups=groups, nchw=nchw)


# Modes: dgrad is in tap mode when OCg % 16 == 0, wgrad when Cg % 16 == 0 (flat mode otherwise).
CASES = {
    "1x1": _case(12, 20, (7, 9), 1),
    "1x1-s2-zero-phases": _case(20, 12, (7, 9), 1, stride=2),
    "3x3": _case(12, 20, (7, 9), 3, pad=1),
    "3x3-s2": _case(20, 12, (9, 7), 3, stride=2, pad=1),
    "3x3-dil2": _case(4, 12, (7, 9), 3, pad=2, dil=2),
    # stride 2, dilation 2: every tap of a phase contributes or none does.
    "3x3-s2-dil2": _case(12, 4, (7, 9), 3, stride=2, pad=1, dil=2),
    "3x3-pad3-allpadded-rows": _case(4, 3, (5, 6), 3, pad=3),
    "3x3-pad0": _case(3, 4, (7, 9), 3, pad=0, n=1),
    "7x7-stem-c3": _case(3, 20, (9, 9), 7, stride=2, pad=3, n=1),
    "7x7-s1-nchw": _case(4, 12, (7, 9), 7, pad=3, dil=1, n=1, nchw=True),
    "g4-cg3-ocg5": _case(12, 20, (7, 9), 3, pad=1, groups=4),
    "g4-cg5-s2-dil2": _case(20, 12, (9, 9), 3, stride=2, pad=1, dil=2, groups=4),
    "g4-depthwise-1x1-s2": _case(4, 4, (7, 9), 1, stride=2, groups=4, nchw=True),
    "dgrad-tap-s2": _case(12, 32, (7, 9), 3, stride=2, pad=1),
    "wgrad-tap-nchw": _case(32, 20, (7, 9), 3, pad=1, nchw=True),
    "g4-tap-both-s2": _case(64, 64, (5, 7), 3, stride=2, pad=1, groups=4, n=1),
    "3x3-s2-dil2-nchw": _case(20, 12, (7, 9), 3, stride=2, pad=1, dil=2, nchw=True),
}


def _params(*names):
    """pytest params of the named CASES (all of them without names), each id'd by its name."""
    return [pytest.param(CASES[name], id=name) for name in names or CASES]


def _sizes(cfg):
    h, w = cfg["hw"]
    k, s, p, d = cfg["k"], cfg["stride"], cfg["pad"], cfg["dil"]
    return (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1


def _inputs(cfg, dtype, device=DEVICE):
    """grad_out, x, weight: made in float64, rounded to dtype; NCHW cases get a channels_last weight."""
    n, c, oc, (h, w), k, g = cfg["n"], cfg["c"], cfg["oc"], cfg["hw"], cfg["k"], cfg["groups"]
    p, q = _sizes(cfg)
    fmt, wfmt = (torch.contiguous_format, CL) if cfg["nchw"] else (CL, torch.contiguous_format)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    weight = torch.randn(oc, c // g, k, k, dtype=torch.float64) / math.sqrt(c // g * k * k)
    grad = torch.randn(n, oc, p, q, dtype=torch.float64)
    return (grad.to(device, dtype).contiguous(memory_format=fmt), x.to(device, dtype).contiguous(memory_format=fmt),
            weight.to(device, dtype).contiguous(memory_format=wfmt))


def _conv_args(cfg):
    return dict(stride=(cfg["stride"],) * 2, padding=(cfg["pad"],) * 2, dilation=(cfg["dil"],) * 2,
                groups=cfg["groups"])


def _reference(grad, x, weight, stride, padding, dilation, groups):
    """(grad_input, grad_weight, their magnitudes) in float64 on the CPU."""
    def run(g, xx, w):
        gi, gw, _ = torch.ops.aten.convolution_backward(g, xx, w, None, list(stride), list(padding), list(dilation),
                                                        False, [0, 0], groups, [True, True, False])
        return gi, gw
    g, xx, w = (t.detach().cpu().double() for t in (grad, x, weight))
    return (*run(g, xx, w), *run(g.abs(), xx.abs(), w.abs()))


def _factor(length, dtype, out_dtype=None, interpreted=INTERPRET):
    """The bound's factor of mag (see the module docstring)."""
    out_dtype = out_dtype or dtype
    f = length * EPS[torch.float32]
    if dtype == torch.float32 and not interpreted and torch.backends.cudnn.allow_tf32:
        f += 2 * 2.0**-9
    if out_dtype == torch.bfloat16 and interpreted:
        f += 2 * EPS[out_dtype]
    elif out_dtype != torch.float32:
        f += EPS[out_dtype]
    return f


def _assert_within(name, got, ref, bound):
    assert not torch.isnan(got).any(), f"{name}: unwritten (NaN-poisoned) elements"
    err = (got.detach().cpu().double() - ref).abs()
    worst = (err / (bound + 1e-30)).max().item()
    assert worst <= 1.0, f"{name}: max error / bound = {worst:.3f} (max abs error {err.max().item():.3e})"


def _poisoned(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the launchers allocate (outputs, split-K partials) starts as NaN."""
    allocated = []

    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        allocated.append(t)
        return t.fill_(float("nan"))
    monkeypatch.setattr(common, "empty", empty)
    return allocated


def _check_dgrad(cfg, dtype, device=DEVICE, interpreted=INTERPRET):
    grad, x, weight = _inputs(cfg, dtype, device)
    a = _conv_args(cfg)
    gi_ref, _, gi_mag, _ = _reference(grad, x, weight, **a)
    out = _poisoned(x.shape, dtype, device)
    got = cb.conv_dgrad(grad, weight, x.shape, out=out, **a)
    assert got is out and got.dtype == dtype and got.shape == x.shape
    length = cfg["k"] ** 2 * (cfg["oc"] // cfg["groups"])
    _assert_within("grad_input", got, gi_ref, _factor(length, dtype, interpreted=interpreted) * gi_mag)


def _check_wgrad(cfg, dtype, device=DEVICE, interpreted=INTERPRET, split_k=None, out_dtype=None):
    grad, x, weight = _inputs(cfg, dtype, device)
    a = _conv_args(cfg)
    _, gw_ref, _, gw_mag = _reference(grad, x, weight, **a)
    out = _poisoned(weight.shape, out_dtype or dtype, device)
    got = cb.conv_wgrad(grad, x, weight.shape, out=out, split_k=split_k, out_dtype=out_dtype, **a)
    assert got is out and got.dtype == (out_dtype or dtype) and got.shape == weight.shape
    p, q = _sizes(cfg)
    length = cfg["n"] * p * q + (split_k or cb._MAX_SPLIT)
    _assert_within("grad_weight", got, gw_ref, _factor(length, dtype, out_dtype, interpreted) * gw_mag)
    return got, (grad, x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", _params())
def test_dgrad_matches_reference(cfg, dtype):
    _check_dgrad(cfg, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", _params())
def test_wgrad_matches_reference(cfg, dtype, poison):
    _check_wgrad(cfg, dtype)


@pytest.mark.parametrize("cfg", _params("3x3-s2", "g4-cg5-s2-dil2", "g4-tap-both-s2"))
def test_bfloat16_interpreted(cfg):
    if not INTERPRET:
        pytest.skip("interpreter-only tolerance; see test_bfloat16_gpu")
    _check_dgrad(cfg, torch.bfloat16)
    _check_wgrad(cfg, torch.bfloat16)


@pytest.mark.parametrize("split_k", [1, 3, 20])
def test_wgrad_split_k(split_k, poison):
    """Any split works (20 > the 8 pixel tiles of the interpreter's config: most splits reduce
    nothing and must store zeros into their NaN-poisoned partial rows) and the result is
    bitwise reproducible."""
    cfg = _case(4, 12, (15, 17), 3, pad=1, n=1)  # 255 pixels
    got, (grad, x, weight) = _check_wgrad(cfg, torch.float32, split_k=split_k)
    if split_k > 1:
        assert any(t.shape == (split_k, 12, 9 * 4) for t in poison), "no split-K partial buffer"
    assert torch.equal(cb.conv_wgrad(grad, x, weight.shape, padding=1, split_k=split_k), got)


def test_wgrad_fp32_output_of_fp16_inputs():
    # No final fp16 rounding: the bound is the accumulation's alone.
    _check_wgrad(CASES["3x3"], torch.float16, out_dtype=torch.float32, split_k=2)


def test_fresh_outputs(poison):
    """Fresh (NaN-poisoned) outputs: channels_last, fully written; int arguments accepted."""
    cfg = CASES["3x3-s2"]
    grad, x, weight = _inputs(cfg, torch.float32)
    gi_ref, gw_ref, gi_mag, gw_mag = _reference(grad, x, weight, (2, 2), (1, 1), (1, 1), 1)
    gi = cb.conv_dgrad(grad, weight, tuple(x.shape), 2, 1, 1, 1)
    gw = cb.conv_wgrad(grad, x, list(weight.shape), 2, 1, 1, 1)
    assert gi.is_contiguous(memory_format=CL) and gw.is_contiguous(memory_format=CL)
    assert gi.dtype == gw.dtype == torch.float32 and gi.shape == x.shape and gw.shape == weight.shape
    _assert_within("grad_input", gi, gi_ref, _factor(9 * 12, torch.float32) * gi_mag)
    _assert_within("grad_weight", gw, gw_ref, _factor(2 * 5 * 4 + cb._MAX_SPLIT, torch.float32) * gw_mag)


@pytest.mark.parametrize("hw, ksize, stride, pad, dil", [
    ((1, 3), (1, 1), (2, 2), (0, 0), (1, 1)),  # phase rh = 1 has no pixel at all (H = 1)
    ((2, 5), (3, 3), (3, 2), (1, 1), (1, 1)),  # stride 3 > H: phase rh = 2 is empty
    ((7, 9), (3, 1), (1, 2), (1, 0), (2, 1)),  # asymmetric kernel / stride / padding / dilation
    ((8, 6), (3, 3), (2, 2), (0, 0), (1, 1)),  # the last input row never reaches the output
])
def test_odd_geometries(hw, ksize, stride, pad, dil, poison):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    weight = torch.randn(12, 4, *ksize, dtype=torch.float64)
    p = (hw[0] + 2 * pad[0] - dil[0] * (ksize[0] - 1) - 1) // stride[0] + 1
    q = (hw[1] + 2 * pad[1] - dil[1] * (ksize[1] - 1) - 1) // stride[1] + 1
    grad = torch.randn(2, 12, p, q, dtype=torch.float64)
    gi_ref, gw_ref, gi_mag, gw_mag = _reference(grad, x, weight, stride, pad, dil, 1)
    g32, x32, w32 = (t.float().to(DEVICE) for t in (grad, x, weight))
    gi = cb.conv_dgrad(g32, w32, x.shape, stride, pad, dil, 1)
    gw = cb.conv_wgrad(g32, x32, w32.shape, stride, pad, dil, 1)
    _assert_within("grad_input", gi, gi_ref, _factor(ksize[0] * ksize[1] * 12, torch.float32) * gi_mag)
    _assert_within("grad_weight", gw, gw_ref, _factor(2 * p * q + cb._MAX_SPLIT, torch.float32) * gw_mag)


def test_empty_batch():
    grad = torch.randn(0, 8, 5, 5, device=DEVICE)
    x = torch.randn(0, 4, 5, 5, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    assert cb.conv_dgrad(grad, w, x.shape, padding=1).shape == (0, 4, 5, 5)
    gw = cb.conv_wgrad(grad, x, w.shape, padding=1)
    assert gw.shape == (8, 4, 3, 3) and torch.equal(gw, torch.zeros_like(gw))


def test_nan_propagates():
    grad = torch.randn(1, 8, 5, 5, device=DEVICE)
    grad[0, 3, 2, 2] = float("nan")
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    gi = cb.conv_dgrad(grad, w, x.shape, padding=1)
    assert gi.isnan().sum() == 9 * 4 and gi[0, :, 1:4, 1:4].isnan().all()
    gw = cb.conv_wgrad(grad, x, w.shape, padding=1)
    assert gw[3].isnan().all() and not gw[:3].isnan().any() and not gw[4:].isnan().any()


def test_prune_configs_fit_the_problem():
    f16 = torch.empty(1, dtype=torch.float16)
    f32 = torch.empty(1, dtype=torch.float32)
    full = cb._prune_dgrad_configs(cb._DGRAD_GPU_CONFIGS, {"M0": 10**5, "Cg": 256, "OCg": 256, "K_TOTAL": 2304,
                                                           "g_ptr": f16}, FLAT_K=False)
    assert len(full) == len(cb._DGRAD_GPU_CONFIGS)
    # ResNeXt 32x4d: 4 channels per group; flat mode.
    tiny = cb._prune_dgrad_configs(cb._DGRAD_GPU_CONFIGS, {"M0": 10**5, "Cg": 4, "OCg": 4, "K_TOTAL": 36,
                                                           "g_ptr": f16}, FLAT_K=True)
    assert all(c.kwargs["BLOCK_N"] == 16 and c.kwargs["BLOCK_K"] <= 64 for c in tiny)
    assert len({tuple(c.all_kwargs().items()) for c in tiny}) == len(tiny)
    # Tap mode: BLOCK_K chunks tile OCg (dgrad) / BLOCK_N chunks tile Cg (wgrad).
    for c in cb._prune_dgrad_configs(cb._DGRAD_GPU_CONFIGS, {"M0": 10**5, "Cg": 64, "OCg": 48, "K_TOTAL": 432,
                                                             "g_ptr": f16}, FLAT_K=False):
        assert 48 % c.kwargs["BLOCK_K"] == 0
    for c in cb._prune_wgrad_configs(cb._WGRAD_GPU_CONFIGS, {"M": 10**6, "SPLIT": 64, "Cg": 48, "OCg": 64,
                                                             "K_TOTAL": 432, "g_ptr": f16}, FLAT_K=False):
        assert 48 % c.kwargs["BLOCK_N"] == 0
    tiny = cb._prune_wgrad_configs(cb._WGRAD_GPU_CONFIGS, {"M": 100, "SPLIT": 4, "Cg": 4, "OCg": 4, "K_TOTAL": 36,
                                                           "g_ptr": f32}, FLAT_K=True)
    assert all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_K"] <= 32 for c in tiny)
    for c in cb._prune_wgrad_configs(cb._WGRAD_GPU_CONFIGS, {"M": 10**6, "SPLIT": 1, "Cg": 512, "OCg": 512,
                                                             "K_TOTAL": 4608, "g_ptr": f32}, FLAT_K=False):
        kw = c.kwargs
        assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4 <= common.SMEM_BUDGET


def test_default_split():
    cpu = torch.device("cpu")
    assert cb._default_split(10, 1, 100, cpu) == 1  # fewer pixels than a split's minimum
    assert cb._default_split(10**6, 1, 100, cpu) == cb._MAX_SPLIT
    assert cb._default_split(10**6, 1, cb._MAX_PARTIAL_BYTES // 4, cpu) == 1  # the partial buffer's cap


def _dg(**overrides):
    args = dict(grad_out=torch.randn(1, 8, 3, 3), weight=torch.randn(8, 4, 3, 3), input_shape=(1, 4, 5, 5))
    args.update(overrides)
    return lambda: cb.conv_dgrad(**args)


def _wg(**overrides):
    args = dict(grad_out=torch.randn(1, 8, 3, 3), x=torch.randn(1, 4, 5, 5), weight_shape=(8, 4, 3, 3))
    args.update(overrides)
    return lambda: cb.conv_wgrad(**args)


@pytest.mark.parametrize("call, exc, match", [
    pytest.param(_dg(weight=torch.randn(8, 4, 3)), ValueError, r"4-D weight, got shape \(8, 4, 3\)", id="d-rank"),
    pytest.param(_dg(input_shape=(1, 4, 5)), ValueError, "input_shape must be 4", id="d-input-shape"),
    pytest.param(_dg(grad_out=torch.randn(1, 8, 5, 5)), ValueError,
                 r"grad_out has shape \(1, 8, 5, 5\), expected the conv's output shape \(1, 8, 3, 3\)",
                 id="d-grad-shape"),
    pytest.param(_dg(input_shape=(1, 6, 5, 5)), ValueError, r"6 channels, expected weight.shape\[1\] \* groups",
                 id="d-channels"),
    pytest.param(_dg(groups=3, weight=torch.randn(8, 2, 3, 3), input_shape=(1, 6, 5, 5)), ValueError,
                 "multiple of groups=3", id="d-groups"),
    pytest.param(_dg(groups=0), ValueError, "groups must be a positive int", id="d-groups0"),
    pytest.param(_dg(weight=torch.randn(8, 4, 3, 3, dtype=torch.float16)), TypeError,
                 "weight has dtype torch.float16, expected grad_out's dtype torch.float32", id="d-dtype"),
    pytest.param(_dg(grad_out=torch.randn(1, 8, 3, 3, dtype=torch.float64),
                     weight=torch.randn(8, 4, 3, 3, dtype=torch.float64)), TypeError, "float64", id="d-float64"),
    pytest.param(_dg(stride=0), ValueError, "stride/dilation must be >= 1", id="d-stride"),
    pytest.param(_dg(padding=(1, 2, 3)), ValueError, "padding must be an int or a pair", id="d-padding"),
    pytest.param(_dg(input_shape=(1, 4, 2, 2)), ValueError, "output size .* is empty", id="d-too-small"),
    pytest.param(_dg(weight=torch.randn(8, 4, 3, 3, device="meta")), ValueError, "weight is on meta", id="d-device"),
    pytest.param(_dg(out=torch.empty(1, 4, 5, 5)), ValueError, "channels_last-contiguous", id="d-out-format"),
    pytest.param(_dg(out=torch.empty(1, 4, 5, 5, dtype=torch.float16)), TypeError, "out has dtype", id="d-out-dtype"),
    pytest.param(_wg(x=torch.randn(4, 5, 5)), ValueError, r"4-D x, got shape \(4, 5, 5\)", id="w-rank"),
    pytest.param(_wg(weight_shape=(8, 4, 3)), ValueError, "weight_shape must be 4", id="w-weight-shape"),
    pytest.param(_wg(grad_out=torch.randn(2, 8, 3, 3)), ValueError, r"grad_out has shape \(2, 8, 3, 3\)",
                 id="w-grad-shape"),
    pytest.param(_wg(x=torch.randn(1, 4, 5, 5, dtype=torch.float16)), TypeError,
                 "x has dtype torch.float16, expected grad_out's dtype", id="w-dtype"),
    pytest.param(_wg(grad_out=torch.zeros(1, 8, 3, 3, dtype=torch.int32), x=torch.zeros(1, 4, 5, 5, dtype=torch.int32)),
                 TypeError, "int32", id="w-int"),
    pytest.param(_wg(out_dtype=torch.float64), TypeError, "out_dtype must be", id="w-out-dtype"),
    pytest.param(_wg(split_k=0), ValueError, "split_k must be a positive int", id="w-split0"),
    pytest.param(_wg(out=torch.empty(8, 4, 3, 3)), ValueError, "channels_last-contiguous", id="w-out-format"),
    pytest.param(_wg(x=torch.randn(1, 4, 5, 5, device="meta")), ValueError, "x is on meta", id="w-device"),
])
def test_bad_input(call, exc, match):
    if DEVICE != "cpu":
        pytest.skip("the bad-input cases build CPU tensors")
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------
# GPU-only: real compilation and autotuning, bf16 with round-to-nearest, TF32, default split-K.


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _params())
def test_bfloat16_gpu(cfg):
    _check_dgrad(cfg, torch.bfloat16, device="cuda", interpreted=False)
    _check_wgrad(cfg, torch.bfloat16, device="cuda", interpreted=False, split_k=3)


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_gpu(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    cfg = _case(64, 128, (14, 14), 3, stride=2, pad=1, n=4)
    _check_dgrad(cfg, torch.float32, device="cuda", interpreted=False)
    _check_wgrad(cfg, torch.float32, device="cuda", interpreted=False, split_k=4)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [
    pytest.param(_case(64, 256, (28, 28), 1, n=16), id="1x1-long-reduction"),
    pytest.param(_case(128, 128, (28, 28), 3, stride=2, pad=1, groups=32, n=8), id="resnext-g32-s2"),
])
def test_default_split_gpu(cfg):
    """fp16 with the launcher's own split-K choice (many splits on a long reduction)."""
    grad, x, weight = _inputs(cfg, torch.float16, "cuda")
    a = _conv_args(cfg)
    gi_ref, gw_ref, gi_mag, gw_mag = _reference(grad, x, weight, **a)
    gw = cb.conv_wgrad(grad, x, weight.shape, **a)
    p, q = _sizes(cfg)
    _assert_within("grad_weight", gw, gw_ref, _factor(cfg["n"] * p * q + cb._MAX_SPLIT, torch.float16, None,
                                                      False) * gw_mag)
    gi = cb.conv_dgrad(grad, weight, x.shape, **a)
    length = cfg["k"] ** 2 * cfg["oc"] // cfg["groups"]
    _assert_within("grad_input", gi, gi_ref, _factor(length, torch.float16, None, False) * gi_mag)
