"""fusedres.convert / fusedres.revert on timm ResNets (timm.models.resnet BasicBlock / Bottleneck).

CPU, float64, input 2x3x64x64, BatchNorm statistics and affine parameters randomised.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fusedres

timm = pytest.importorskip("timm")
timm_resnet = pytest.importorskip("timm.models.resnet")

# --------------------------------------------------------------------------------------
# Shared helpers (candidates for a conftest.py; tests/test_convert.py has the same ones).
# --------------------------------------------------------------------------------------

# Eval-mode tolerance, float64. Measured fused vs timm: max absolute difference ~2e-13
# on outputs up to ~1e2 (resnet50/50d), ~1e-14 for resnet18/resnext50: rounding of BN
# folded into the conv weights, accumulated over ~50 layers. 1e-10 leaves a ~500x
# margin; float32 rounding anywhere (relative ~1e-7) or a logic error is far above it.
RTOL = 1e-10
ATOL = 1e-10

# Train-mode tolerance, float64, relative to each tensor's scale: every element of an
# output / gradient / parameter / buffer must agree within TRAIN_RTOL * max|expected|
# (plus TRAIN_RTOL relative). The loss weights are scaled by LOSS_SCALE so that SGD
# steps stay small: with O(1) weights the outputs (~1e2) give gradients of ~1e1, and each
# lr=0.01/momentum=0.9 step moves the random network so far that rounding differences
# grow ~100x per step (timm against *itself* with channels_last convolutions differs by
# ~1e-8 after 3 steps, so no implementation could be held to 1e-9 there). With
# LOSS_SCALE = 1e-3, measured over 3 steps: fused vs timm <= ~2e-12 of the tensor's max,
# the same size as timm vs its own channels_last run (~3e-12). 1e-9 leaves a ~500x
# margin, while float32 rounding, a biased/unbiased variance mix-up, a missing gradient
# path or a wrong running-stat update are orders of magnitude larger.
TRAIN_RTOL = 1e-9
LOSS_SCALE = 1e-3

FUSED_BLOCK_TYPES = (fusedres.BasicBlock, fusedres.Bottleneck)
TIMM_TO_FUSED = {timm_resnet.BasicBlock: fusedres.BasicBlock, timm_resnet.Bottleneck: fusedres.Bottleneck}
TIMM_BLOCK_TYPES = tuple(TIMM_TO_FUSED)
MODEL_NAMES = ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d"]
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16, "resnet50d": 16, "resnext50_32x4d": 16}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats (mean N(0,1), var U(0.5,2)) and affine parameters (N(0,1)) in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                if module.running_var is not None:
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return model


def make_input(seed: int = 1, shape: tuple[int, ...] = (2, 3, 64, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def block_names(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Names of the submodules whose exact type is one of `types`."""
    return [name for name, module in model.named_modules() if type(module) in types]


def convert_recording(model: nn.Module, **kwargs) -> tuple[nn.Module, list[str]]:
    """convert() and the messages of the RuntimeWarnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fusedres.convert(model, **kwargs)
    return converted, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def convert_no_warning(model: nn.Module, **kwargs) -> nn.Module:
    converted, messages = convert_recording(model, **kwargs)
    assert messages == []
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


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = TRAIN_RTOL) -> None:
    atol = rtol * max(expected.abs().max().item(), 1e-30) if expected.numel() else rtol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, seed: int = 123, train: bool = True) -> list[dict]:
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
    ref_records = train_steps(ref, x, steps, train=train)
    fused_records = train_steps(fused, x, steps, train=train)
    for step, (r, f) in enumerate(zip(ref_records, fused_records, strict=True)):
        assert_close_scaled(f["out"], r["out"], f"step {step} output")
        assert_close_scaled(f["x.grad"], r["x.grad"], f"step {step} input grad")
        assert list(f["grads"]) == list(r["grads"])
        for name in r["grads"]:
            assert_close_scaled(f["grads"][name], r["grads"][name], f"step {step} grad of {name}")
    ref_buffers, fused_buffers = dict(ref.named_buffers()), dict(fused.named_buffers())
    assert list(fused_buffers) == list(ref_buffers)
    for name, buf in ref_buffers.items():
        if buf.is_floating_point():
            assert_close_scaled(fused_buffers[name], buf, f"buffer {name}")
        else:
            assert torch.equal(fused_buffers[name], buf), name
    ref_params = dict(ref.named_parameters())
    assert [n for n, _ in fused.named_parameters()] == list(ref_params)
    assert bn_training_flags(fused) == bn_training_flags(ref)
    for name, p in fused.named_parameters():
        assert_close_scaled(p.detach(), ref_params[name].detach(), f"parameter {name}")


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A float64 timm model (random init, 10 classes) in eval mode, with randomised BatchNorm."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).double()
    return randomize_bn(model, seed).eval()


_MODELS: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh deep copy of a cached timm model (each is built once per module)."""
    if name not in _MODELS:
        _MODELS[name] = timm_model(name)
    return copy.deepcopy(_MODELS[name])


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread():
    """Run this module's float64 CPU convolutions on one intra-op thread, then restore.

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


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return make_input()


# --------------------------------------------------------------------------------------
# Fusable timm models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_timm_model_eval(name, x):
    model = base_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = block_names(model, TIMM_BLOCK_TYPES)
    assert len(originals) == EXPECTED_BLOCKS[name]

    converted = convert_no_warning(model)

    assert block_names(converted, TIMM_BLOCK_TYPES) == []
    assert block_names(converted, FUSED_BLOCK_TYPES) == originals
    for block_name in originals:
        block = converted.get_submodule(block_name)
        assert type(block) is TIMM_TO_FUSED[type(model.get_submodule(block_name))], block_name
        assert block.backend == "auto"
    # The original model is untouched.
    assert block_names(model, TIMM_BLOCK_TYPES) == originals
    assert_state_dicts_equal(model.state_dict(), before)

    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_timm_model_train(name):
    """3 SGD steps in train mode: outputs, input grad, all parameter grads, then params and buffers."""
    model = base_model(name)
    fused = convert_no_warning(copy.deepcopy(model))
    assert block_names(fused, TIMM_BLOCK_TYPES) == []
    assert_training_matches(model, fused, make_input(seed=2))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_unchanged_by_convert(name):
    model = base_model(name)
    converted = convert_no_warning(model)
    assert_state_dicts_equal(converted.state_dict(), model.state_dict())
    # Loading a timm checkpoint into the converted model works strictly.
    result = converted.load_state_dict(model.state_dict(), strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_revert_gives_timm_blocks(name, x):
    model = base_model(name)
    converted = convert_no_warning(model)
    reverted = fusedres.revert(converted)

    originals = block_names(model, TIMM_BLOCK_TYPES)
    assert block_names(reverted, FUSED_BLOCK_TYPES) == []
    assert block_names(reverted, TIMM_BLOCK_TYPES) == originals
    for block_name in originals:
        original, block = model.get_submodule(block_name), reverted.get_submodule(block_name)
        assert type(block) is type(original), block_name
        # timm's own submodules (act*, aa, drop_block, ...) are back, with the same names.
        assert [n for n, _ in block.named_children()] == [n for n, _ in original.named_children()], block_name
        for attr in ("backend", "_fold_cache", "_fusedres_source"):
            assert attr not in block.__dict__, (block_name, attr)
    # revert(inplace=False) leaves the converted model converted.
    assert block_names(converted, FUSED_BLOCK_TYPES) == originals
    assert_state_dicts_equal(reverted.state_dict(), model.state_dict())
    torch.testing.assert_close(eval_output(reverted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)

    # Train mode: fresh copies, since batch statistics update the running stats.
    ref_train, rev_train = copy.deepcopy(model).train(), copy.deepcopy(reverted).train()
    torch.testing.assert_close(rev_train(x), ref_train(x), rtol=RTOL, atol=ATOL)
    assert_state_dicts_equal(rev_train.state_dict(), ref_train.state_dict())


def test_revert_after_deepcopy_and_training_mode_switch(x):
    """A deep copy of a converted timm model reverts to timm blocks sharing the copy's parameters."""
    model = base_model("resnet18")
    converted = convert_no_warning(model)
    clone = copy.deepcopy(converted).train()
    clone.eval()
    with torch.no_grad():
        clone.layer1[0].bn1.running_mean.add_(1.0)
    reverted = fusedres.revert(clone, inplace=True)
    assert block_names(reverted, TIMM_BLOCK_TYPES) == block_names(model, TIMM_BLOCK_TYPES)
    assert not any(m.training for m in reverted.modules())
    assert reverted.layer1[0].bn1 is clone.layer1[0].bn1
    expected = copy.deepcopy(model)
    expected.load_state_dict(reverted.state_dict())
    torch.testing.assert_close(eval_output(reverted, x), eval_output(expected, x), rtol=RTOL, atol=ATOL)
    # The converted model it was copied from is unaffected.
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def _freeze_all_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def test_convert_keeps_frozen_batchnorm():
    """model.train() with frozen (eval-mode) BatchNorms, as in fine-tuning: convert must keep
    every BN's own mode (torchvision models do, see tests/test_convert.py), so the fused model
    still normalises with running statistics and matches timm."""
    model = base_model("resnet18").train()
    _freeze_all_bn(model)
    flags = bn_training_flags(model)
    assert not any(flags.values())
    fused = convert_no_warning(copy.deepcopy(model))
    assert bn_training_flags(fused) == flags
    assert_training_matches(model, fused, make_input(seed=2), steps=2, train=False)


def test_revert_keeps_frozen_batchnorm():
    model = base_model("resnet18")
    converted = convert_no_warning(model).train()
    _freeze_all_bn(converted)
    flags = bn_training_flags(converted)
    assert not any(flags.values())
    reverted = fusedres.revert(converted)
    assert bn_training_flags(reverted) == flags


# --------------------------------------------------------------------------------------
# timm blocks that cannot be fused
# --------------------------------------------------------------------------------------


def test_drop_path_blocks_stay_unfused(x):
    model = timm_model("resnet18", drop_path_rate=0.1)
    names = block_names(model, TIMM_BLOCK_TYPES)
    # timm's stochastic-depth rule: the rate grows linearly from 0, so block 0 has none.
    with_drop_path = [n for n in names if model.get_submodule(n).drop_path is not None]
    assert names[0] not in with_drop_path and len(with_drop_path) == len(names) - 1

    converted, messages = convert_recording(model)

    assert len(messages) == 1, messages
    message = messages[0]
    assert "drop_path" in message
    for block_name in names:
        original_type = type(model.get_submodule(block_name))
        if block_name in with_drop_path:
            assert names_block(message, block_name), (block_name, message)
            assert type(converted.get_submodule(block_name)) is original_type
        else:
            assert not names_block(message, block_name), (block_name, message)
            assert type(converted.get_submodule(block_name)) is TIMM_TO_FUSED[original_type]
    # DropPath is the identity in eval mode: same outputs.
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def test_drop_path_with_zero_probability_is_fused():
    model = base_model("resnet18")
    model.layer2[1].drop_path = timm.layers.DropPath(0.0)
    converted = convert_no_warning(model)
    assert block_names(converted, TIMM_BLOCK_TYPES) == []


@pytest.mark.skipif("seresnet18" not in timm.list_models("seresnet18"), reason="timm has no seresnet18")
def test_squeeze_excitation_blocks_stay_unfused(x):
    model = timm_model("seresnet18")
    names = block_names(model, TIMM_BLOCK_TYPES)
    assert len(names) == 8
    assert all(model.get_submodule(n).se is not None for n in names)

    converted, messages = convert_recording(model)

    assert len(messages) == 1, messages
    assert re.search(r"\bse\b", messages[0]), messages[0]
    for block_name in names:
        assert names_block(messages[0], block_name), (block_name, messages[0])
        assert type(converted.get_submodule(block_name)) is type(model.get_submodule(block_name))
    assert block_names(converted, FUSED_BLOCK_TYPES) == []
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def test_non_relu_activation_block_stays_unfused():
    model = base_model("resnet18")
    model.layer3[1].act2 = nn.SiLU(inplace=True)
    converted, messages = convert_recording(model)
    assert len(messages) == 1, messages
    assert names_block(messages[0], "layer3.1") and "SiLU" in messages[0]
    assert block_names(converted, TIMM_BLOCK_TYPES) == ["layer3.1"]
    assert len(block_names(converted, FUSED_BLOCK_TYPES)) == 7
