"""fusedres.testing: check_parity / assert_parity on the user's own model.

Small models (ResNet-18 at 64x64, batch 2; timm resnet18 / resnetv2_50 at 64x64; a
narrow torchvision ResNet) keep this file at a few seconds per test on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from helpers import (
    _single_intra_op_thread,  # noqa: F401  (autouse fixture: imported, it applies to this module)
    narrow_resnet,
)
from torch import nn
from torchvision.models import resnet as tv_resnet

import fusedres
from fusedres import cpu_plan
from fusedres.backends.torch_backend import TorchBackend
from fusedres.testing import ParityUsageError, assert_parity, check_parity, randomize_batchnorm

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10))


def test_passing_model_float32_report_and_model_untouched():
    model = resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_parity(model, X, dtype=torch.float32, name="resnet18")
    assert report.ok, report
    report.raise_if_failed()
    assert report.coverage == "8 of 8 blocks fused, stem fused"
    keys = {(c.mode, c.dtype) for c in report.comparisons}
    assert keys == {("eval", "float64"), ("eval", "float32"), ("train", "float64"), ("train", "float32")}
    groups = {c.group for c in report.comparisons if c.mode == "train"}
    assert groups == {"output", "input grad", "parameter grad", "buffer"}
    grads = {c.name for c in report.comparisons if c.group == "parameter grad" and c.dtype == "float32"}
    assert grads == {n for n, _ in model.named_parameters()}
    buffers = {c.name for c in report.comparisons if c.group == "buffer" and c.dtype == "float64"}
    assert buffers == {n for n, _ in model.named_buffers()}
    assert all(c.torch_error is not None for c in report.comparisons if c.dtype == "float32")
    # The user's model: same class, same blocks, same weights and statistics.
    assert type(model) is tv_resnet.ResNet and type(model.layer1[0]) is tv_resnet.BasicBlock
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    text = str(report)
    assert "fusion coverage: 8 of 8 blocks fused, stem fused" in text and "PASS" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["coverage"]["fused"] == 8 and len(data["comparisons"]) == len(report.comparisons)


def test_backends_are_recorded_per_run():
    report = check_parity(resnet18(), X, backend="torch", dtype="float32")
    blocks = {b.name: b for b in report.blocks}
    assert blocks["layer1.0"].backends == {"eval float64": "torch", "eval float32": "cpu_plan",
                                           "train float64": "torch", "train float32": "torch"}
    # The fused stem trains with its own modules (fusedres.stem), and the report says so.
    assert blocks["<stem>"].backends["train float64"] == "modules"
    assert blocks["<stem>"].backends["eval float32"] == "cpu_plan"


def _add(value):
    def patch(original):
        def broken(*args, **kwargs):
            out = original(*args, **kwargs)
            if isinstance(out, tuple):
                return (out[0] + value, *out[1:])
            return out + value

        return broken

    return patch


# Where each run's block outputs come from on the CPU with backend="torch": eval float64 ->
# the torch backend's conv_bias_act; eval float32 -> the CPU plan's prepacked oneDNN call
# (fusedres.cpu_plan, no op dispatch); train -> the torch backend's scale_bias_act (the
# block tail; Backend's implementation, which TorchBackend inherits).
BROKEN = [
    pytest.param("eval", None, [(TorchBackend, "conv_bias_act")], id="eval-float64"),
    pytest.param("eval", torch.float32, [(cpu_plan.PackedConv, "__call__"), (TorchBackend, "conv_bias_act")],
                 id="eval-float32"),
    pytest.param("train", None, [(TorchBackend, "scale_bias_act")], id="train-float64"),
    pytest.param("train", torch.float32, [(TorchBackend, "scale_bias_act")], id="train-float32"),
]


@pytest.mark.parametrize("mode,dtype,targets", BROKEN)
def test_broken_backend_is_caught(monkeypatch, mode, dtype, targets):
    for cls, name in targets:
        monkeypatch.setattr(cls, name, _add(1e-3)(getattr(cls, name)))
    report = check_parity(resnet18(), X, backend="torch", modes=(mode,), dtype=dtype)
    assert not report.ok
    run_dtype = "float64" if dtype is None else "float32"
    failed = [c for c in report.comparisons if not c.ok]
    assert failed and {c.mode for c in failed} == {mode}
    assert run_dtype in {c.dtype for c in failed}
    if mode == "train":
        assert "output" in {c.group for c in failed}
    with pytest.raises(AssertionError, match="parity check of ResNet failed") as info:
        report.raise_if_failed()
    assert all(c.describe() in str(info.value) for c in failed)
    if mode == "eval" and dtype is None:  # assert_parity is check_parity + raise_if_failed: once is enough
        with pytest.raises(AssertionError):
            assert_parity(resnet18(), X, backend="torch", modes=(mode,), dtype=dtype)


def test_timm_resnet18_and_resnetv2():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("resnet18", pretrained=False, num_classes=10))
    report = assert_parity(model, X, dtype="float32")
    assert report.coverage == "8 of 8 blocks fused, stem fused"
    v2 = randomize_batchnorm(timm.create_model("resnetv2_50", pretrained=False, num_classes=10))
    report = assert_parity(v2, X, modes=("eval",), dtype="float32")
    assert report.fused_count == len(report.residual_blocks) == 16


def test_timm_unfusable_blocks_name_their_reasons():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnet18", pretrained=False, num_classes=10)
    report = check_parity(model, X, modes=("eval",))
    assert report.coverage.startswith("0 of 8 blocks fused")
    assert all(any("se (" in r for r in b.reasons) for b in report.residual_blocks)
    assert not report.ok and any("nothing was fused" in f for f in report.failures)
    assert check_parity(model, X, modes=("eval",), allow_unfused=True).ok


def test_nothing_to_fuse_fails_unless_allowed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    report = check_parity(model, X)
    assert report.coverage == "0 of 0 blocks fused"
    assert not report.ok
    assert "0 of 0 blocks fused" in str(report)
    assert check_parity(model, X, allow_unfused=True).ok


def test_already_fused_model_and_plain_blocks():
    """A model built with fused blocks is checked against its reverted twin; a PlainBlock
    (no torchvision counterpart) runs its unfused forward in the reference."""
    torch.manual_seed(0)
    model = randomize_batchnorm(fusedres.models.resnet18(num_classes=10))
    assert assert_parity(model, X, modes=("eval",)).fused_count == 8
    plain = randomize_batchnorm(fusedres.models.cifar_plain20())
    report = assert_parity(plain, X[:, :, :32, :32], modes=("eval",))
    assert any("no unfused counterpart" in n for n in report.notes)


def test_plain_blocks_reference_is_really_unfused(monkeypatch):
    monkeypatch.setattr(TorchBackend, "conv_bias_act", _add(1e-3)(TorchBackend.conv_bias_act))
    plain = randomize_batchnorm(fusedres.models.cifar_plain20(backend="torch"))
    assert not check_parity(plain, X[:, :, :32, :32], backend="torch", modes=("eval",)).ok


def test_wrong_channels_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"conv1\) takes 3 input channels: expected inputs of shape \(N, 3, H, W\), "
                                         r"got \(2, 1, 64, 64\)"):
        check_parity(resnet18(), torch.randn(2, 1, 64, 64))


def test_original_model_that_cannot_run_the_dtype_is_a_usage_error():
    class NoHalf(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = narrow_resnet(tv_resnet.BasicBlock)

        def forward(self, x):
            if x.dtype == torch.float16:
                raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
            return self.net(x)

    with pytest.raises(ParityUsageError, match="cannot run eval float16 on cpu.*not implemented for 'Half'"):
        check_parity(NoHalf(), X, dtype=torch.float16, modes=("eval",))


def test_bad_arguments():
    model = resnet18()
    with pytest.raises(ParityUsageError, match="modes"):
        check_parity(model, X, modes=("predict",))
    with pytest.raises(ParityUsageError, match="unknown dtype"):
        check_parity(model, X, dtype="int8")
    with pytest.raises(ParityUsageError, match="unknown backend"):
        check_parity(model, X, backend="tpu")


def test_custom_loss_and_steps():
    model = narrow_resnet(tv_resnet.Bottleneck)
    randomize_batchnorm(model)
    report = assert_parity(model, X, modes=("train",), steps=2, loss_fn=lambda out: out.square().mean())
    assert report.steps == 2 and report.fused_count == 4


def test_fused_model_raising_is_a_failure(monkeypatch):
    def boom(self, inputs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(TorchBackend, "conv_bias_act", boom)
    report = check_parity(resnet18(), X, backend="torch", modes=("eval",))
    assert not report.ok
    assert report.errors == ["eval float64: the fused model raised RuntimeError: kernel exploded"]
