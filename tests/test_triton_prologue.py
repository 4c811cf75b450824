"""The Triton kernels of conv_bn_stats' backward (fusedres.triton.prologue): each against the
PyTorch default of `fusedres.backends.base.Backend` (the definition) evaluated in float64,
their custom ops, and the triton backend running them in train-mode blocks, eager and
under torch.compile.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1)
with 16-channel tiles of 256 elements, so C = 5 and 24 and N*H*W = 30..75 cover one and
two channel tiles, several row tiles and their masked tails. Every buffer the launchers
allocate is pre-filled with NaN (`_poison`), so an element or a partial sum a kernel
fails to write shows up as NaN where the reference has none.

Error bounds (u32 = eps32/2 is float32's unit roundoff; mag is the float64 value of the
formula with every operand replaced by its magnitude, which bounds every rounding made
while combining them; the output cast adds eps_out*max(|exact|, tiny_out), eps_out for
truncation as the interpreter does for bf16, see test_triton_bn.py's `_check_elementwise`):

* prologue, x*scale + shift: two fp32 roundings, <= 2*u32*mag; the ReLU adds none (a sign
  flipped by rounding leaves an error <= |exact| <= 2*u32*mag).
* prologue_backward's dx = ga*scale: one rounding. Its ReLU mask is taken from the fp32
  pre-activation, as the default's is; the float64 reference takes it from the float64
  one, which can differ only where |pre| <= 2*u32*mag (none in these seeded inputs).
* conv_bn_stats_grad_y: the grad_var term goes through y - mean, *grad_var, *(2/count)
  with 2/count itself rounded to fp32: 4 roundings; grad_mean/count one; the two adds one
  each, relative to the partial sums (<= mag): <= 6*u32*mag = 3*eps32*mag in all.
  (These two use `test_triton_bn._check_elementwise`'s 2*eps32*mag, grad_y its own 3*eps32.)
* dscale = sum ga*x and dshift = sum ga over M = N*H*W terms: the gamma bound for any
  summation order plus the products' rounding, (M+2)*eps32*sum|terms| (`_check_sum`).
* whole blocks: `test_triton_bn._block_rtol`.
"""

from __future__ import annotations

import copy

import pytest
import test_triton_bn as tb
import torch
from helpers import assert_close_scaled

from fusedres.backends import BACKENDS
from fusedres.backends.base import Backend
from fusedres.triton import common
from fusedres.triton import prologue as tpro

DEVICE, CL, EPS32 = tb.DEVICE, tb.CL, tb.EPS32
DEFAULT = Backend()  # the PyTorch definitions
KERNELS = ("conv_bn_stats_grad_y", "prologue", "prologue_backward")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(common, "empty", tb.poison_empty)


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _record_kernel_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in KERNELS:
        real = getattr(tpro, name)
        monkeypatch.setattr(tpro, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


SHAPES = [pytest.param((2, 5, 3, 7), id="2x5x3x7"), pytest.param((3, 24, 5, 5), id="3x24x5x5")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# (main tensor, incoming gradient): the gradient may arrive in another layout than the activation.
LAYOUTS = [pytest.param(("nchw", "nchw"), id="nchw"), pytest.param(("cl", "cl"), id="cl"),
           pytest.param(("cl", "nchw"), id="cl-grad-nchw")]


def _ch(t):
    return t.reshape(1, -1, 1, 1)


def _d(t):
    return tb._d(t)


def _check_format(actual, like, dtype):
    assert actual.dtype == dtype and actual.shape == like.shape
    assert actual.stride() == tb._canonical_stride(like), (actual.stride(), like.stride())


# ---------------------------------------------------------------------------------------
# conv_bn_stats_grad_y

GRADS = [pytest.param(g, id="-".join(n for n, on in zip(("gy", "gm", "gv"), g) if on) or "none")
         for g in [(a, b, c) for a in (True, False) for b in (True, False) for c in (True, False)]]


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_y_matches_default(shape, dtype, layout, grads):
    y = tb._act(shape, dtype, layout[0], scale=2.0, shift=3.0)
    c, m = shape[1], y.numel() // shape[1]
    mean = _d(y).mean(dim=(0, 2, 3)).float().to(DEVICE) + 1e-3  # fp32, as the forward's; not exact
    gy = tb._act(shape, dtype, layout[1]) if grads[0] else None
    gm = tb._vec(c) if grads[1] else None
    gv = tb._vec(c) if grads[2] else None
    g = tpro.conv_bn_stats_grad_y(gy, y, mean, gm, gv)
    _check_format(g, y, dtype)
    exact = DEFAULT.conv_bn_stats_grad_y(_d(gy), _d(y), _d(mean), _d(gm), _d(gv))
    mag = torch.zeros(shape, dtype=torch.float64)
    if gy is not None:
        mag = mag + _d(gy).abs()
    if gm is not None:
        mag = mag + _ch(_d(gm)).abs() / m
    if gv is not None:
        mag = mag + (_d(y) - _ch(_d(mean))).abs() * _ch(_d(gv)).abs() * 2 / m
    # 3*eps32*mag (module doc) = 1.5x `_check_elementwise`'s 2*eps32*mag.
    tb._check_elementwise(g, exact, 1.5 * mag, "g")
    if not any(grads):
        assert torch.equal(g.cpu(), torch.zeros(shape, dtype=dtype))


def test_grad_y_expanded_grad_and_empty_batch():
    """The gradient of out.sum() arrives expanded (stride 0); an empty batch gives an empty g."""
    y = tb._act((2, 6, 3, 5), torch.float32, "cl")
    mean, gm = tb._vec(6), tb._vec(6)
    gy = torch.ones((), device=DEVICE).expand(y.shape)
    g = tpro.conv_bn_stats_grad_y(gy, y, mean, gm, None)
    torch.testing.assert_close(g, DEFAULT.conv_bn_stats_grad_y(gy, y, mean, gm, None), rtol=2 * EPS32, atol=0)
    _check_format(g, y, torch.float32)
    e = tpro.conv_bn_stats_grad_y(y[:0], y[:0], mean, gm, tb._vec(6))
    assert e.shape == (0, 6, 3, 5)


# ---------------------------------------------------------------------------------------
# prologue


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prologue_matches_default(shape, dtype, fmt, relu):
    x = tb._act(shape, dtype, fmt, scale=2.0)
    scale, shift = tb._vec(shape[1]), tb._vec(shape[1])
    a = tpro.prologue(x, scale, shift, relu)
    _check_format(a, x, dtype)
    exact = DEFAULT.prologue(_d(x), _d(scale), _d(shift), relu)
    mag = _d(x).abs() * _ch(_d(scale)).abs() + _ch(_d(shift)).abs()
    tb._check_elementwise(a, exact, mag, "a")
    if relu:
        assert (a >= 0).all()


def test_prologue_nan_and_inf():
    x = tb._act((2, 6, 5, 7), torch.float32, "cl")
    scale, shift = tb._vec(6).abs() + 0.5, tb._vec(6)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("-inf")
    x[1, 4, 4, 6] = float("inf")
    for relu in (True, False):
        a = tpro.prologue(x, scale, shift, relu)
        expected = DEFAULT.prologue(x, scale, shift, relu)
        assert torch.equal(a.isnan(), expected.isnan()) and a.isnan().sum() == 1  # ReLU keeps NaN
        assert torch.equal(a.isinf(), expected.isinf())
        ok = expected.isfinite()
        torch.testing.assert_close(a[ok], expected[ok], rtol=2 * EPS32, atol=0)


# ---------------------------------------------------------------------------------------
# prologue_backward

NEEDS = [pytest.param((True, True, True), id="all"), pytest.param((True, False, False), id="dx"),
         pytest.param((False, True, True), id="sums"), pytest.param((False, False, True), id="dshift"),
         pytest.param((True, True, False), id="dx-dscale")]


def _backward_case(shape, dtype, layout, relu, needs, nan=False):
    x = tb._act(shape, dtype, layout[0], scale=2.0)
    if nan:
        x[0, 1, 1, 2] = float("nan")
    scale, shift = tb._vec(shape[1]), tb._vec(shape[1])
    ga = tb._act(shape, dtype, layout[1])
    actual = tpro.prologue_backward(ga, x, scale, shift, relu, needs)
    exact = DEFAULT.prologue_backward(_d(ga), _d(x), _d(scale), _d(shift), relu, needs)
    g = _d(ga)
    if relu:
        g = g.masked_fill(_d(x) * _ch(_d(scale)) + _ch(_d(shift)) <= 0, 0)
    return (x, scale), actual, exact, g


def _check_backward(x, scale, actual, exact, g, needs, dtype):
    assert [a is not None for a in actual] == list(needs)
    m = x.numel() // x.shape[1]
    dims = (0, 2, 3)
    if needs[0]:
        _check_format(actual[0], x, dtype)
        tb._check_elementwise(actual[0], exact[0], (g * _ch(_d(scale))).abs(), "dx")
    if needs[1]:
        tb._check_sum(actual[1], exact[1], (g * _d(x)).abs().sum(dims), m, "dscale")
    if needs[2]:
        tb._check_sum(actual[2], exact[2], g.abs().sum(dims), m, "dshift")


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("shape", SHAPES)
def test_prologue_backward_matches_default(shape, dtype, layout, relu, needs):
    (x, scale), actual, exact, g = _backward_case(shape, dtype, layout, relu, needs)
    _check_backward(x, scale, actual, exact, g, needs, dtype)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_prologue_backward_nan_in_x(dtype, relu):
    """A NaN pre-activation passes its gradient (masked_fill(pre <= 0) leaves it): dx stays
    finite there, only that channel's dscale is NaN, dshift has none."""
    (x, scale), actual, exact, g = _backward_case((2, 5, 3, 7), dtype, ("cl", "cl"), relu, (True,) * 3, nan=True)
    _check_backward(x, scale, actual, exact, g, (True,) * 3, dtype)
    dx, dscale, dshift = actual
    assert dx.isnan().sum() == 0 and dshift.isnan().sum() == 0
    assert dscale.isnan().tolist() == [False, True, False, False, False]
    assert dx[0, 1, 1, 2] != 0  # the gradient was kept, whatever the relu


def test_prologue_backward_deterministic_nothing_needed_and_empty_batch():
    x = tb._act((3, 24, 5, 5), torch.float32, "cl")
    scale, shift = tb._vec(24), tb._vec(24)
    ga = tb._act(x.shape, torch.float32, "nchw")
    first = tpro.prologue_backward(ga, x, scale, shift, True, (True,) * 3)
    second = tpro.prologue_backward(ga, x, scale, shift, True, (True,) * 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert tpro.prologue_backward(ga, x, scale, shift, True, (False,) * 3) == (None,) * 3
    dx, dscale, dshift = tpro.prologue_backward(ga[:0], x[:0], scale, shift, True, (True,) * 3)
    assert dx.shape == (0, 24, 5, 5)
    assert torch.equal(dscale, torch.zeros(24, device=DEVICE)) and torch.equal(dshift, torch.zeros(24, device=DEVICE))


# ---------------------------------------------------------------------------------------
# The custom ops and the backend


def test_ops_opcheck():
    """Schema, fake (shapes, strides, placeholders for gradients not computed) and AOT dispatch."""
    from fusedres.triton import ops

    for fmt in ("nchw", "cl"):
        x = tb._act((2, 6, 3, 5), torch.float32, fmt)
        ga = tb._act((2, 6, 3, 5), torch.float32, "cl")
        scale, shift = tb._vec(6), tb._vec(6)
        torch.library.opcheck(torch.ops.fusedres.triton_prologue.default, (x, scale, shift, True))
        op = torch.ops.fusedres.triton_prologue_backward.default
        torch.library.opcheck(op, (ga, x, scale, shift, True, [True, True, True]))
        torch.library.opcheck(op, (ga, x, scale, shift, False, [False, True, False]))
        op = torch.ops.fusedres.triton_conv_bn_stats_grad_y.default
        torch.library.opcheck(op, (ga, x, scale, scale, shift))
        torch.library.opcheck(op, (None, x, scale, None, shift))
    assert ops.prologue_backward(ga, x, scale, shift, True, (True, False, True))[1] is None


def test_backend_runs_kernels_and_keeps_float64_on_defaults(monkeypatch):
    calls = _record_kernel_calls(monkeypatch)
    triton = BACKENDS["triton"]
    x = tb._act((2, 6, 3, 5), torch.float32, "cl")
    scale, shift = tb._vec(6), tb._vec(6)
    triton.prologue(x, scale, shift, True)
    triton.prologue_backward(x, x, scale, shift, True, (True, True, True))
    triton.conv_bn_stats_grad_y(x, x, scale, None, shift)
    assert calls == list(KERNELS[1:]) + [KERNELS[0]]
    x64 = _d(x)
    for args, name in (((x64, _d(scale), _d(shift), True), "prologue"),
                       ((x64, x64, _d(scale), _d(shift), True, (True,) * 3), "prologue_backward"),
                       ((x64, x64, _d(scale), None, _d(shift)), "conv_bn_stats_grad_y")):
        ours, default = getattr(triton, name)(*args), getattr(DEFAULT, name)(*args)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), default if isinstance(default, tuple)
                        else (default,)):
            assert a.dtype == torch.float64 and torch.equal(a, b), name
    assert len(calls) == 3, "float64 ran a Triton kernel"


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_bottleneck_train_runs_kernels_and_matches_torchvision_float64(fmt, monkeypatch):
    """A train-mode Bottleneck (every BN on batch statistics: the conv_bn_stats chain) on
    backend="triton" runs all three kernels in its backward, and two SGD steps match
    torchvision in float64 within test_triton_bn's block tolerance."""
    calls = _record_kernel_calls(monkeypatch)
    ref, fused = tb._block_pair("bottleneck", 16, 8, 2)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    xf = x.float().to(DEVICE).contiguous(memory_format=tb.FORMATS[fmt])
    if fmt == "cl":
        fused = fused.to(memory_format=CL)
    expected = tb._train_steps(ref, x)
    actual = tb._train_steps(fused, xf)
    assert set(calls) == set(KERNELS)
    # Per step: conv1, conv2, conv3 and the downsample conv fold their statistics' gradient;
    # conv2 and conv3 recompute their prologue and push the gradient through it.
    assert sorted(calls) == sorted(["conv_bn_stats_grad_y"] * 8 + ["prologue"] * 4 + ["prologue_backward"] * 4)
    rtol = tb._block_rtol(ref, x)
    for step, (exp, act) in enumerate(zip(expected, actual)):
        assert exp.keys() == act.keys()
        for what, e in exp.items():
            assert_close_scaled(act[what], e, rtol, f"{what} in step {step}")


def test_compile_fullgraph_train_block_traces_the_kernel_ops(monkeypatch):
    """torch.compile(fullgraph=True, backend="aot_eager") traces a train-mode block on the
    triton backend, forward and backward (AOTAutograd traces conv_bn_stats' autograd
    formula through the kernels' fakes); at run time the opaque ops run the kernels."""
    torch._dynamo.reset()
    _, fused = tb._block_pair("bottleneck", 16, 4, 2)
    x = torch.randn(2, 16, 7, 7, device=DEVICE).contiguous(memory_format=CL)
    twin = copy.deepcopy(fused).train()
    xe = x.clone().requires_grad_(True)
    twin(xe).square().sum().backward()
    calls = _record_kernel_calls(monkeypatch)
    xc = x.clone().requires_grad_(True)
    compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
    compiled(xc).square().sum().backward()
    assert set(calls) == set(KERNELS)
    assert_close_scaled(xc.grad, xe.grad, 1e-5, "input grad")
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        assert_close_scaled(p.grad, q.grad, 1e-5, f"grad of {name}")
