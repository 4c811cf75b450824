"""Eval-mode folded weights are a cache that is never stale."""

import copy
import io

import pytest
import torch
from helpers import randomize_bn

import fusedres


def _pair():
    torch.manual_seed(0)
    model = randomize_bn(fusedres.models.resnet18(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x


def _cache_entries(model):
    """Cached folds: per-conv entries of the op path, plus one per block CPU plan (fusedres.cpu_plan)."""
    return sum(len(m._fold_cache) + (m._fold_cache.plan is not None)
               for m in model.modules() if isinstance(m, fusedres.BasicBlock))


def _assert_fresh(model, x):
    """Cached eval output equals a from-scratch computation: the same path with an empty cache
    (a deep copy starts empty) and, in float32, the autograd-on path (folding recomputed)."""
    with torch.no_grad():
        cached = model(x)
        torch.testing.assert_close(cached, copy.deepcopy(model)(x), rtol=0, atol=0)
    if x.dtype == torch.float32:
        uncached = model(x).detach()  # autograd on: folding is recomputed, never cached
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
    return cached


def test_cache_is_filled_and_reused():
    model, x = _pair()
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # the op path, not the CPU plan
        model(x)
    assert _cache_entries(model) == 8 * 2 + 3  # two convs per block plus three projections
    block = model.layer1[0]
    with torch.no_grad():
        weight_before = block._fold_cache.folded("conv1", block.conv1, block.bn1, torch.float32)[0]
        model(x)
        assert block._fold_cache.folded("conv1", block.conv1, block.bn1, torch.float32)[0] is weight_before


def test_cpu_plan_is_built_once_and_reused():
    model, x = _pair()
    with torch.no_grad():
        model(x)
        plans = [m._fold_cache.plan for m in model.modules() if isinstance(m, fusedres.BasicBlock)]
        assert all(p is not None for p in plans) and len(plans) == 8
        packed = plans[0].convs[0].packed_weight(tuple(x.shape[:1]) + (64, 8, 8))
        model(x)
        assert [m._fold_cache.plan for m in model.modules() if isinstance(m, fusedres.BasicBlock)] == plans
        assert plans[0].convs[0].packed_weight(tuple(x.shape[:1]) + (64, 8, 8)) is packed
        stem_plan = model._fusedres_stem_cache.plan
        model(x)
        assert model._fusedres_stem_cache.plan is stem_plan


@pytest.mark.parametrize("edit", ["conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var", "eps",
                                  "stem_conv", "stem_bn"])
def test_in_place_edits_invalidate(edit):
    model, x = _pair()
    before = _assert_fresh(model, x)
    block = model.layer2[0]
    with torch.no_grad():
        if edit == "conv_weight":
            block.conv2.weight.mul_(1.5)
        elif edit == "bn_weight":
            block.bn1.weight.add_(0.5)
        elif edit == "bn_bias":
            block.downsample[1].bias.add_(0.5)
        elif edit == "running_mean":
            block.bn2.running_mean.add_(0.5)
        elif edit == "running_var":
            block.bn1.running_var.mul_(2.0)
        elif edit == "stem_conv":
            model.conv1.weight.mul_(1.5)
        elif edit == "stem_bn":
            model.bn1.running_mean.add_(0.5)
        else:
            block.bn2.eps = 0.5
    after = _assert_fresh(model, x)
    assert not torch.allclose(before, after)


def test_load_state_dict_invalidates():
    model, x = _pair()
    before = _assert_fresh(model, x)
    other = randomize_bn(fusedres.models.resnet18(num_classes=4))
    model.load_state_dict(other.state_dict())
    after = _assert_fresh(model, x)
    assert not torch.allclose(before, after)


def test_optimizer_step_invalidates():
    model, x = _pair()
    before = _assert_fresh(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # eval mode still has gradients for the parameters
    opt.step()
    after = _assert_fresh(model, x)
    assert not torch.allclose(before, after)


def test_train_steps_update_running_stats_then_eval_is_fresh():
    model, x = _pair()
    before = _assert_fresh(model, x)
    model.train()
    with torch.no_grad():
        model(x * 3 + 1)
    model.eval()
    after = _assert_fresh(model, x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("conversion", ["double", "half", "bfloat16", "to_float64"])
def test_dtype_conversions_invalidate(conversion):
    model, x = _pair()
    with torch.no_grad():
        model(x)
    if conversion == "double":
        model.double()
        dtype = torch.float64
    elif conversion == "half":
        model.half()
        dtype = torch.float16
    elif conversion == "bfloat16":
        model.bfloat16()
        dtype = torch.bfloat16
    else:
        model.to(torch.float64)
        dtype = torch.float64
    with torch.no_grad():
        out = model(x.to(dtype))
    assert out.dtype == dtype
    _assert_fresh(model, x.to(dtype))


def test_data_writes_need_clear_fold_cache():
    """Writes through .data bypass version counters: documented, and clear_fold_cache fixes it."""
    model, x = _pair()
    before = _assert_fresh(model, x)
    model.layer1[0].bn1.running_mean.data.add_(1.0)
    model.bn1.running_var.data.mul_(2.0)
    fusedres.clear_fold_cache(model)
    after = _assert_fresh(model, x)
    assert not torch.allclose(before, after)


def test_copies_do_not_share_the_cache():
    model, x = _pair()
    with torch.no_grad():
        original = model(x)
    for clone in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        assert _cache_entries(clone) == 0
        with torch.no_grad():
            clone.layer1[0].bn1.running_mean.add_(1.0)
            assert not torch.allclose(clone(x), original)
            torch.testing.assert_close(model(x), original)


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer
