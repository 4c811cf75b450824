"""torch.compile traces fused blocks without graph breaks (CPU, inductor)."""

import pytest
import torch
from helpers import randomize_bn

import fusedres


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_resnet18(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_bn(fusedres.models.resnet18(num_classes=10))
    model.train(mode == "train")
    # 4x64x64 keeps at least 16 values per channel in layer4's BN: with fewer, batch
    # statistics amplify float32 rounding (inductor reorders sums) far past 1e-4.
    x = torch.randn(4, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    model.load_state_dict(state)  # undo the running-stat update of the eager train-mode call
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_compile_backward_without_graph_breaks():
    torch._dynamo.reset()
    model = fusedres.Bottleneck(16, 4).train()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
