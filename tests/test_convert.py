"""fusedres.convert / fusedres.revert on torchvision models, and the fusedres.models constructors.

Everything runs on the CPU in float64 with small inputs, with BatchNorm statistics and
affine parameters randomised so that BN folding really changes the weights.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

import fusedres

# --------------------------------------------------------------------------------------
# Shared helpers (candidates for a conftest.py).
# --------------------------------------------------------------------------------------

# Tolerances for float64 comparisons of whole-network outputs. Measured: resnet50 with
# randomised BN gives outputs up to ~1e2 in magnitude and a fused-vs-torchvision max
# absolute difference of ~2e-13 (resnet18: ~2e-14), i.e. a few hundred float64 ulps
# accumulated over ~50 conv/BN layers with the BN folded in a different order. 1e-10
# leaves a ~500x margin for other CPUs / oneDNN builds, while any float32 rounding on the
# way (relative error ~1e-7) or a wrong BN/residual/ReLU would exceed it by orders of
# magnitude.
RTOL = 1e-10
ATOL = 1e-10

TV_TO_FUSED = {tv_resnet.BasicBlock: fusedres.BasicBlock, tv_resnet.Bottleneck: fusedres.Bottleneck}
TV_BLOCK_TYPES = tuple(TV_TO_FUSED)
FUSED_BLOCK_TYPES = (fusedres.BasicBlock, fusedres.Bottleneck)
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16}

MODEL_NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine parameters in every BatchNorm of `model` (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for t, fill in ((module.running_mean, "normal"), (module.running_var, "var"),
                                (module.weight, "normal"), (module.bias, "normal")):
                    if t is None:
                        continue
                    if fill == "var":
                        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * 1.5 + 0.5)  # U(0.5, 2)
                    else:
                        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return model


def make_input(seed: int = 1, shape: tuple[int, ...] = (2, 3, 64, 64)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def tv_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A float64 torchvision model in eval mode, with randomised BatchNorm."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).double()
    return randomize_bn(model, seed).eval()


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def block_names(model: nn.Module, types: tuple[type, ...] = TV_BLOCK_TYPES) -> list[str]:
    """Names of the submodules whose *exact* type is one of `types` (fused blocks subclass torchvision's)."""
    return [name for name, module in model.named_modules() if type(module) in types]


def convert_no_warning(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fusedres.convert(model, **kwargs)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert runtime == [], runtime
    return converted


def convert_one_warning(model: nn.Module, **kwargs) -> tuple[nn.Module, str]:
    """convert(), asserting it emits exactly one RuntimeWarning; returns (model, its message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = fusedres.convert(model, **kwargs)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, runtime
    return converted, runtime[0]


def names_block(message: str, name: str) -> bool:
    """Whether `message` names module `name` ("layer1.0" must not match "layer1.01" or "xlayer1.0")."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])(?!\.\d)", message) is not None


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def cloned_state_dict(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# Train-mode comparisons (batch statistics, several SGD steps) use a tolerance relative
# to each tensor's scale: every element must agree within TRAIN_RTOL * max|expected|
# (plus TRAIN_RTOL relative). The loss weights are scaled by LOSS_SCALE so that SGD steps
# stay small: with O(1) weights, outputs of ~1e2 give gradients of ~1e1 and each step of
# lr=0.01/momentum=0.9 perturbs the randomly initialised network so much that rounding
# differences grow ~100x per step (torchvision against *itself* with channels_last
# convolutions differs by ~1e-8 after 3 steps). With LOSS_SCALE = 1e-3, measured in
# float64 over 3 steps (resnet18/50/50d, fused vs torchvision/timm): worst difference
# <= ~2e-12 of the tensor's max, the same as torchvision vs its channels_last self
# (~3e-12). 1e-9 leaves a ~500x margin; float32 rounding anywhere, a wrong variance
# (biased/unbiased), a missing gradient path or a wrong running-stat update are all
# many orders of magnitude larger.
TRAIN_RTOL = 1e-9
LOSS_SCALE = 1e-3


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


# --------------------------------------------------------------------------------------
# Fixtures: each model is built once per module; tests that mutate use deep copies.
# --------------------------------------------------------------------------------------

_MODELS: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh deep copy of a cached float64 torchvision model with randomised BN."""
    if name not in _MODELS:
        _MODELS[name] = tv_model(name)
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
# convert
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_convert_replaces_every_block(name, x):
    model = base_model(name)
    before = cloned_state_dict(model)
    originals = block_names(model)
    assert len(originals) == EXPECTED_BLOCKS[name]

    converted = convert_no_warning(model)

    assert converted is not model
    for block_name in originals:
        block = converted.get_submodule(block_name)
        expected = TV_TO_FUSED[type(model.get_submodule(block_name))]
        assert type(block) is expected, block_name
        assert isinstance(block, FUSED_BLOCK_TYPES)
        assert block.backend == "auto"
    assert block_names(converted) == []  # no plain torchvision block left
    assert block_names(converted, FUSED_BLOCK_TYPES) == originals

    # Parameters equal the original's (by name, value, dtype); inplace=False copied them.
    converted_params = dict(converted.named_parameters())
    assert list(converted_params) == [n for n, _ in model.named_parameters()]
    for pname, p in model.named_parameters():
        assert torch.equal(converted_params[pname], p), pname
        assert converted_params[pname] is not p
        assert converted_params[pname].data_ptr() != p.data_ptr()

    # The original is untouched: same block classes, same state.
    assert block_names(model) == originals
    assert all(type(m) in TV_BLOCK_TYPES for n, m in model.named_modules() if n in originals)
    assert_state_dicts_equal(model.state_dict(), before)

    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)
    # ...and running the converted model did not modify the original.
    assert_state_dicts_equal(model.state_dict(), before)


def test_convert_inplace_returns_same_object(x):
    model = base_model("resnet18")
    ref = eval_output(copy.deepcopy(model), x)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    originals = block_names(model)

    converted = convert_no_warning(model, inplace=True)

    assert converted is model
    assert block_names(model) == []
    assert block_names(model, FUSED_BLOCK_TYPES) == originals
    # The fused blocks share the very same parameter and buffer objects.
    for pname, p in model.named_parameters():
        assert p is params[pname], pname
    for bname, b in model.named_buffers():
        assert b is buffers[bname], bname
    torch.testing.assert_close(eval_output(model, x), ref, rtol=RTOL, atol=ATOL)


def test_fused_blocks_share_parameters_with_their_modules(x):
    """A converted block's conv/BN are the model's modules: edits through the model are seen."""
    converted = convert_no_warning(base_model("resnet18"))
    before = eval_output(converted, x)
    with torch.no_grad():
        converted.layer1[0].bn1.running_mean.add_(0.5)
    after = eval_output(converted, x)
    assert not torch.allclose(after, before)
    with torch.no_grad():
        converted.layer1[0].bn1.running_mean.sub_(0.5)
    torch.testing.assert_close(eval_output(converted, x), before, rtol=RTOL, atol=ATOL)


def test_convert_twice_is_a_no_op(x):
    once = convert_no_warning(base_model("resnet18"))
    twice = convert_no_warning(once)
    assert block_names(twice, FUSED_BLOCK_TYPES) == block_names(once, FUSED_BLOCK_TYPES)
    torch.testing.assert_close(eval_output(twice, x), eval_output(once, x), rtol=RTOL, atol=ATOL)


def test_convert_a_block_as_root():
    torch.manual_seed(0)
    block = randomize_bn(tv_resnet.BasicBlock(8, 8).double()).eval()
    x = make_input(shape=(2, 8, 10, 10))
    fused = convert_no_warning(block)
    assert type(fused) is fusedres.BasicBlock
    assert type(block) is tv_resnet.BasicBlock
    torch.testing.assert_close(eval_output(fused, x), eval_output(block, x), rtol=RTOL, atol=ATOL)
    assert type(fusedres.revert(fused)) is tv_resnet.BasicBlock


def test_convert_model_without_blocks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    converted = convert_no_warning(model)
    assert [type(m) for m in converted] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_training_matches_torchvision():
    """Train mode (batch statistics): outputs, gradients and running stats over 3 SGD steps.

    resnet18 only, for time: Bottleneck blocks (and projection shortcuts in train mode)
    are trained in tests/test_timm.py, through the same fused classes.
    """
    model = base_model("resnet18")
    fused = convert_no_warning(copy.deepcopy(model))
    assert_training_matches(model, fused, make_input(seed=2))


def _freeze_all_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _freeze_downsample_bn(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and ".downsample." in f".{name}.":
            m.eval()


def _freeze_last_bn_of_blocks(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name.endswith(".bn2") and name.startswith("layer"):
            m.eval()


@pytest.mark.parametrize("freeze", [_freeze_all_bn, _freeze_downsample_bn, _freeze_last_bn_of_blocks],
                         ids=["all-bn-frozen", "downsample-bn-frozen", "bn2-frozen"])
def test_training_with_frozen_batchnorm(freeze):
    """model.train() with some BatchNorms in eval mode (fine-tuning): every mix of folded and
    batch-statistics paths, with and without a projection shortcut, matches torchvision."""
    model = base_model("resnet18").train()
    freeze(model)
    flags = bn_training_flags(model)
    assert True in flags.values() or freeze is _freeze_all_bn
    assert False in flags.values()
    fused = convert_no_warning(copy.deepcopy(model))
    assert bn_training_flags(fused) == flags
    assert_training_matches(model, fused, make_input(seed=2), steps=2, train=False)
    assert bn_training_flags(fusedres.revert(fused)) == flags


def test_eval_mode_gradients_match(x):
    """Eval mode with autograd on: folding is differentiable, gradients reach conv and BN parameters."""
    model = base_model("resnet18").eval()
    fused = convert_no_warning(copy.deepcopy(model)).eval()
    records = []
    for m in (model, fused):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        (out * weights).sum().backward()
        records.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (ref_out, ref_xg, ref_grads), (out, xg, grads) = records
    assert_close_scaled(out, ref_out, "output")
    assert_close_scaled(xg, ref_xg, "input grad")
    assert list(grads) == list(ref_grads)
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        assert_close_scaled(grads[name], g, f"grad of {name}")
    # The fused model's own buffers were not touched by the eval forward/backward.
    assert_state_dicts_equal(fused.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------
# state_dict and fusedres.models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_identical_after_convert(name):
    model = base_model(name)
    converted = convert_no_warning(model)
    assert_state_dicts_equal(converted.state_dict(), model.state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fusedres_model_loads_torchvision_state_dict(name, x):
    reference = base_model(name) if name in EXPECTED_BLOCKS else tv_model(name)
    torch.manual_seed(1)
    model = getattr(fusedres.models, name)().double()
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert_state_dicts_equal(model.state_dict(), reference.state_dict())
    torch.testing.assert_close(eval_output(model, x), eval_output(reference, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fusedres_models_match_torchvision_layout(name):
    # Built on the meta device: state_dict keys, shapes and dtypes do not depend on the
    # device, and this keeps the 100M-parameter variants from costing seconds each.
    # Real (CPU) construction and forward of resnet18/50/resnext50 are tested above.
    with torch.device("meta"):
        model = getattr(fusedres.models, name)()
        reference = getattr(torchvision.models, name)(weights=None)
    assert [(k, v.shape, v.dtype) for k, v in model.state_dict().items()] == \
           [(k, v.shape, v.dtype) for k, v in reference.state_dict().items()]
    assert block_names(model) == []
    assert block_names(model, FUSED_BLOCK_TYPES) == block_names(reference)
    for block_name in block_names(reference):
        assert type(model.get_submodule(block_name)) is TV_TO_FUSED[type(reference.get_submodule(block_name))]
        assert model.get_submodule(block_name).backend == "auto"


def test_fusedres_models_pass_kwargs_and_backend():
    model = fusedres.models.resnet18(num_classes=10, backend="torch")
    assert model.fc.out_features == 10
    blocks = [model.get_submodule(n) for n in block_names(model, FUSED_BLOCK_TYPES)]
    assert len(blocks) == 8
    assert all(b.backend == "torch" for b in blocks)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("kwargs", [{"weights": None}, {"weights": "DEFAULT"}, {"pretrained": True}])
def test_fusedres_models_reject_weights(name, kwargs):
    with pytest.raises(TypeError):
        getattr(fusedres.models, name)(**kwargs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fusedres_models_reject_unknown_backend(name):
    with pytest.raises(ValueError, match="bogus"):
        getattr(fusedres.models, name)(backend="bogus")


# --------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------


def test_convert_backend_torch(x):
    model = base_model("resnet18")
    converted = convert_no_warning(model, backend="torch")
    blocks = [converted.get_submodule(n) for n in block_names(converted, FUSED_BLOCK_TYPES)]
    assert len(blocks) == 8
    assert all(b.backend == "torch" for b in blocks)
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_unknown_backend_raises(inplace):
    model = base_model("resnet18")
    with pytest.raises(ValueError, match="bogus"):
        fusedres.convert(model, backend="bogus", inplace=inplace)
    # Nothing was converted before the error.
    assert len(block_names(model)) == 8
    assert block_names(model, FUSED_BLOCK_TYPES) == []


# --------------------------------------------------------------------------------------
# copies: deepcopy, pickle, torch.save
# --------------------------------------------------------------------------------------


def _deepcopy(model):
    return copy.deepcopy(model)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("copier", [_deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch.save"])
def test_copies_of_converted_model(copier, x):
    model = base_model("resnet18")
    converted = convert_no_warning(model)
    expected = eval_output(converted, x)  # fills the fold caches
    first = converted.layer1[0]
    assert len(first._fold_cache) > 0, "precondition: the eval forward should have cached folded weights"

    clone = copier(converted)

    assert clone is not converted
    assert block_names(clone, FUSED_BLOCK_TYPES) == block_names(converted, FUSED_BLOCK_TYPES)
    assert [b.backend for b in clone.modules() if isinstance(b, FUSED_BLOCK_TYPES)] == ["auto"] * 8
    assert_state_dicts_equal(clone.state_dict(), converted.state_dict())
    for (n, p), (_, q) in zip(clone.named_parameters(), converted.named_parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr(), n
    torch.testing.assert_close(eval_output(clone, x), expected, rtol=RTOL, atol=ATOL)

    # The folded-weight caches are not shared: BN edits in the copy reach only the copy...
    with torch.no_grad():
        clone.layer1[0].bn1.running_mean.add_(1.0)
        clone.layer4[1].bn2.running_var.mul_(2.0)
    changed = eval_output(clone, x)
    assert not torch.allclose(changed, expected)
    torch.testing.assert_close(eval_output(converted, x), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(eval_output(model.eval(), x), expected, rtol=RTOL, atol=ATOL)

    # ...and BN edits in the original reach only the original.
    with torch.no_grad():
        converted.layer2[0].downsample[1].running_mean.add_(1.0)
    assert not torch.allclose(eval_output(converted, x), expected)
    torch.testing.assert_close(eval_output(clone, x), changed, rtol=RTOL, atol=ATOL)

    # The copy behaves like a torchvision model with the same edits.
    reference = copy.deepcopy(model)
    reference.load_state_dict(clone.state_dict())
    torch.testing.assert_close(changed, eval_output(reference, x), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# revert
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_revert_gives_torchvision_blocks(name, x):
    model = base_model(name)
    converted = convert_no_warning(model)
    reverted = fusedres.revert(converted)

    assert reverted is not converted
    originals = block_names(model)
    assert block_names(reverted) == originals
    assert block_names(reverted, FUSED_BLOCK_TYPES) == []
    for block_name in originals:
        block = reverted.get_submodule(block_name)
        assert type(block) is type(model.get_submodule(block_name))
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


def test_revert_inplace(x):
    converted = convert_no_warning(base_model("resnet18"))
    expected = eval_output(converted, x)
    params = dict(converted.named_parameters())
    reverted = fusedres.revert(converted, inplace=True)
    assert reverted is converted
    assert block_names(reverted, FUSED_BLOCK_TYPES) == []
    assert len(block_names(reverted)) == 8
    for pname, p in reverted.named_parameters():
        assert p is params[pname], pname
    torch.testing.assert_close(eval_output(reverted, x), expected, rtol=RTOL, atol=ATOL)


def test_revert_fusedres_model():
    torch.manual_seed(0)
    model = fusedres.models.resnet18()
    reverted = fusedres.revert(model)
    assert block_names(reverted, FUSED_BLOCK_TYPES) == []
    assert len(block_names(reverted)) == 8
    assert_state_dicts_equal(reverted.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------
# blocks that cannot be fused
# --------------------------------------------------------------------------------------


def test_groupnorm_blocks_stay_and_are_named_in_one_warning(x):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(1, c)).double().eval()
    names = block_names(model)
    assert len(names) == 8

    converted, message = convert_one_warning(model)

    for block_name in names:
        assert names_block(message, block_name), (block_name, message)
        assert type(converted.get_submodule(block_name)) is type(model.get_submodule(block_name))
    assert "GroupNorm" in message
    assert block_names(converted, FUSED_BLOCK_TYPES) == []
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def _gelu_in_layer2_1(model):
    model.layer2[1].relu = nn.GELU()
    return "layer2.1", "GELU"


def _reflect_padding_in_layer3_0(model):
    model.layer3[0].conv2.padding_mode = "reflect"
    return "layer3.0", "reflect"


def _bottleneck_gelu(model):
    model.layer3[2].relu = nn.GELU()
    return "layer3.2", "GELU"


@pytest.mark.parametrize(("name", "edit"), [
    ("resnet18", _gelu_in_layer2_1),
    ("resnet18", _reflect_padding_in_layer3_0),
    ("resnet50", _bottleneck_gelu),
], ids=["gelu", "reflect-padding", "bottleneck-gelu"])
def test_one_unfusable_block_stays(name, edit, x):
    model = base_model(name)
    bad, reason = edit(model)
    names = block_names(model)

    converted, message = convert_one_warning(model)

    assert names_block(message, bad), message
    assert reason in message
    for other in names:
        if other != bad:
            assert not names_block(message, other), (other, message)
            assert type(converted.get_submodule(other)) is TV_TO_FUSED[type(model.get_submodule(other))]
    assert type(converted.get_submodule(bad)) is type(model.get_submodule(bad))
    assert block_names(converted) == [bad]
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def test_unfusable_root_block_warns():
    block = tv_resnet.BasicBlock(8, 8).double()
    block.relu = nn.GELU()
    converted, message = convert_one_warning(block)
    assert type(converted) is tv_resnet.BasicBlock
    assert "GELU" in message
