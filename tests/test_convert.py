"""fusedres.convert / fusedres.revert on torchvision models, and the fusedres.models constructors.

Everything runs on the CPU in float64 with small inputs, with BatchNorm statistics and
affine parameters randomised so that BN folding really changes the weights.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from helpers import (
    ATOL,
    FUSED_BLOCK_TYPES,
    RTOL,
    _single_intra_op_thread,  # noqa: F401  (autouse fixture: imported, it applies to this module)
    assert_close_rel_to_max,
    assert_state_dicts_equal,
    assert_training_matches,
    block_names,
    bn_training_flags,
    convert_no_warning,
    convert_recording,
    eval_output,
    freeze_all_bn,
    make_input,
    names_block,
    randomize_bn_seeded,
)
from torch import nn
from torchvision.models import resnet as tv_resnet

import fusedres

# --------------------------------------------------------------------------------------
# Helpers. The ones shared with tests/test_timm.py, and the tolerances RTOL / ATOL
# (eval) and TRAIN_RTOL / LOSS_SCALE (train) with their justification, are in helpers.py.
# --------------------------------------------------------------------------------------

TV_TO_FUSED = {tv_resnet.BasicBlock: fusedres.BasicBlock, tv_resnet.Bottleneck: fusedres.Bottleneck}
TV_BLOCK_TYPES = tuple(TV_TO_FUSED)
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16}

MODEL_NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
]


def tv_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A float64 torchvision model in eval mode, with randomised BatchNorm."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).double()
    return randomize_bn_seeded(model, seed).eval()


def convert_one_warning(model: nn.Module, **kwargs) -> tuple[nn.Module, str]:
    """convert(), asserting it emits exactly one RuntimeWarning; returns (model, its message)."""
    converted, runtime = convert_recording(model, **kwargs)
    assert len(runtime) == 1, runtime
    return converted, runtime[0]


def cloned_state_dict(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}

# --------------------------------------------------------------------------------------
# Fixtures: each model is built once per module; tests that mutate use deep copies.
# --------------------------------------------------------------------------------------

_MODELS: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh deep copy of a cached float64 torchvision model with randomised BN."""
    if name not in _MODELS:
        _MODELS[name] = tv_model(name)
    return copy.deepcopy(_MODELS[name])


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
    originals = block_names(model, TV_BLOCK_TYPES)
    assert len(originals) == EXPECTED_BLOCKS[name]

    converted = convert_no_warning(model)

    assert converted is not model
    for block_name in originals:
        block = converted.get_submodule(block_name)
        expected = TV_TO_FUSED[type(model.get_submodule(block_name))]
        assert type(block) is expected, block_name
        assert isinstance(block, FUSED_BLOCK_TYPES)
        assert block.backend == "auto"
    assert block_names(converted, TV_BLOCK_TYPES) == []  # no plain torchvision block left
    assert block_names(converted, FUSED_BLOCK_TYPES) == originals

    # Parameters equal the original's (by name, value, dtype); inplace=False copied them.
    converted_params = dict(converted.named_parameters())
    assert list(converted_params) == [n for n, _ in model.named_parameters()]
    for pname, p in model.named_parameters():
        assert torch.equal(converted_params[pname], p), pname
        assert converted_params[pname] is not p
        assert converted_params[pname].data_ptr() != p.data_ptr()

    # The original is untouched: same block classes, same state.
    assert block_names(model, TV_BLOCK_TYPES) == originals
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
    originals = block_names(model, TV_BLOCK_TYPES)

    converted = convert_no_warning(model, inplace=True)

    assert converted is model
    assert block_names(model, TV_BLOCK_TYPES) == []
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
    block = randomize_bn_seeded(tv_resnet.BasicBlock(8, 8).double()).eval()
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


def _freeze_downsample_bn(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and ".downsample." in f".{name}.":
            m.eval()


def _freeze_last_bn_of_blocks(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and name.endswith(".bn2") and name.startswith("layer"):
            m.eval()


@pytest.mark.parametrize("freeze", [freeze_all_bn, _freeze_downsample_bn, _freeze_last_bn_of_blocks],
                         ids=["all-bn-frozen", "downsample-bn-frozen", "bn2-frozen"])
def test_training_with_frozen_batchnorm(freeze):
    """model.train() with some BatchNorms in eval mode (fine-tuning): every mix of folded and
    batch-statistics paths, with and without a projection shortcut, matches torchvision."""
    model = base_model("resnet18").train()
    freeze(model)
    flags = bn_training_flags(model)
    assert True in flags.values() or freeze is freeze_all_bn
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
    assert_close_rel_to_max(out, ref_out, "output")
    assert_close_rel_to_max(xg, ref_xg, "input grad")
    assert list(grads) == list(ref_grads)
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        assert_close_rel_to_max(grads[name], g, f"grad of {name}")
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
    assert block_names(model, TV_BLOCK_TYPES) == []
    assert block_names(model, FUSED_BLOCK_TYPES) == block_names(reference, TV_BLOCK_TYPES)
    for block_name in block_names(reference, TV_BLOCK_TYPES):
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
    assert len(block_names(model, TV_BLOCK_TYPES)) == 8
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
    originals = block_names(model, TV_BLOCK_TYPES)
    assert block_names(reverted, TV_BLOCK_TYPES) == originals
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
    assert len(block_names(reverted, TV_BLOCK_TYPES)) == 8
    for pname, p in reverted.named_parameters():
        assert p is params[pname], pname
    torch.testing.assert_close(eval_output(reverted, x), expected, rtol=RTOL, atol=ATOL)


def test_revert_fusedres_model():
    torch.manual_seed(0)
    model = fusedres.models.resnet18()
    reverted = fusedres.revert(model)
    assert block_names(reverted, FUSED_BLOCK_TYPES) == []
    assert len(block_names(reverted, TV_BLOCK_TYPES)) == 8
    assert_state_dicts_equal(reverted.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------
# blocks that cannot be fused
# --------------------------------------------------------------------------------------


def test_groupnorm_blocks_stay_and_are_named_in_one_warning(x):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(1, c)).double().eval()
    names = block_names(model, TV_BLOCK_TYPES)
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
    names = block_names(model, TV_BLOCK_TYPES)

    converted, message = convert_one_warning(model)

    assert names_block(message, bad), message
    assert reason in message
    for other in names:
        if other != bad:
            assert not names_block(message, other), (other, message)
            assert type(converted.get_submodule(other)) is TV_TO_FUSED[type(model.get_submodule(other))]
    assert type(converted.get_submodule(bad)) is type(model.get_submodule(bad))
    assert block_names(converted, TV_BLOCK_TYPES) == [bad]
    torch.testing.assert_close(eval_output(converted, x), eval_output(model, x), rtol=RTOL, atol=ATOL)


def test_unfusable_root_block_warns():
    block = tv_resnet.BasicBlock(8, 8).double()
    block.relu = nn.GELU()
    converted, message = convert_one_warning(block)
    assert type(converted) is tv_resnet.BasicBlock
    assert "GELU" in message
