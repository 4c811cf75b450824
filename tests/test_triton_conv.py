"""fusedres.triton.conv.conv_bias_act and conv_bn_stats against the float64 reference.

Without a GPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so the shapes are tiny; they still cover multiple M tiles with tails, several N tiles,
both K-loop variants (tap mode for Cg % 16 == 0, flat mode otherwise) and every fusion.

Error bounds, elementwise, with mag = conv(|P(x)|, |w|) + |bias| + |residual| +
conv1x1(|shortcut_x|, |shortcut_w|) in float64 (the sum of magnitudes of all terms of that
output, which bounds every rounding error made while adding them):

* float32 (IEEE dot, fp32 accumulation): a sum of K terms rounds to within ~sqrt(K)*eps32*mag
  (random rounding errors; the worst case is K*eps32*mag), and the fp32 prologue adds
  ~2*eps32 per input -> atol = (4*sqrt(K) + 2) * eps32 * mag.
* float16: the products and the fp32 accumulation are as above (negligible at fp16
  precision); the rounding of P(x) to fp16 costs <= eps16/2 * mag and the final rounding
  <= eps16/2 * |ref| <= eps16/2 * mag, so the worst case is eps16 * mag: we allow 2x that.
  PyTorch's own fp16 conv (one rounding of the output) has the same eps16/2 * |ref| term.
* float32 on a GPU with torch.backends.cudnn.allow_tf32 (the kernel then uses TF32, like
  cuDNN): each operand keeps 10 mantissa bits (truncated by the tensor cores, worst case),
  <= 2**-9 relative per product -> 2**-9 * mag, we allow 2x that. The tests default to
  allow_tf32=False (IEEE) except test_float32_gpu.
* bfloat16 under the interpreter: the interpreter truncates fp32 -> bf16 instead of rounding
  to nearest, so each of the two roundings costs up to a full eps_bf16: worst case
  2 * eps_bf16 * mag, we allow 2x that. On a GPU (round to nearest) the fp16 argument holds.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedres import reference
from fusedres.triton import common
from fusedres.triton import conv as tconv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _ieee_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _case(c, oc, hw, k, stride=1, pad=0, dil=1, groups=1, n=2, bias=True, residual=False, relu=False,
          prologue=None, shortcut=None, nchw=False):
    """prologue: None, "affine" or "relu"; shortcut: None or (shortcut channels, shortcut stride)."""
    return dict(n=n, c=c, oc=oc, hw=hw, k=k, stride=stride, pad=pad, dil=dil, groups=groups, bias=bias,
                residual=residual, relu=relu, prologue=prologue, shortcut=shortcut, nchw=nchw)


CASES = {
    "1x1-tap-res-relu": _case(16, 20, (7, 9), 1, residual=True, relu=True),
    "3x3-tap-2chunks": _case(32, 24, (7, 9), 3, pad=1, relu=True),
    "3x3-s2-flat-nobias": _case(12, 20, (9, 9), 3, stride=2, pad=1, bias=False),
    "3x3-dil2": _case(16, 16, (9, 7), 3, pad=2, dil=2, residual=True, n=1),
    "3x3-s2-dil2": _case(20, 12, (7, 9), 3, stride=2, pad=1, dil=2, relu=True),
    "3x3-pad3-allpadded-rows": _case(4, 8, (5, 6), 3, pad=3, relu=True),
    "3x3-pad0": _case(16, 8, (7, 9), 3, pad=0, bias=False, n=1),
    "7x7-stem-c3": _case(3, 8, (9, 9), 7, stride=2, pad=3, relu=True, n=1),
    "g4-tap": _case(64, 64, (7, 9), 3, pad=1, groups=4, residual=True, relu=True, n=1),
    "g4-tiny-cg4": _case(16, 16, (7, 9), 3, pad=1, groups=4, relu=True),
    "g4-cg5-s2-dil2": _case(20, 12, (9, 9), 3, stride=2, pad=1, dil=2, groups=4, residual=True),
    "prologue-affine": _case(12, 20, (7, 9), 3, pad=1, prologue="affine"),
    "prologue-relu-pad": _case(16, 16, (7, 9), 3, pad=1, prologue="relu", relu=True),
    "prologue-1x1": _case(16, 24, (5, 7), 1, prologue="relu", residual=True),
    "prologue-g4": _case(16, 16, (7, 9), 3, pad=1, groups=4, prologue="relu"),
    "shortcut-s2": _case(16, 24, (4, 5), 1, relu=True, shortcut=(12, 2)),
    "shortcut-3x3-prologue": _case(12, 16, (7, 9), 3, stride=2, pad=1, relu=True, shortcut=(20, 2), prologue="relu"),
    "shortcut-s1-nobias": _case(16, 20, (7, 9), 1, shortcut=(24, 1), bias=False),
    "nchw-inputs": _case(12, 20, (7, 9), 3, pad=1, residual=True, relu=True, nchw=True),
    "nchw-g4-shortcut": _case(16, 16, (7, 9), 3, pad=1, relu=True, shortcut=(12, 1), groups=4, nchw=True, n=1),
}


def _params(cases, *names):
    """pytest params of the named cases (all of them without names), each id'd by its name."""
    return [pytest.param(cases[name], id=name) for name in names or cases]


EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def _inputs(cfg, dtype, device=DEVICE):
    n, c, oc, (h, w), k, g = cfg["n"], cfg["c"], cfg["oc"], cfg["hw"], cfg["k"], cfg["groups"]
    fmt = torch.contiguous_format if cfg["nchw"] else CL
    t = {"x": torch.randn(n, c, h, w).to(device, dtype).contiguous(memory_format=fmt),
         # A weight in the other memory format: the launcher must rearrange either.
         "weight": (torch.randn(oc, c // g, k, k) / math.sqrt(c // g * k * k)).to(device, dtype)
         .contiguous(memory_format=CL if cfg["nchw"] else torch.contiguous_format)}
    t["bias"] = torch.randn(oc, device=device) if cfg["bias"] else None
    p = (h + 2 * cfg["pad"] - cfg["dil"] * (k - 1) - 1) // cfg["stride"] + 1
    q = (w + 2 * cfg["pad"] - cfg["dil"] * (k - 1) - 1) // cfg["stride"] + 1
    t["residual"] = None
    if cfg["residual"]:
        t["residual"] = torch.randn(n, oc, p, q).to(device, dtype).contiguous(memory_format=fmt)
    t["shortcut_x"] = t["shortcut_weight"] = None
    if cfg["shortcut"] is not None:
        cs, ss = cfg["shortcut"]
        # The largest input a 1x1 conv with stride ss maps onto (p, q); the last row/column is odd-sized.
        t["shortcut_x"] = torch.randn(n, cs, (p - 1) * ss + 1, (q - 1) * ss + 1).to(device, dtype) \
            .contiguous(memory_format=fmt)
        t["shortcut_weight"] = (torch.randn(oc, cs, 1, 1) / math.sqrt(cs)).to(device, dtype)
    t["in_scale"] = t["in_shift"] = None
    if cfg["prologue"] is not None:
        t["in_scale"] = torch.rand(c, device=device) + 0.5
        # Mostly positive shifts: relu(shift) != 0, so padding applied before the prologue would show.
        t["in_shift"] = torch.rand(c, device=device) * 1.5 - 0.25
    return t


def _conv_args(cfg):
    s = cfg["shortcut"][1] if cfg["shortcut"] is not None else 1
    return dict(stride=(cfg["stride"],) * 2, padding=(cfg["pad"],) * 2, dilation=(cfg["dil"],) * 2,
                groups=cfg["groups"], shortcut_stride=(s, s))


def _reference(t, cfg, absolute=False):
    """float64 reference (or, with absolute=True, the magnitude sum that bounds rounding errors)."""
    a = _conv_args(cfg)

    def d(v):
        return None if v is None else (v.double().abs() if absolute else v.double())

    x = t["x"].double()
    if t["in_scale"] is not None:
        x = x * t["in_scale"].double().view(1, -1, 1, 1) + t["in_shift"].double().view(1, -1, 1, 1)
        if cfg["prologue"] == "relu":
            x = torch.relu(x)
    if absolute:
        x = x.abs()
    return reference.conv_bias_act(x, d(t["weight"]), d(t["bias"]), d(t["residual"]), d(t["shortcut_x"]),
                                   d(t["shortcut_weight"]), list(a["stride"]), list(a["padding"]),
                                   list(a["dilation"]), a["groups"], list(a["shortcut_stride"]),
                                   cfg["relu"] and not absolute)


def _run(t, cfg, out=None):
    return tconv.conv_bias_act(t["x"], t["weight"], t["bias"], t["residual"], t["shortcut_x"], t["shortcut_weight"],
                               relu=cfg["relu"], in_scale=t["in_scale"], in_shift=t["in_shift"],
                               prologue_relu=cfg["prologue"] == "relu", out=out, **_conv_args(cfg))


def _reduction_length(cfg):
    cs = cfg["shortcut"][0] if cfg["shortcut"] is not None else 0
    return cfg["k"] ** 2 * (cfg["c"] // cfg["groups"]) + cs + 2


def _tolerance_factor(cfg, dtype, interpreted):
    if dtype == torch.float32 and not interpreted and torch.backends.cudnn.allow_tf32:
        return 2 * 2.0**-9
    if dtype == torch.float32:
        return (4 * math.sqrt(_reduction_length(cfg)) + 2) * EPS[dtype]
    if dtype == torch.bfloat16 and interpreted:
        return 4 * EPS[dtype]
    return 2 * EPS[dtype]


def _check(cfg, dtype, device=DEVICE, interpreted=INTERPRET):
    t = _inputs(cfg, dtype, device)
    ref = _reference(t, cfg)
    mag = _reference(t, cfg, absolute=True)
    # Poisoned output: any element the kernel fails to write stays NaN and fails the check.
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)
    got = _run(t, cfg, out=out)
    assert got is out
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous(memory_format=CL)
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) output elements"
    err = (got.double() - ref).abs()
    bound = _tolerance_factor(cfg, dtype, interpreted) * mag + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error / bound = {worst:.3f} (max abs error {err.max().item():.3e})"
    return t, ref, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", _params(CASES))
def test_matches_reference(cfg, dtype):
    _check(cfg, dtype)


@pytest.mark.parametrize("cfg", _params(CASES, "3x3-tap-2chunks", "g4-tiny-cg4", "shortcut-3x3-prologue"))
def test_bfloat16_interpreted(cfg):
    if not INTERPRET:
        pytest.skip("interpreter-only tolerance; see test_bfloat16_gpu")
    _check(cfg, torch.bfloat16)


@pytest.mark.parametrize("cfg", _params(CASES, "1x1-tap-res-relu", "3x3-s2-dil2", "7x7-stem-c3"))
def test_fp16_error_close_to_torch(cfg):
    """Our fp16 error is at most ~2x that of PyTorch's own fp16 conv (CPU) against float64."""
    t, ref, got = _check(cfg, torch.float16)
    cpu = {k: None if v is None else v.cpu() for k, v in t.items()}
    a = _conv_args(cfg)
    try:
        theirs = reference.conv_bias_act(cpu["x"], cpu["weight"], cpu["bias"], cpu["residual"], cpu["shortcut_x"],
                                         cpu["shortcut_weight"], list(a["stride"]), list(a["padding"]),
                                         list(a["dilation"]), a["groups"], list(a["shortcut_stride"]), cfg["relu"])
    except RuntimeError as e:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"no fp16 CPU conv in this torch build: {e}")
    ref = ref.cpu()
    ours = (got.cpu().double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    # Both are dominated by the final rounding (half an fp16 ulp of the largest outputs).
    assert ours <= 2 * torch_err + 1e-6, f"ours {ours:.3e} vs torch fp16 {torch_err:.3e}"


def test_fresh_output_and_positional_defaults():
    x = torch.randn(1, 12, 5, 7, device=DEVICE)
    w = torch.randn(20, 12, 3, 3, device=DEVICE)
    out = tconv.conv_bias_act(x, w, padding=1)
    ref = reference.conv_bias_act(x.double(), w.double(), None, None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                  [1, 1], False)
    assert out.shape == (1, 20, 5, 7) and out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    # int arguments are accepted for stride / padding / dilation.
    out2 = tconv.conv_bias_act(x, w, stride=2, padding=2, dilation=2)
    ref2 = reference.conv_bias_act(x.double(), w.double(), None, None, None, None, [2, 2], [2, 2], [2, 2], 1,
                                   [1, 1], False)
    torch.testing.assert_close(out2.double(), ref2, atol=1e-4, rtol=1e-4)


def test_asymmetric_stride_padding():
    x = torch.randn(2, 16, 7, 9, device=DEVICE)
    w = torch.randn(16, 16, 3, 1, device=DEVICE)
    out = tconv.conv_bias_act(x, w, stride=(1, 2), padding=(1, 0), dilation=(2, 1), relu=True)
    ref = reference.conv_bias_act(x.double(), w.double(), None, None, None, None, [1, 2], [1, 0], [2, 1], 1,
                                  [1, 1], True)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_nan_propagates_like_reference():
    x = torch.randn(1, 16, 7, 9, device=DEVICE)
    x[0, 3, 2, 4] = float("nan")
    w = torch.randn(16, 16, 3, 3, device=DEVICE)
    out = tconv.conv_bias_act(x, w, padding=1, relu=True)
    ref = reference.conv_bias_act(x.double(), w.double(), None, None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                  [1, 1], True)
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().sum() == 9 * 16


def test_prune_configs_fit_the_problem():
    x16 = torch.empty(1, dtype=torch.float16)
    x32 = torch.empty(1, dtype=torch.float32)
    full = tconv._prune_configs(tconv._GPU_CONFIGS, {"OCg": 256, "Cg": 256, "K_TOTAL": 2304, "x_ptr": x16},
                                FLAT_K=False)
    assert len(full) == len(tconv._GPU_CONFIGS)
    # ResNeXt 32x4d's first stage: 4 channels per group in and out.
    tiny = tconv._prune_configs(tconv._GPU_CONFIGS, {"OCg": 4, "Cg": 4, "K_TOTAL": 36, "x_ptr": x16}, FLAT_K=True)
    assert all(c.kwargs["BLOCK_N"] == 16 and c.kwargs["BLOCK_K"] <= 64 for c in tiny)
    assert len({tuple(c.all_kwargs().items()) for c in tiny}) == len(tiny)
    # Tap mode: BLOCK_K chunks must tile Cg.
    for c in tconv._prune_configs(tconv._GPU_CONFIGS, {"OCg": 64, "Cg": 48, "K_TOTAL": 432, "x_ptr": x16},
                                  FLAT_K=False):
        assert 48 % c.kwargs["BLOCK_K"] == 0
    for c in tconv._prune_configs(tconv._GPU_CONFIGS, {"OCg": 512, "Cg": 512, "K_TOTAL": 4608, "x_ptr": x32},
                                  FLAT_K=False):
        kw = c.kwargs
        assert c.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4 <= common.SMEM_BUDGET


def test_float64_rejected():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tconv.conv_bias_act(x, w)


def _bad(launcher=tconv.conv_bias_act, **overrides):
    args = dict(x=torch.randn(1, 8, 5, 5, device=DEVICE), weight=torch.randn(8, 8, 3, 3, device=DEVICE))
    args.update(overrides)
    return lambda: launcher(**args)


def _bad_stats(**overrides):
    return _bad(tconv.conv_bn_stats, **overrides)


@pytest.mark.parametrize("call, exc, match", [
    pytest.param(_bad(x=torch.randn(8, 5, 5)), ValueError, r"4-D x .*got x of shape \(8, 5, 5\)", id="rank"),
    pytest.param(_bad(weight=torch.randn(8, 4, 3, 3)), ValueError, r"x has 8 channels, expected weight.shape\[1\]",
                 id="channels"),
    pytest.param(_bad(weight=torch.randn(8, 2, 3, 3), groups=3), ValueError, r"expected weight.shape\[1\] \* groups",
                 id="groups"),
    pytest.param(_bad(x=torch.zeros(1, 8, 5, 5, dtype=torch.int32)), TypeError, "int32", id="int-dtype"),
    pytest.param(_bad(weight=torch.randn(8, 8, 3, 3, dtype=torch.float16)), TypeError,
                 "weight has dtype torch.float16, expected x's dtype torch.float32", id="weight-dtype"),
    pytest.param(_bad(bias=torch.randn(7)), ValueError, r"bias has shape \(7,\), expected \(8,\)", id="bias"),
    pytest.param(_bad(residual=torch.randn(1, 8, 5, 5)), ValueError,
                 r"residual has shape \(1, 8, 5, 5\), expected the output shape \(1, 8, 3, 3\)", id="residual"),
    pytest.param(_bad(shortcut_x=torch.randn(1, 4, 5, 5), shortcut_weight=torch.randn(8, 4, 1, 1)), ValueError,
                 r"shortcut conv gives .*\(1, 5, 5\), expected the main conv's \(1, 3, 3\)", id="shortcut-size"),
    pytest.param(_bad(shortcut_x=torch.randn(1, 4, 3, 3), shortcut_weight=torch.randn(8, 5, 1, 1)), ValueError,
                 r"shortcut_weight has shape \(8, 5, 1, 1\), expected \(8, 4, 1, 1\)", id="shortcut-weight"),
    pytest.param(_bad(shortcut_weight=torch.randn(8, 4, 1, 1)), ValueError, "shortcut_weight needs shortcut_x",
                 id="shortcut-weight-alone"),
    pytest.param(_bad(shortcut_x=torch.randn(1, 16, 3, 3)), ValueError,
                 r"zero-padding shortcut needs shortcut_x's 16 channels <= the output's 8", id="zero-pad-too-wide"),
    pytest.param(_bad(shortcut_x=torch.randn(1, 4, 5, 5)), ValueError,
                 r"shortcut conv gives .*\(1, 5, 5\), expected the main conv's \(1, 3, 3\)", id="zero-pad-size"),
    pytest.param(_bad(in_scale=torch.ones(4), in_shift=torch.zeros(4)), ValueError,
                 r"in_scale has shape \(4,\), expected \(8,\)", id="prologue-length"),
    pytest.param(_bad(prologue_relu=True), ValueError, "prologue_relu needs", id="prologue-relu-alone"),
    pytest.param(_bad(bias=torch.randn(8, device="meta")), ValueError, "bias is on meta", id="device"),
    pytest.param(_bad(x=torch.randn(1, 8, 2, 2)), ValueError, "output size .* is empty", id="too-small"),
    pytest.param(_bad(out=torch.empty(1, 8, 3, 3)), ValueError, "channels_last-contiguous", id="out-format"),
    # conv_bn_stats computes the statistics of the conv output (+ a residual): no other epilogue.
    pytest.param(_bad_stats(bias=torch.randn(8)), TypeError, "unexpected keyword argument 'bias'", id="stats-bias"),
    pytest.param(_bad_stats(residual=torch.randn(1, 8, 5, 5)), ValueError,
                 r"residual has shape \(1, 8, 5, 5\), expected the output shape \(1, 8, 3, 3\)", id="stats-residual"),
    pytest.param(_bad_stats(shortcut_x=torch.randn(1, 4, 3, 3)), TypeError,
                 "unexpected keyword argument 'shortcut_x'", id="stats-shortcut"),
    pytest.param(_bad_stats(relu=True), TypeError, "unexpected keyword argument 'relu'", id="stats-relu"),
    # conv_bn_stats validates as conv_bias_act does.
    pytest.param(_bad_stats(weight=torch.randn(8, 4, 3, 3)), ValueError, r"x has 8 channels, expected weight",
                 id="stats-channels"),
    pytest.param(_bad_stats(prologue_relu=True), ValueError, "prologue_relu needs", id="stats-prologue-relu-alone"),
    pytest.param(_bad_stats(in_scale=torch.ones(8)), ValueError, "given together", id="stats-prologue-half"),
    pytest.param(_bad_stats(out=torch.empty(1, 8, 3, 3)), ValueError, "channels_last-contiguous",
                 id="stats-out-format"),
])
def test_bad_input(call, exc, match):
    if DEVICE != "cpu":
        pytest.skip("the bad-input cases build CPU tensors")
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------
# Batch statistics in the epilogue (conv_bn_stats): y = conv(P(x), w) and its per-channel mean
# and biased variance, against reference.conv_bn_stats.
#
# y is checked elementwise with the bounds above. mean/var are checked twice, per channel:
#
# 1. Against the float64 statistics of the y the kernel stored (what conv_bn_stats computes
#    from its y), which isolates the epilogue's arithmetic. With u = eps32/2, T the largest
#    BLOCK_M (the most rows one tile reduces in fp32), R = max|y - mean|, A = max|y|:
#    * a tile's m0 = fl(sum y)/n is within T*u*A of the tile mean, so every d = y - m0 the
#      tile forms has |d| <= D = 2R + T*u*A (|y - tile mean| <= 2R);
#    * the tile mean m0 + fl(sum d)/n (m0 is stored exactly) errs by <= (T+2)*u*D: the
#      roundings of each d, of their sum and of the division; the fp64 combine adds ~1e-16
#      relative and the final cast to fp32 u*|mean|;
#    * a tile's M2 = fl(sum d^2) - sum(d)*sum(d)/n errs by <= (T+3)*u*n*D^2 (rounding of d,
#      of d^2, a sum of n terms; the correction is O(u^2)); the combine's n_i*(mean_i -
#      mean)^2 with |mean_i - mean| <= D and both means off by <= (T+2)*u*D costs
#      <= 4*(T+2)*u*D^2 per pixel; the cast to fp32 u*var. So var errs by <= 5*(T+3)*u*D^2
#      + u*var.
#    We allow 2x both (eps32 in place of u). These bounds are independent of the size of the
#    mean except through D's tiny T*u*A term: a naive fp32 E[y^2] - E[y]^2 would err by
#    ~u*mean^2 and fail test_stats_large_mean.
# 2. Against conv_bn_stats in float64 (exact y): with b the elementwise bound on y - y_ref,
#    |mean(y) - mean(y_ref)| <= mean(b) and |var(y) - var(y_ref)| <= 4*R*mean(b) + 4*max(b)^2
#    (var(y) - var(y_ref) = 2*mean((y_ref - mean_ref)*(e - mean(e))) + mean((e - mean(e))^2),
#    e = y - y_ref), added to the bounds of 1.

STATS_T = max(c.kwargs["BLOCK_M"] for c in tconv._CONFIGS)
_DIMS = (0, 2, 3)


def _stats_case(c, oc, hw, k, stride=1, pad=0, groups=1, n=2, prologue=None, nchw=False):
    return _case(c, oc, hw, k, stride=stride, pad=pad, groups=groups, n=n, bias=False, prologue=prologue, nchw=nchw)


# Every M = N*P*Q below leaves a partially valid last M tile (interpreter BLOCK_M = 32).
STATS_CASES = {
    "1x1-nchw-M70": _stats_case(16, 20, (5, 7), 1, nchw=True),  # 2 N tiles, the 2nd masked
    "3x3-prologue-relu-M70": _stats_case(16, 24, (5, 7), 3, pad=1, prologue="relu"),
    # OCg = 4 of a 16-wide N tile: the masked columns alias the next group's channels.
    "3x3-s2-g4-flat-M70": _stats_case(16, 16, (9, 13), 3, stride=2, pad=1, groups=4, prologue="affine", nchw=True),
    "3x3-g4-tap-M35": _stats_case(64, 64, (5, 7), 3, pad=1, groups=4, n=1),
    "1x1-s2-flat-M90": _stats_case(12, 20, (9, 11), 1, stride=2, n=3),
}


@pytest.fixture
def _poisoned(monkeypatch):
    """Every buffer the launcher allocates starts as NaN (a huge count for the int32 count
    buffer): an unwritten element it then reads shows up as a NaN statistic."""
    allocated = []

    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        allocated.append(t)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(1 << 20)
    monkeypatch.setattr(common, "empty", empty)
    return allocated


def _run_stats(t, cfg, out):
    a = _conv_args(cfg)
    return tconv.conv_bn_stats(t["x"], t["weight"], in_scale=t["in_scale"], in_shift=t["in_shift"],
                               prologue_relu=cfg["prologue"] == "relu", out=out, stride=a["stride"],
                               padding=a["padding"], dilation=a["dilation"], groups=a["groups"])


def _stats_bounds(y64):
    """(mean, var, mean bound, var bound, R): float64 statistics of y64 and the bounds of 1."""
    eps = EPS[torch.float32]
    mean, var = reference.bn_stats(y64)
    r = (y64 - mean.view(1, -1, 1, 1)).abs().amax(_DIMS)
    d = 2 * r + STATS_T * eps / 2 * y64.abs().amax(_DIMS)
    return mean, var, (STATS_T + 2) * eps * d + eps * mean.abs(), 5 * (STATS_T + 3) * eps * d * d + eps * var, r


def _assert_within(name, got, want, bound):
    err = (got.double() - want).abs()
    worst = (err / (bound + 1e-30)).max().item()
    assert worst <= 1.0, f"{name}: max error / bound = {worst:.3f} (max abs error {err.max().item():.3e})"


def _check_stats(cfg, dtype):
    t = _inputs(cfg, dtype)
    a = _conv_args(cfg)
    d = {k: None if v is None else v.double() for k, v in t.items()}
    y_ref, mean_ref, var_ref = reference.conv_bn_stats(d["x"], d["weight"], d["in_scale"], d["in_shift"],
                                                       cfg["prologue"] == "relu", list(a["stride"]),
                                                       list(a["padding"]), list(a["dilation"]), a["groups"])
    out = torch.full(y_ref.shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=CL)
    y, mean, var = _run_stats(t, cfg, out)
    assert y is out and not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    oc = y_ref.shape[1]
    for v in (mean, var):
        assert v.shape == (oc,) and v.dtype == torch.float32
    # y, elementwise.
    b = _tolerance_factor(cfg, dtype, INTERPRET) * _reference(t, cfg, absolute=True)
    _assert_within("y", y, y_ref, b)
    # 1. The statistics of the stored y.
    mean_y, var_y, bm, bv, _ = _stats_bounds(y.double())
    _assert_within("mean vs stats of stored y", mean, mean_y, bm)
    _assert_within("var vs stats of stored y", var, var_y, bv)
    # 2. conv_bn_stats in float64.
    r_ref = (y_ref - mean_ref.view(1, -1, 1, 1)).abs().amax(_DIMS)
    _assert_within("mean vs reference", mean, mean_ref, bm + b.mean(_DIMS))
    _assert_within("var vs reference", var, var_ref, bv + 4 * r_ref * b.mean(_DIMS) + 4 * b.amax(_DIMS) ** 2)
    return t, y, mean, var


@pytest.mark.usefixtures("_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", _params(STATS_CASES))
def test_stats_matches_reference(cfg, dtype):
    _check_stats(cfg, dtype)


@pytest.mark.usefixtures("_poisoned")
@pytest.mark.parametrize("cfg", _params(STATS_CASES, "3x3-prologue-relu-M70", "1x1-s2-flat-M90"))
def test_stats_with_a_residual(cfg):
    """y = conv(P(x), w) + residual (a pre-activation block's last conv and shortcut) and the
    statistics of that sum: y within the conv's bound plus one rounding of the sum
    (eps32*|residual|), the statistics against those of the stored y (bounds of 1 above)."""
    t = _inputs(cfg, torch.float32)
    a = _conv_args(cfg)
    d = {k: None if v is None else v.double() for k, v in t.items()}
    conv = (list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"])
    y_conv, _, _ = reference.conv_bn_stats(d["x"], d["weight"], d["in_scale"], d["in_shift"],
                                           cfg["prologue"] == "relu", *conv)
    r = torch.randn(y_conv.shape, device=DEVICE) * 3
    y, mean, var = tconv.conv_bn_stats(t["x"], t["weight"], t["in_scale"], t["in_shift"], cfg["prologue"] == "relu",
                                       *conv, r)
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    b = _tolerance_factor(cfg, torch.float32, INTERPRET) * _reference(t, cfg, absolute=True)
    _assert_within("y", y, y_conv + r.double(), b + EPS[torch.float32] * r.double().abs())
    mean_y, var_y, bm, bv, _ = _stats_bounds(y.double())
    _assert_within("mean vs stats of stored y", mean, mean_y, bm)
    _assert_within("var vs stats of stored y", var, var_y, bv)
    with pytest.raises(ValueError, match="residual has shape"):
        tconv.conv_bn_stats(t["x"], t["weight"], t["in_scale"], t["in_shift"], cfg["prologue"] == "relu", *conv,
                            r[:, :1])


@pytest.mark.parametrize("cfg", _params(STATS_CASES, "1x1-nchw-M70", "3x3-s2-g4-flat-M70"))
def test_stats_several_rows_per_tile(cfg, monkeypatch, _poisoned):
    """Partial rows finer than BLOCK_M (as on a GPU when the autotuner picks BLOCK_M = 128 and
    the buffers have a row per 64 pixels): a tile writes the first of its rows and zero
    counts in the others, which the combine must skip; the last tile's spare row is past
    the buffer's end (M = 70: rows of 16 pixels, tiles of 32, 5 rows, 3 tiles). The unused
    rows must stay untouched: a tile's masked columns (past its group's OCg, or past OC)
    must not spill into them."""
    monkeypatch.setattr(tconv, "_STATS_TILE_M", 16)
    _check_stats(cfg, torch.float32)
    (cnt,) = [t for t in _poisoned if t.dtype == torch.int32]
    parts = [t for t in _poisoned if t.dim() == 2]
    assert cnt.tolist() == [32, 0, 32, 0, 6] and len(parts) == 3
    for part in parts:
        assert part.shape == (5, cfg["oc"])
        assert part[cnt > 0].isfinite().all() and part[cnt == 0].isnan().all()


@pytest.mark.usefixtures("_poisoned")
def test_stats_bfloat16_and_deterministic():
    """bf16 (the interpreter truncates the fp32 -> bf16 cast: the statistics are still those
    of the stored y, and _tolerance_factor's bound covers y), and a rerun gives identical bits."""
    cfg = STATS_CASES["3x3-prologue-relu-M70"]
    t, y, mean, var = _check_stats(cfg, torch.bfloat16)
    out = torch.empty_like(y)
    y2, mean2, var2 = _run_stats(t, cfg, out)
    assert torch.equal(y2, y) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.usefixtures("_poisoned")
def test_stats_y_is_the_plain_conv_output():
    """conv_bn_stats' y is conv_bias_act's output without an epilogue, bit for bit (the same
    kernel and, in the interpreter, the same config; a GPU's autotuner may pick another)."""
    if not INTERPRET:
        pytest.skip("one config only in the interpreter")
    cfg = STATS_CASES["3x3-s2-g4-flat-M70"]
    t = _inputs(cfg, torch.float16)
    y, _, _ = _run_stats(t, cfg, None)
    assert torch.equal(y, _run(t, cfg))


@pytest.mark.usefixtures("_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_stats_large_mean(dtype):
    """y ~ 1e3*(1 + c/OC) + N(0, 1): the variance keeps ~1e-4 relative accuracy (a naive fp32
    E[y^2] - E[y]^2 cancels ~1e6 against ~1e6 and loses ~0.1 absolute). Input channel 0
    goes through the prologue as the constant 1 (scale 0, shift 1) and carries the mean.
    In fp16 (an ulp of 0.5 at 1e3) this also shows that the statistics are those of the
    rounded, stored y: those of the fp32 accumulator differ by ~ulp^2/12 = 2% of the variance."""
    n, c, oc, h, w = 4, 16, 20, 9, 13
    x = torch.randn(n, c, h, w)
    weight = torch.randn(oc, c, 1, 1) / math.sqrt(c - 1)
    weight[:, 0] = 1e3 * (1 + torch.arange(oc) / oc).view(oc, 1, 1)
    scale, shift = torch.ones(c), torch.zeros(c)
    scale[0], shift[0] = 0.0, 1.0
    y_ref, mean_ref, var_ref = reference.conv_bn_stats(x.double(), weight.double(), scale.double(), shift.double(),
                                                       False, [1, 1], [0, 0], [1, 1], 1)
    assert (mean_ref >= 990).all() and ((var_ref > 0.2) & (var_ref < 3)).all()  # 1e3 + N(0, ~1)
    y, mean, var = tconv.conv_bn_stats(x.to(DEVICE, dtype), weight.to(DEVICE, dtype), in_scale=scale.to(DEVICE),
                                       in_shift=shift.to(DEVICE))
    mean_y, var_y, bm, bv, _ = _stats_bounds(y.double())
    _assert_within("mean vs stats of stored y", mean, mean_y, bm)
    _assert_within("var vs stats of stored y", var, var_y, bv)
    _assert_within("var vs stats of stored y, relative", var, var_y, 1e-4 * var_y)
    if dtype == torch.float32:
        _assert_within("mean vs reference", mean, mean_ref, 1e-6 * mean_ref.abs())
        _assert_within("var vs reference, relative", var, var_ref, 1e-4 * var_ref)


@pytest.mark.usefixtures("_poisoned")
def test_stats_nan_and_empty_batch():
    # A NaN input pixel poisons the 3x3 neighbourhood of its group's output channels only.
    x = torch.randn(2, 16, 5, 7, device=DEVICE)
    x[1, 5, 2, 3] = float("nan")  # group 1 of 4
    w = torch.randn(16, 4, 3, 3, device=DEVICE)
    y, mean, var = tconv.conv_bn_stats(x, w, padding=1, groups=4)
    _, mean_ref, var_ref = reference.conv_bn_stats(x.double(), w.double(), None, None, False, [1, 1], [1, 1],
                                                   [1, 1], 4)
    assert torch.equal(mean.isnan(), mean_ref.isnan()) and torch.equal(var.isnan(), var_ref.isnan())
    assert mean.isnan().sum() == 4 and torch.equal(var.isnan(), mean.isnan())
    # No pixels: the mean of nothing, as torch.mean.
    y, mean, var = tconv.conv_bn_stats(torch.randn(0, 16, 5, 7, device=DEVICE), w, padding=1, groups=4)
    assert y.shape == (0, 16, 5, 7) and mean.isnan().all() and var.isnan().all() and mean.shape == (16,)


# ---------------------------------------------------------------------------------------
# GPU-only: real compilation, bf16 with round-to-nearest, TF32, 64-bit offsets.


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _params(CASES))
def test_bfloat16_gpu(cfg):
    _check(cfg, torch.bfloat16, device="cuda", interpreted=False)


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_gpu(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    cfg = _case(64, 128, (14, 14), 3, pad=1, relu=True, residual=True, n=4)
    t = _inputs(cfg, torch.float32, "cuda")
    got = _run(t, cfg)
    ref, mag = _reference(t, cfg), _reference(t, cfg, absolute=True)
    factor = _tolerance_factor(cfg, torch.float32, interpreted=False)
    assert ((got.double() - ref).abs() <= factor * mag).all()
    if allow_tf32:  # TF32 really was used: IEEE-level accuracy would be suspicious on this K = 576.
        assert (got.double() - ref).abs().max() > 1e-6 * mag.max()


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_gpu():
    # N*H*W*C = 2 * 5800 * 5800 * 32 > 2**31: input offsets of the second image overflow int32.
    x = torch.randn(2, 32, 5800, 5800, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    w = torch.randn(16, 32, 1, 1, device="cuda", dtype=torch.float16)
    out = tconv.conv_bias_act(x, w)
    tail = x[1:, :, -4:, :]
    ref = torch.nn.functional.conv2d(tail.float(), w.float())
    torch.testing.assert_close(out[1:, :, -4:, :].float(), ref, atol=2e-2, rtol=2e-2)
