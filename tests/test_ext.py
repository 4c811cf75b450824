"""The fusedres._C extension's kernels (C++ on the CPU, CUDA on a GPU) against the PyTorch
definitions: `fusedres.reference` and the `Backend` defaults in fusedres/backends/base.py.

Tolerances: the kernels compute elementwise results in the accumulation dtype, as the
reference does, and per-channel sums in double; so results differ from the float64
reference by the rounding of the output dtype (a few ulps: RTOL below) and, for sums, by
that rounding scaled by the magnitude of the whole tensor (assert_close_scaled).
Outputs are never pre-filled: each kernel allocates its own with torch.empty, so an
unwritten element shows as garbage against the reference.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close_scaled, randomize_bn
from torch import nn

import fusedres
from fusedres import ext, reference
from fusedres.backends import BACKENDS, UnsupportedInputError

pytestmark = pytest.mark.skipif(bool(ext.load_error()), reason=ext.load_error() or "built")

E = torch.ops.fusedres
BASE = BACKENDS["torch"]  # the PyTorch formulas (Backend defaults)
CL = torch.channels_last
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# (N, C, H, W): C a multiple of 8 (vectorised CUDA path) or not, odd spatial sizes, a 1x1 map.
SHAPES = [(3, 16, 5, 7), (2, 6, 5, 4), (4, 24, 1, 1), (1, 5, 9, 3)]
LAYOUTS = [torch.contiguous_format, CL]


def _shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _act(shape, dtype, device, layout, scale=1.0, offset=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(device, dtype).contiguous(memory_format=layout)


def _vec(c, device, dtype=torch.float32):
    return torch.randn(c, dtype=torch.float64).to(device, dtype)


def _close(actual, expected, dtype, msg=""):
    assert actual.dtype == expected.dtype, msg
    assert actual.shape == expected.shape, msg
    assert reference.suggest_memory_format(actual) == reference.suggest_memory_format(expected), f"{msg}: layout"
    assert_close_scaled(actual.cpu(), expected.cpu(), RTOL[dtype], msg)


def _acc(dtype):
    return reference.accumulation_dtype(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(device, layout, shape, dtype):
    y = _act(shape, dtype, device, layout, scale=2.0, offset=0.5)
    mean, var = E.ext_bn_stats(y)
    exact_mean, exact_var = reference.bn_stats(y.double())
    assert mean.dtype == var.dtype == _acc(dtype)
    assert_close_scaled(mean.double().cpu(), exact_mean.cpu(), 1e-6 if dtype != torch.float64 else 1e-12, "mean")
    assert_close_scaled(var.double().cpu(), exact_var.cpu(), 1e-6 if dtype != torch.float64 else 1e-12, "var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_stats_large_mean_and_many_rows(device, layout):
    # mean/std = 1e5: E[y^2] - E[y]^2 in float32 would lose every digit of the variance.
    y = _act((64, 8, 32, 32), torch.float32, device, layout, scale=1e-1, offset=1e4)
    mean, var = E.ext_bn_stats(y)
    exact_mean, exact_var = reference.bn_stats(y.double())
    torch.testing.assert_close(mean.double().cpu(), exact_mean.cpu(), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double().cpu(), exact_var.cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_stats_non_finite_values_propagate_like_the_reference(device, layout):
    y = _act((2, 8, 3, 3), torch.float32, device, layout)
    y[0, 1, 0, 0] = float("inf")  # the first element: the CPU and CUDA kernels' shift
    y[1, 2, 1, 1] = float("nan")
    y[1, 3, 2, 0] = -float("inf")
    mean, var = E.ext_bn_stats(y)
    expected_mean, expected_var = reference.bn_stats(y.double())
    for ours, theirs in ((mean, expected_mean), (var, expected_var)):
        ours, theirs = ours.double().cpu(), theirs.cpu()
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
        assert torch.equal(ours[ours.isinf()], theirs[theirs.isinf()])


def test_bn_stats_of_an_empty_batch_is_nan():
    mean, var = E.ext_bn_stats(torch.empty(0, 3, 4, 4))
    assert mean.isnan().all() and var.isnan().all()


def _tail_args(shape, dtype, device, layout, residual):
    c = shape[1]
    y = _act(shape, dtype, device, layout)
    scale, bias = _vec(c, device, _acc(dtype)), _vec(c, device, _acc(dtype))
    r = rs = rb = None
    if residual:
        r = _act(shape, dtype, device, layout)
    if residual == "projection":
        rs, rb = _vec(c, device, _acc(dtype)), _vec(c, device, _acc(dtype))
    return y, scale, bias, r, rs, rb


def _unpack(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask's bits as a bool tensor in `like`'s memory order (the CPU kernels' layout)."""
    bits = (mask.cpu()[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    flat = bits.flatten()[: like.numel()].bool()
    if reference.suggest_memory_format(like) == CL:
        return flat.view(like.shape[0], like.shape[2], like.shape[3], like.shape[1]).permute(0, 3, 1, 2)
    return flat.view(like.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [None, "identity", "projection"])
@pytest.mark.parametrize("relu", [True, False])
def test_scale_bias_act_and_mask(device, layout, shape, dtype, residual, relu):
    args = _tail_args(shape, dtype, device, layout, residual)
    out, mask = E.ext_scale_bias_act(*args, relu)
    expected = reference.scale_bias_act(*[None if t is None else t.double() for t in args], relu).to(dtype)
    _close(out, expected, dtype)
    if not relu:
        assert mask.numel() == 0
        return
    assert mask.dtype == torch.uint8 and mask.numel() == (out.numel() + 7) // 8
    if device == "cpu":  # on CUDA the bits follow the channels_last order; the backward test covers them
        assert torch.equal(_unpack(mask, out), ~(out.cpu() <= 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [None, "identity", "projection"])
@pytest.mark.parametrize("relu", [True, False])
def test_scale_bias_act_backward(device, layout, shape, dtype, residual, relu):
    y, scale, bias, r, rs, rb = _tail_args(shape, dtype, device, layout, residual)
    out, mask = E.ext_scale_bias_act(y, scale, bias, r, rs, rb, relu)
    grad = _act(shape, dtype, device, layout)
    needs = (True, True, True, r is not None, rs is not None, rb is not None)
    actual = BACKENDS["cuda"].scale_bias_act_backward(grad, None, y, scale, r, rs, needs,
                                                      mask=mask if relu else None)
    expected = BASE.scale_bias_act_backward(grad, out if relu else None, y, scale, r, rs, needs)
    for name, a, e in zip(("dy", "dscale", "dbias", "dres", "dres_scale", "dres_bias"), actual, expected):
        assert (a is None) == (e is None), name
        if a is not None:
            rtol = RTOL[dtype] if a.dim() == 4 else max(RTOL[dtype], 1e-6)
            assert a.dtype == e.dtype, name
            assert_close_scaled(a.cpu(), e.cpu(), rtol, name)


@pytest.mark.parametrize("device", DEVICES)
def test_tail_nan_and_rounding_to_zero(device):
    y = torch.tensor([float("nan"), -1.0, 1e-8, 2.0] * 4, device=device).view(1, 16, 1, 1).half()
    ones, zeros = torch.ones(16, device=device), torch.zeros(16, device=device)
    out, mask = E.ext_scale_bias_act(y, ones, zeros, None, None, None, True)
    assert out.isnan().sum() == 4  # relu keeps NaN
    grad = torch.ones_like(y)
    dy = E.ext_scale_bias_act_backward(grad, mask, y, ones, None, None, True, False)[0]
    # NaN passes its gradient; 1e-8 rounds to 0 in float16, so it is masked like a negative.
    assert dy.flatten().tolist() == [1.0, 0.0, 0.0, 1.0] * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_prologue_and_backward(device, layout, shape, dtype, relu):
    c = shape[1]
    x, ga = _act(shape, dtype, device, layout), _act(shape, dtype, device, layout)
    scale, shift = _vec(c, device, _acc(dtype)), _vec(c, device, _acc(dtype))
    a = E.ext_prologue(x, scale, shift, relu)
    _close(a, reference.prologue(x.double(), scale.double(), shift.double(), relu).to(dtype), dtype)
    for need_dx in (True, False):
        dx, dscale, dshift = E.ext_prologue_backward(ga, x, scale, shift, relu, need_dx)
        edx, edscale, edshift = BASE.prologue_backward(ga, x, scale, shift, relu, (True, True, True))
        if need_dx:
            _close(dx, edx, dtype, "dx")
        else:
            assert dx.numel() == 0
        assert_close_scaled(dscale.cpu(), edscale.cpu(), max(RTOL[dtype], 1e-6), "dscale")
        assert_close_scaled(dshift.cpu(), edshift.cpu(), max(RTOL[dtype], 1e-6), "dshift")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("present", [(True, True, True), (False, True, True), (True, False, True), (True, True, False),
                                     (False, False, True)])
def test_conv_bn_stats_grad_y(device, layout, shape, dtype, present):
    c = shape[1]
    y = _act(shape, dtype, device, layout, offset=1.0)
    mean = y.to(_acc(dtype)).mean(dim=(0, 2, 3))
    gy = _act(shape, dtype, device, layout) if present[0] else None
    gm = _vec(c, device, _acc(dtype)) if present[1] else None
    gv = _vec(c, device, _acc(dtype)) if present[2] else None
    _close(E.ext_conv_bn_stats_grad_y(gy, y, mean, gm, gv), BASE.conv_bn_stats_grad_y(gy, y, mean, gm, gv), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_finalize_values_and_gradcheck(device, dtype, affine):
    c = 7
    mean = _vec(c, device, dtype).requires_grad_()
    var = (_vec(c, device, dtype).abs() + 0.1).requires_grad_()
    w = _vec(c, device, dtype).requires_grad_() if affine else None
    b = _vec(c, device, dtype).requires_grad_() if affine else None
    scale, shift = E.ext_bn_finalize(mean, var, w, b, 1e-5)
    escale, eshift = reference.bn_finalize(mean, var, w, b, 1e-5)
    torch.testing.assert_close(scale, escale)
    torch.testing.assert_close(shift, eshift)
    if dtype == torch.float64:
        inputs = [t for t in (mean, var, w, b) if t is not None]

        def fn(*t):
            return E.ext_bn_finalize(t[0], t[1], t[2] if affine else None, t[3] if affine else None, 1e-5)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64, torch.float16])
def test_bn_update_running_stats(device, momentum, stats_dtype):
    bn = randomize_bn(nn.BatchNorm2d(6, momentum=momentum)).to(device, stats_dtype)
    twin = copy.deepcopy(bn)
    acc = _acc(stats_dtype)
    for step in range(3):
        mean, var = _vec(6, device, acc), _vec(6, device, acc).abs()
        E.ext_bn_update_running_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var, momentum, 40)
        reference.bn_update_running_stats(twin.running_mean, twin.running_var, twin.num_batches_tracked, mean,
                                           var, twin.momentum, 40)
        assert bn.num_batches_tracked.item() == twin.num_batches_tracked.item() == step + 1
        tol = {"rtol": 2e-3, "atol": 2e-3} if stats_dtype == torch.float16 else {}
        torch.testing.assert_close(bn.running_mean, twin.running_mean, **tol)
        torch.testing.assert_close(bn.running_var, twin.running_var, **tol)


def _opcheck_cases(device):
    x = _act((2, 8, 5, 3), torch.float32, device, CL)
    v = _vec(8, device)
    out, mask = E.ext_scale_bias_act(x, v, v, x, v, v, True)
    bn = nn.BatchNorm2d(8).to(device)
    return [
        (E.ext_bn_stats.default, (x,)),
        (E.ext_bn_finalize.default, (v, v.abs(), v, v, 1e-5)),
        (E.ext_bn_finalize.default, (v, v.abs(), None, None, 1e-5)),
        (E.ext_bn_update_running_stats.default, (bn.running_mean, bn.running_var, bn.num_batches_tracked, v, v.abs(),
                                                  0.1, 30)),
        (E.ext_scale_bias_act.default, (x, v, v, x, v, v, True)),
        (E.ext_scale_bias_act.default, (x.contiguous(), v, v, None, None, None, False)),
        (E.ext_scale_bias_act_backward.default, (x, mask, x, v, x, v, True, True)),
        (E.ext_scale_bias_act_backward.default, (x, None, x, v, None, None, True, False)),
        (E.ext_conv_bn_stats_grad_y.default, (x, x, v, v, v)),
        (E.ext_conv_bn_stats_grad_y.default, (None, x.contiguous(), v, None, v)),
        (E.ext_prologue.default, (x, v, v, True)),
        (E.ext_prologue_backward.default, (x, x, v, v, True, True)),
        (E.ext_prologue_backward.default, (x, x, v, v, False, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_ext_ops_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


# ---- the `cuda` backend through the public ops


def _public_args(dtype, device, residual="projection"):
    y, scale, bias, r, rs, rb = _tail_args((2, 6, 5, 4), dtype, device, torch.contiguous_format, residual)
    return [y, scale.to(dtype), bias.to(dtype), r, None if rs is None else rs.to(dtype), None if rb is None else
            rb.to(dtype)]


@pytest.mark.parametrize("residual", [None, "identity", "projection"])
@pytest.mark.parametrize("relu", [True, False])
def test_public_scale_bias_act_opcheck_and_gradcheck_on_cuda_backend(residual, relu):
    tensors = [t if t is None else t.requires_grad_() for t in _public_args(torch.float64, "cpu", residual)]
    torch.library.opcheck(torch.ops.fusedres.scale_bias_act.default, (*tensors, relu, "cuda"))
    assert torch.autograd.gradcheck(lambda *t: fusedres.ops.scale_bias_act(*t, relu, "cuda"), tensors, eps=1e-6,
                                    atol=1e-6)


def test_public_bn_stats_opcheck_and_gradcheck_on_cuda_backend():
    y = (torch.randn(3, 6, 5, 4, dtype=torch.float64) * 3 + 10).requires_grad_()
    torch.library.opcheck(torch.ops.fusedres.bn_stats.default, (y, "cuda"))
    assert torch.autograd.gradcheck(lambda t: fusedres.ops.bn_stats(t, "cuda"), [y], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("prologue", [None, "relu", "affine"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_conv_bn_stats_opcheck_and_gradcheck_on_cuda_backend(prologue, layout):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).requires_grad_()
    s = t = None
    if prologue:
        s, t = (torch.randn(4, dtype=torch.float64).requires_grad_() for _ in range(2))
    conv = ([2, 1], [1, 1], [1, 1], 1)
    args = (x, w, s, t, prologue == "relu", *conv)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_stats.default, (*args, None, "cuda"))
    inputs = [a for a in (x, w, s, t) if a is not None]

    def fn(*ts):
        it = iter(ts)
        xx, ww = next(it), next(it)
        ss, tt = (next(it), next(it)) if prologue else (None, None)
        return fusedres.ops.conv_bn_stats(xx, ww, ss, tt, prologue == "relu", *conv, "cuda")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", ["basic", "bottleneck_down"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_blocks_on_cuda_backend_match_torchvision_float64(block, layout):
    if block == "basic":
        ref = fusedres.BasicBlock(8, 8)
    else:
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        ref = fusedres.Bottleneck(8, 4, stride=2, downsample=down)
    ref = randomize_bn(ref).double().train()
    ours = copy.deepcopy(ref)
    ours.backend = "cuda"
    x = torch.randn(3, 8, 7, 6, dtype=torch.float64).contiguous(memory_format=layout)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [ours(xs[0]), ref._unfused_forward(xs[1])]
    grad = torch.randn_like(outs[1])
    for o in outs:
        o.backward(grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=name)


def test_auto_on_cpu_runs_the_extension():
    x = torch.randn(2, 6, 4, 4)
    from fusedres.backends import select_backend
    from fusedres.backends.inputs import ConvInputs, StatsInputs

    assert select_backend("auto", StatsInputs(x)).name == "cuda"
    w = torch.randn(6, 6, 1, 1)
    conv = ConvInputs(x, w, None, None, None, None, [1, 1], [0, 0], [1, 1], 1, [1, 1], True)
    assert select_backend("auto", conv).name == "cuda"


def test_backend_reasons_name_the_extension(monkeypatch):
    x = torch.randn(2, 6, 4, 4)
    monkeypatch.setattr(ext, "has_kernels", lambda device_type: False)
    with pytest.raises(UnsupportedInputError, match="built without CPU kernels"):
        fusedres.ops.bn_stats(x, "cuda")
    monkeypatch.setattr(ext, "load_error", lambda: "the fusedres._C extension is not built (hint)")
    with pytest.raises(UnsupportedInputError, match="not built"):
        fusedres.ops.bn_stats(x, "cuda")
    # On the CPU, auto runs the torch backend without a warning (a pure-Python install).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fusedres.ops.bn_stats(x, "auto"), reference.bn_stats(x))


@pytest.mark.parametrize("bad, match", [
    (lambda x, v: E.ext_bn_stats(x[0]), "must be 4-D"),
    (lambda x, v: E.ext_bn_stats(x.int()), "must be float16, bfloat16, float32 or float64"),
    (lambda x, v: E.ext_prologue(x, v[:3], v, True), "scale must have 6 elements"),
    (lambda x, v: E.ext_scale_bias_act(x, v, v, x[:, :3], None, None, True), "residual must have shape"),
    (lambda x, v: E.ext_scale_bias_act(x, v, v, x, v, None, True), "given together"),
    (lambda x, v: E.ext_scale_bias_act_backward(x, torch.zeros(3, dtype=torch.uint8), x, v, None, None, True, True),
     "mask must be the uint8 mask"),
    (lambda x, v: E.ext_bn_finalize(v.int(), v, None, None, 1e-5), "mean must be float32 or float64"),
])
def test_bad_arguments_raise_clear_errors(bad, match):
    x, v = torch.randn(2, 6, 4, 4), torch.randn(6)
    with pytest.raises(RuntimeError, match=match):
        bad(x, v)


def _train_step_grads(model: nn.Module, forward, x: torch.Tensor, proj: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward/backward of loss = mean(out * proj): output, input and parameter grads (float64, CPU)."""
    x = x.detach().clone().requires_grad_()
    out = forward(x)
    (out * proj.to(out.device, out.dtype)).mean().backward()
    grads = {"output": out, "input grad": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return {k: v.detach().double().cpu() for k, v in grads.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_train_autocast_on_cuda_backend_gpu(dtype, layout):
    """AMP training step of a bottleneck with a projection shortcut on the cuda backend: off
    from float64 by at most 2x torchvision's own error in the same autocast dtype."""
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    ref = randomize_bn(fusedres.Bottleneck(16, 8, stride=2, downsample=down)).train()
    x = torch.randn(8, 16, 28, 28, dtype=torch.float64)
    proj = torch.randn(8, 32, 14, 14, dtype=torch.float64)
    exact_model = copy.deepcopy(ref).double()
    exact = _train_step_grads(exact_model, exact_model._unfused_forward, x, proj)
    theirs_model = copy.deepcopy(ref).cuda().to(memory_format=layout)
    ours_model = copy.deepcopy(ref).cuda().to(memory_format=layout)
    ours_model.backend = "cuda"
    xc = x.float().cuda().contiguous(memory_format=layout)
    with torch.autocast("cuda", dtype=dtype):
        theirs = _train_step_grads(theirs_model, theirs_model._unfused_forward, xc, proj)
        ours = _train_step_grads(ours_model, ours_model, xc, proj)
    for what, e in exact.items():
        scale = e.abs().max().item()
        err_ours = (ours[what] - e).abs().max().item() / scale
        err_theirs = (theirs[what] - e).abs().max().item() / scale
        assert err_ours <= 2 * err_theirs + 4 * torch.finfo(dtype).eps, (what, err_ours, err_theirs)
    for (name, b), c in zip(ours_model.named_buffers(), theirs_model.buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=1e-2, atol=1e-2, msg=name)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="one CPU build off x86-64")
def test_baseline_cpu_build_too():
    """The CPU kernels exist twice on x86-64 (baseline and AVX2+FMA, picked at run time);
    the suite above runs the one this CPU takes. Rerun the kernel tests on the other."""
    env = {**os.environ, "FUSEDRES_CPU_ISA": "baseline"}
    selection = "cpu and not opcheck and not public and not train_blocks and not baseline"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                             selection], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
