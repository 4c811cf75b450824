"""Shared test helpers: randomised BN state and comparisons against torchvision.

The first part (randomize_bn, assert_close_scaled, train_steps, assert_train_parity, twin)
serves test_blocks.py, test_models_parity.py, test_compile.py, test_fold_cache.py. The
second part, below the banner, serves the convert/revert tests (test_convert.py on
torchvision, test_timm.py on timm).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fusedres


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN state so that folding and BN math are really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, msg: str = "") -> None:
    """max|actual - expected| <= rtol * max|expected|.

    Reductions (conv, BN statistics, weight gradients) make the absolute error of every
    element scale with the magnitude of the whole tensor, not of that element; an
    elementwise relative check would fail on elements that happen to be near zero.
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{msg}: NaNs differ"
    a, e = actual.double().masked_fill(both_nan, 0), expected.double().masked_fill(both_nan, 0)
    error = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert error <= rtol * scale + 1e-300, f"{msg}: max abs error {error:.3e} > {rtol:.1e} * max|expected| {scale:.3e}"


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.01):
    """`steps` SGD steps on a fixed random projection of the output; returns
    (outputs, input grads, [{name: grad}] per step)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    outputs, input_grads, grads = [], [], []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        proj = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        # A mean keeps the updates small, so 3 steps do not blow the weights up and
        # amplify rounding differences chaotically.
        loss = (out * proj).mean()
        opt.zero_grad()
        loss.backward()
        outputs.append(out.detach())
        input_grads.append(xi.grad.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return outputs, input_grads, grads


def assert_train_parity(reference: nn.Module, fused: nn.Module, x: torch.Tensor, steps: int = 3,
                        rtol: float = 1e-10, later_rtol: float = 1e-6) -> None:
    """Outputs, input grads and parameter grads of every step, and buffers after `steps`
    steps, agree with `reference`.

    The first step is checked at `rtol`. Later steps start from weights that already
    differ by rounding, and training a deep net with small BN batches amplifies that
    ~100x per step: torchvision against itself (NCHW vs channels_last, float64) drifts
    to 3e-8 of the largest gradient after 3 steps on ResNet-50. `later_rtol` allows
    for that drift and still catches semantic errors (wrong momentum or variance
    estimator, a missing gradient term), which show at 1e-3 or worse.
    """
    ref_out, ref_gx, ref_grads = train_steps(reference, x, steps)
    out, gx, grads = train_steps(fused, x, steps)
    for step in range(steps):
        tol = rtol if step == 0 else later_rtol
        assert_close_scaled(out[step], ref_out[step], tol, f"output of step {step}")
        assert_close_scaled(gx[step], ref_gx[step], tol, f"input gradient of step {step}")
        assert ref_grads[step].keys() == grads[step].keys()
        for name, grad in ref_grads[step].items():
            assert_close_scaled(grads[step][name], grad, tol, f"gradient of {name} in step {step}")
    ref_buffers = dict(reference.named_buffers())
    assert ref_buffers.keys() == dict(fused.named_buffers()).keys()
    for name, buf in fused.named_buffers():
        assert_close_scaled(buf, ref_buffers[name], rtol if steps == 1 else later_rtol, f"buffer {name}")


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ======================================================================================
# convert / revert helpers, shared by tests/test_convert.py and tests/test_timm.py.
#
# Three of them do what a helper above does, with different semantics, so they have
# distinct names and neither set replaces the other:
# - randomize_bn_seeded: its own seeded generator, mean/weight/bias ~ N(0, 1) and
#   var ~ U(0.5, 2), in every _BatchNorm; randomize_bn uses the global RNG with other
#   distributions, in BatchNorm2d only.
# - assert_close_rel_to_max(actual, expected, what, rtol): torch.testing.assert_close
#   with atol = rtol * max|expected| plus an elementwise rtol; assert_close_scaled(actual,
#   expected, rtol, msg) checks max|error| <= rtol * max|expected| only (and NaN positions).
# - record_train_steps: loss = sum(out * LOSS_SCALE * weights), per-step record dicts;
#   train_steps: loss = mean(out * proj), (outputs, input grads, grads) lists.
# ======================================================================================

# Eval-mode tolerances for float64 comparisons of whole-network outputs. Measured with
# randomised BN, outputs up to ~1e2 in magnitude: fused vs torchvision max absolute
# difference ~2e-13 on resnet50 (resnet18: ~2e-14); fused vs timm ~2e-13 on resnet50/50d
# (resnet18/resnext50: ~1e-14). That is a few hundred float64 ulps, accumulated over ~50
# conv/BN layers with the BN folded into the conv weights in a different order. 1e-10
# leaves a ~500x margin for other CPUs / oneDNN builds, while any float32 rounding on the
# way (relative error ~1e-7) or a wrong BN/residual/ReLU would exceed it by orders of
# magnitude.
RTOL = 1e-10
ATOL = 1e-10

# Train-mode tolerance, float64, relative to each tensor's scale: every element of an
# output / gradient / parameter / buffer must agree within TRAIN_RTOL * max|expected|
# (plus TRAIN_RTOL relative). The loss weights are scaled by LOSS_SCALE so that SGD steps
# stay small: with O(1) weights, outputs of ~1e2 give gradients of ~1e1 and each step of
# lr=0.01/momentum=0.9 perturbs the randomly initialised network so much that rounding
# differences grow ~100x per step (torchvision or timm against *itself* with channels_last
# convolutions differs by ~1e-8 after 3 steps, so no implementation could be held to 1e-9
# there). With LOSS_SCALE = 1e-3, measured in float64 over 3 steps (resnet18/50/50d, fused
# vs torchvision/timm): worst difference <= ~2e-12 of the tensor's max, the same as
# torchvision or timm vs its own channels_last run (~3e-12). 1e-9 leaves a ~500x margin;
# float32 rounding anywhere, a wrong variance (biased/unbiased), a missing gradient path
# or a wrong running-stat update are all many orders of magnitude larger.
TRAIN_RTOL = 1e-9
LOSS_SCALE = 1e-3

FUSED_BLOCK_TYPES = (fusedres.BasicBlock, fusedres.Bottleneck)


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread():
    """Run this module's float64 CPU convolutions on one intra-op thread, then restore.

    Applies only to test modules that import it (`from helpers import
    _single_intra_op_thread`): pytest collects fixtures from a test module's namespace.

    The workloads are tiny (batch 2, 64x64); with 2 OpenMP threads on a 2-core machine
    that is also running anything else, OpenMP's barriers thrash and the same tests take
    5-10x longer (measured: this file ~3.5 min vs ~40 s under load), while one thread
    costs little even on an idle machine. Results do not depend on the thread count
    beyond float64 rounding, which the tolerances cover.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize_bn_seeded(model: nn.Module, seed: int = 0, draw_dtype: torch.dtype | None = None) -> nn.Module:
    """Random running stats (mean N(0,1), var U(0.5,2)) and affine parameters (N(0,1)) in every
    BatchNorm of `model` (in place), from a generator seeded with `seed`.

    `draw_dtype` is the dtype the values are drawn (and var scaled) in before being copied
    into each tensor; None draws in the tensor's own dtype. The two give different values
    for float64 tensors (a float32 draw is rounded and uses the generator differently), so
    each caller keeps the one its measured tolerances were taken with: test_convert.py
    draws in the tensor's dtype, test_timm.py in the default dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for t, fill in ((module.running_mean, "normal"), (module.running_var, "var"),
                                (module.weight, "normal"), (module.bias, "normal")):
                    if t is None:
                        continue
                    dtype = t.dtype if draw_dtype is None else draw_dtype
                    if fill == "var":
                        t.copy_(torch.rand(t.shape, generator=gen, dtype=dtype) * 1.5 + 0.5)  # U(0.5, 2)
                    else:
                        t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype))
    return model


def make_input(seed: int = 1, shape: tuple[int, ...] = (2, 3, 64, 64)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def block_names(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Names of the submodules whose *exact* type is one of `types` (fused blocks subclass torchvision's)."""
    return [name for name, module in model.named_modules() if type(module) in types]


def convert_recording(model: nn.Module, **kwargs) -> tuple[nn.Module, list[str]]:
    """convert() and the messages of the RuntimeWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fusedres.convert(model, **kwargs)
    return converted, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def convert_no_warning(model: nn.Module, **kwargs) -> nn.Module:
    converted, messages = convert_recording(model, **kwargs)
    assert messages == [], messages
    return converted


def names_block(message: str, name: str) -> bool:
    """Whether `message` names module `name` ("layer1.0" must not match "layer1.01" or "xlayer1.0")."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])(?!\.\d)", message) is not None


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def bn_training_flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def freeze_all_bn(model: nn.Module) -> None:
    """Every BatchNorm2d to eval mode (frozen statistics, as in fine-tuning)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def assert_close_rel_to_max(actual: torch.Tensor, expected: torch.Tensor, what: str,
                            rtol: float = TRAIN_RTOL) -> None:
    """torch.testing.assert_close with rtol and atol = rtol * max|expected| (not assert_close_scaled)."""
    atol = rtol * max(expected.abs().max().item(), 1e-30) if expected.numel() else rtol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def record_train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, seed: int = 123,
                       train: bool = True) -> list[dict]:
    """`steps` SGD steps on loss = (model(x) * weights).sum(), with fixed random `weights` (from `seed`).

    Records the output, the input gradient and every parameter gradient of each step.
    `train=False` keeps the modules' current train/eval flags (e.g. frozen BatchNorms).
    """
    if train:
        model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    records = []
    weights = None
    for _ in range(steps):
        xi = x.clone().requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        out = model(xi)
        if weights is None:
            gen = torch.Generator().manual_seed(seed)
            weights = torch.randn(out.shape, generator=gen, dtype=out.dtype) * LOSS_SCALE
        (out * weights).sum().backward()
        records.append({
            "out": out.detach().clone(),
            "x.grad": xi.grad.clone(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        })
        opt.step()
    return records


def assert_training_matches(ref: nn.Module, fused: nn.Module, x: torch.Tensor, steps: int = 3,
                            train: bool = True) -> None:
    """Outputs, input and parameter gradients per step, then parameters and buffers, after `steps` steps."""
    ref_records = record_train_steps(ref, x, steps, train=train)
    fused_records = record_train_steps(fused, x, steps, train=train)
    for step, (r, f) in enumerate(zip(ref_records, fused_records, strict=True)):
        assert_close_rel_to_max(f["out"], r["out"], f"step {step} output")
        assert_close_rel_to_max(f["x.grad"], r["x.grad"], f"step {step} input grad")
        assert list(f["grads"]) == list(r["grads"])
        for name in r["grads"]:
            assert_close_rel_to_max(f["grads"][name], r["grads"][name], f"step {step} grad of {name}")
    ref_buffers, fused_buffers = dict(ref.named_buffers()), dict(fused.named_buffers())
    assert list(fused_buffers) == list(ref_buffers)
    for name, buf in ref_buffers.items():
        if buf.is_floating_point():
            assert_close_rel_to_max(fused_buffers[name], buf, f"buffer {name}")
        else:
            assert torch.equal(fused_buffers[name], buf), name
    ref_params = dict(ref.named_parameters())
    assert [n for n, _ in fused.named_parameters()] == list(ref_params)
    assert bn_training_flags(fused) == bn_training_flags(ref)
    for name, p in fused.named_parameters():
        assert_close_rel_to_max(p.detach(), ref_params[name].detach(), f"parameter {name}")


def narrow_resnet(block: type[nn.Module], **kwargs) -> nn.Module:
    """torchvision's ResNet with stage widths 8/16/32/64 instead of 64..512 (built with its
    own _make_layer), so that it runs in the Triton interpreter in seconds."""
    from torchvision.models import resnet as tv

    model = tv.ResNet(block, [1, 1, 1, 1], num_classes=10, **kwargs)
    model.inplanes = 8
    model.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.layer1 = model._make_layer(block, 8, 1)
    model.layer2 = model._make_layer(block, 16, 1, stride=2)
    model.layer3 = model._make_layer(block, 32, 1, stride=2)
    model.layer4 = model._make_layer(block, 64, 1, stride=2)
    model.fc = nn.Linear(64 * block.expansion, 10)
    return model


def assert_float32_matches_float64(block: nn.Module, ref64: nn.Module, x: torch.Tensor, tol: float) -> None:
    """block(x) in float32 (no warning: nothing falls back) against ref64 in float64, output
    and input gradient (at 4 * tol: the backward adds a conv's worth of rounding)."""
    import warnings

    xd = x.double().requires_grad_()
    x = x.detach().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = block(x)
    expected = ref64(xd)
    assert_close_scaled(out.double(), expected.detach(), tol, "output")
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.float())
    expected.backward(g)
    assert_close_scaled(x.grad.double(), xd.grad, 4 * tol, "input gradient")
