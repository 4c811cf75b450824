"""torch.fx on converted models: symbolic_trace and torchvision's feature extraction.

A fused block traces as one call_module node (fusedres.capture), so the traced module runs
the fused block itself; the stem traces as its three modules (conv1, bn1, relu: unfused, as
torchvision names them). Float64 outputs and gradients agree with the converted model's and
torchvision's within the parity tolerances (helpers.RTOL, and 1e-9 where train-mode
gradients are compared). A failed trace leaves the model as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from helpers import (  # noqa: F401
    RTOL,
    _single_intra_op_thread,
    assert_close_scaled,
    convert_no_warning,
    make_input,
    randomize_bn_seeded,
)
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fusedres

FUSED = (fusedres.BasicBlock, fusedres.Bottleneck, fusedres.PreActBasicBlock, fusedres.PreActBottleneck)


def _models(name: str) -> tuple[nn.Module, nn.Module]:
    """(original, converted) in float64, with random BN state."""
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], num_classes=10)
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    model = randomize_bn_seeded(model.double())
    return model, convert_no_warning(model)


def _block_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, FUSED)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "timm:resnet50d", "timm:resnetv2_50"])
def test_symbolic_trace_is_one_node_per_block_and_computes_the_same(name):
    original, fused = _models(name)
    traced = fx.symbolic_trace(fused.eval())
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    paths = _block_paths(fused)
    assert paths and all(p in calls for p in paths)
    # Nothing inside a block is in the graph, and the graph's block is the model's own (fused) module.
    assert not any(c.startswith(f"{p}.") for c in calls for p in paths)
    assert all(traced.get_submodule(p) is fused.get_submodule(p) for p in paths)
    x = make_input(shape=(2, 3, 64, 64))
    for mode in (False, True):
        for m in (original, fused):
            m.train(mode)
        # Traced per mode: a module FX traces through (timm's BatchNormAct2d) keeps the mode it was traced in.
        traced = fx.symbolic_trace(fused)
        with torch.no_grad() if not mode else torch.enable_grad():
            expected, got, got_traced = original(x), fused(x), traced(x)
        assert_close_scaled(got_traced.detach(), got.detach(), RTOL, f"traced, train={mode}")
        assert_close_scaled(got.detach(), expected.detach(), RTOL, f"train={mode}")


def test_traced_train_mode_gradients_are_the_models():
    original, fused = _models("resnet18")
    traced = fx.symbolic_trace(fused.train())
    x = make_input(shape=(2, 3, 32, 32))
    grads = []
    for m in (fused, traced):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        m(xi).square().mean().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in fused.parameters()])
    original.train().zero_grad()
    xi = x.clone().requires_grad_()
    original(xi).square().mean().backward()
    expected = [xi.grad] + [p.grad for p in original.parameters()]
    for got in grads:
        for a, b in zip(got, expected):
            assert_close_scaled(a, b, 1e-9, "gradient")


def test_create_feature_extractor_matches_torchvision():
    original, fused = _models("resnet50")
    nodes = {"layer1": "c2", "layer2": "c3", "layer4": "c5", "layer3.5": "last_of_layer3"}
    x = make_input(shape=(2, 3, 64, 64))
    for train in (False, True):
        original.train(train)
        fused.train(train)
        expected = create_feature_extractor(original, nodes)
        got = create_feature_extractor(fused, nodes)
        assert fused.training is train and original.training is train  # restored by torchvision
        with torch.no_grad():
            e, g = expected(x), got(x)
        assert sorted(g) == sorted(nodes.values()) == sorted(e)
        for key in e:
            assert_close_scaled(g[key], e[key], RTOL if not train else 1e-9, key)


def test_graph_node_names_name_blocks_not_their_insides():
    original, fused = _models("resnet50")
    train_names, eval_names = get_graph_node_names(fused)
    assert train_names == eval_names
    orig_names = get_graph_node_names(original)[1]
    blocks = _block_paths(fused)
    assert [n for n in eval_names if n.startswith("layer")] == blocks
    # The stem and head keep torchvision's names.
    assert eval_names[:5] == orig_names[:5] == ["x", "conv1", "bn1", "relu", "maxpool"]
    assert eval_names[-3:] == orig_names[-3:]
    assert "layer4.2.relu_2" in orig_names and "layer4.2.relu_2" not in eval_names
    with pytest.raises(ValueError, match="layer4.2.relu_2"):
        create_feature_extractor(fused, ["layer4.2.relu_2"])


def test_cifar_and_plain_blocks_trace():
    for model in (fusedres.models.cifar_resnet20(), fusedres.models.cifar_plain20()):
        model = randomize_bn_seeded(model.double()).eval()
        traced = fx.symbolic_trace(model)
        x = make_input(shape=(2, 3, 16, 16))
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))
        assert sum(n.op == "call_module" and n.target.startswith("layer") for n in traced.graph.nodes) == 9


def test_a_block_traced_as_the_root_traces_unfused_with_one_warning():
    block = randomize_bn_seeded(fusedres.Bottleneck(32, 8).double()).eval()
    with pytest.warns(RuntimeWarning, match="root module"):
        traced = fx.symbolic_trace(block)
    assert {n.target for n in traced.graph.nodes if n.op == "call_module"} >= {"conv1", "bn1", "conv3", "bn3"}
    x = make_input(shape=(2, 32, 8, 8))
    with torch.no_grad():
        assert_close_scaled(traced(x), block(x), RTOL, "root block")
    # Inside a container it is one fused node again, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = fx.symbolic_trace(nn.Sequential(block))
    assert [n.op for n in wrapped.graph.nodes] == ["placeholder", "call_module", "output"]


class _FailingTracer(fx.Tracer):
    def call_module(self, m, forward, args, kwargs):
        if self.path_of_module(m) == "layer3":
            raise RuntimeError("trace failed on purpose")
        return super().call_module(m, forward, args, kwargs)


def test_a_failed_trace_changes_nothing():
    _, fused = _models("resnet18")
    fused.eval()
    x = make_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        before = fused(x)  # fills the fold caches and CPU plans
    caches = {p: (b._fold_cache, b._fold_cache.plan, len(b._fold_cache)) for p, b in fused.named_modules()
              if isinstance(b, FUSED)}
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(RuntimeError, match="on purpose"):
        _FailingTracer().trace(fused)
    assert not fused.training
    assert {p: (b._fold_cache, b._fold_cache.plan, len(b._fold_cache)) for p, b in fused.named_modules()
            if isinstance(b, FUSED)} == caches
    assert all(torch.equal(v, state[k]) for k, v in fused.state_dict().items())
    with torch.no_grad():
        assert torch.equal(fused(x), before)
