"""Bad input gets a clear error naming the block and what was expected."""

import pytest
import torch

import fusedres


@pytest.fixture(params=["eval", "train"])
def block(request):
    b = fusedres.Bottleneck(16, 4, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16)))
    return b.train(request.param == "train")


def test_wrong_rank(block):
    with pytest.raises(ValueError, match=r"Bottleneck\(in_channels=16.*expects a 4-D input .*got shape \(16, 8, 8\)"):
        block(torch.randn(16, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(1, 2, 16, 8, 8))


def test_wrong_channel_count(block):
    with pytest.raises(ValueError, match=r"expects 16 input channels .*got shape \(2, 8, 8, 8\)"):
        block(torch.randn(2, 8, 8, 8))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_dtype(block, dtype):
    with pytest.raises(TypeError, match="floating-point input"):
        block(torch.ones(2, 16, 8, 8, dtype=dtype))


def test_dtype_mismatch_without_autocast(block):
    with pytest.raises(TypeError, match="torch.float32 parameters but got a torch.float64 input"):
        block(torch.randn(2, 16, 8, 8, dtype=torch.float64))


def test_device_mismatch(block):
    with pytest.raises(ValueError, match="parameters on cpu but got an input on meta"):
        block(torch.randn(2, 16, 8, 8, device="meta"))


def test_not_a_tensor(block):
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        block([[1.0]])


def test_zero_spatial_size(block):
    with pytest.raises(ValueError, match="spatial size of at least 1x1"):
        block(torch.randn(2, 16, 0, 8))


def test_single_value_per_channel_in_train_mode():
    block = fusedres.BasicBlock(4, 4).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block(torch.randn(1, 4, 1, 1))
    block.eval()
    assert block(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_smallest_spatial_sizes_match_torchvision():
    import torchvision.models.resnet as tv

    ref = tv.Bottleneck(8, 4, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))).eval()
    fused = fusedres.Bottleneck(8, 4, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))).eval()
    fused.load_state_dict(ref.state_dict())
    for h, w in [(1, 1), (1, 5), (2, 3)]:
        x = torch.randn(2, 8, h, w)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x))


def test_convert_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedres.convert(torch.nn.Sequential(), backend="tensorrt")
