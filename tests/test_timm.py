"""fusedres.convert / fusedres.revert on timm ResNets (timm.models.resnet BasicBlock / Bottleneck).

CPU, float64, input 2x3x64x64, BatchNorm statistics and affine parameters randomised.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import (
    ATOL,
    FUSED_BLOCK_TYPES,
    RTOL,
    _single_intra_op_thread,  # noqa: F401  (autouse fixture: imported, it applies to this module)
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

import fusedres

timm = pytest.importorskip("timm")
timm_resnet = pytest.importorskip("timm.models.resnet")

# --------------------------------------------------------------------------------------
# Helpers. The ones shared with tests/test_convert.py, and the tolerances RTOL / ATOL
# (eval) and TRAIN_RTOL / LOSS_SCALE (train) with their justification, are in helpers.py.
# --------------------------------------------------------------------------------------

TIMM_TO_FUSED = {timm_resnet.BasicBlock: fusedres.BasicBlock, timm_resnet.Bottleneck: fusedres.Bottleneck}
TIMM_BLOCK_TYPES = tuple(TIMM_TO_FUSED)
MODEL_NAMES = ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d"]
EXPECTED_BLOCKS = {"resnet18": 8, "resnet50": 16, "resnet50d": 16, "resnext50_32x4d": 16}


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A float64 timm model (random init, 10 classes) in eval mode, with randomised BatchNorm."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).double()
    # Drawn in the default dtype (float32), as the measured tolerances were: see randomize_bn_seeded.
    return randomize_bn_seeded(model, seed, draw_dtype=torch.get_default_dtype()).eval()


_MODELS: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh deep copy of a cached timm model (each is built once per module)."""
    if name not in _MODELS:
        _MODELS[name] = timm_model(name)
    return copy.deepcopy(_MODELS[name])


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


def test_convert_keeps_frozen_batchnorm():
    """model.train() with frozen (eval-mode) BatchNorms, as in fine-tuning: convert must keep
    every BN's own mode (torchvision models do, see tests/test_convert.py), so the fused model
    still normalises with running statistics and matches timm."""
    model = base_model("resnet18").train()
    freeze_all_bn(model)
    flags = bn_training_flags(model)
    assert not any(flags.values())
    fused = convert_no_warning(copy.deepcopy(model))
    assert bn_training_flags(fused) == flags
    assert_training_matches(model, fused, make_input(seed=2), steps=2, train=False)


def test_revert_keeps_frozen_batchnorm():
    model = base_model("resnet18")
    converted = convert_no_warning(model).train()
    freeze_all_bn(converted)
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
