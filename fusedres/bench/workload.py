"""What is benchmarked: the model, its inputs, and its FLOP and memory-traffic counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

MODELS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)
# fusedres's own CIFAR networks (fusedres.models.cifar_*): 10 classes, 32x32 by default.
CIFAR_MODELS: tuple[str, ...] = (
    *(f"cifar_{kind}{depth}" for kind in ("resnet", "plain") for depth in (20, 32, 44, 56, 110)),
    "cifar_preact_resnet110", "cifar_preact_resnet164",
)
# The FPN ResNet-50 body of torchvision's detection models (`DetectionBody`).
DETECTION_MODELS: tuple[str, ...] = ("fpn_resnet50_body",)
ALL_MODELS: tuple[str, ...] = MODELS + CIFAR_MODELS + DETECTION_MODELS
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES: tuple[str, ...] = ("inference", "training")
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Workload:
    model: str
    batch: int
    dtype: str  # a key of DTYPES
    mode: str  # "inference" | "training"
    image_size: int
    device: torch.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        return f"{self.model}, {self.mode}, batch {self.batch}, {self.image_size}x{self.image_size}, {self.dtype}"


class DetectionBody(nn.Module):
    """The ResNet-50 body of torchvision's FPN detection models (Faster/Mask/Keypoint R-CNN,
    RetinaNet, FCOS) as their ImageNet-weights constructors build it: FrozenBatchNorm2d
    everywhere, conv1 and layer1 frozen (trainable_backbone_layers=3). It returns its four
    feature maps (layer1..layer4) flattened into one (N, K) tensor, so that the rows' parity
    check compares every value; a training step's loss is their mean square."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        self.body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3).body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.flatten(1) for f in self.body(x).values()], 1)


def loss(name: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A training step's loss: cross-entropy of the logits, or for a detection body the mean
    square of its features."""
    if name in DETECTION_MODELS:
        return out.float().square().mean()
    return F.cross_entropy(out.float(), labels)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-like BatchNorm state (random init has mean 0, var 1, weight 1, bias 0), so
    that folding and every BN term are really exercised by the parity check (frozen BNs too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(c, generator=gen) * 0.2)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(c, generator=gen) * 0.2)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def num_classes(name: str) -> int:
    return 10 if name in CIFAR_MODELS else NUM_CLASSES


def default_image_size(name: str) -> int:
    return 32 if name in CIFAR_MODELS else 224


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The model as eager PyTorch, in float32 on the CPU, with fixed random weights: a
    torchvision ResNet, a detection body (`DetectionBody`), or a fusedres CIFAR network whose
    blocks run their plain-module forward (`eager_blocks`; `activate_fused_blocks` turns them
    back into fused ones)."""
    if name not in ALL_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(ALL_MODELS)}")
    torch.manual_seed(seed)
    if name in DETECTION_MODELS:
        model = DetectionBody()
    elif name in CIFAR_MODELS:
        import fusedres

        model = eager_blocks(getattr(fusedres.models, name)(num_classes=num_classes(name)))
    else:
        model = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    randomize_bn(model, seed)
    return model


def _native_blocks(model: nn.Module) -> list[nn.Module]:
    from fusedres.blocks import FusedBlockMixin
    from fusedres.preact import PreActBlockMixin

    return [m for m in model.modules() if isinstance(m, (FusedBlockMixin, PreActBlockMixin))]


def eager_blocks(model: nn.Module) -> nn.Module:
    """Make every fusedres block of `model` run its plain-module forward (an instance
    attribute: module names and state_dict keys stay; deepcopy keeps it)."""
    for block in _native_blocks(model):
        block.forward = block._unfused_forward
    return model


def activate_fused_blocks(model: nn.Module, backend: str) -> nn.Module:
    """Undo `eager_blocks`: every fusedres block runs fused again, on `backend`."""
    from fusedres.backends import check_backend_name

    for block in _native_blocks(model):
        block.__dict__.pop("forward", None)
        block.backend = check_backend_name(backend)
    return model


def make_batch(work: Workload, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch: float32 NCHW images and class labels, on the workload's device."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(work.batch, 3, work.image_size, work.image_size, generator=gen)
    labels = torch.randint(0, num_classes(work.model), (work.batch,), generator=gen)
    return x.to(work.device), labels.to(work.device)


def count_flops_per_image(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs (2 x multiply-accumulates of every conv and linear layer) for one image."""
    with torch.no_grad():
        return count_module_flops(model.eval(), torch.zeros(1, 3, image_size, image_size))


@dataclass(frozen=True)
class Stage:
    """One unit of the whole-block-fusion roofline: FLOPs and the bytes it must move per image."""

    name: str
    flops: float
    elements_moved: float  # elements read + written per image when the stage is one fused kernel


def block_stages(model: nn.Module, image_size: int) -> list[Stage]:
    """The stem, every residual block and the head, each as if fused into one pass.

    A fused block reads its input once and writes its output once; everything inside
    (conv outputs, BN, ReLU, the shortcut) stays on chip. This is the traffic floor the
    design aims at (see DESIGN.md: ~23 MB per image for ResNet-50 in bf16).
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from fusedres.cifar import CifarPreActResNet, CifarResNet
    from fusedres.preact import PreActBlockMixin

    stages: list[Stage] = []

    def add(name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        stages.append(Stage(name, count_module_flops(module, x), float(x[0].numel() + out[0].numel())))

    with torch.no_grad():
        model = model.eval()
        x = torch.zeros(1, 3, image_size, image_size)
        if isinstance(model, DetectionBody):
            model = model.body
            stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            layers, head = ("layer1", "layer2", "layer3", "layer4"), None
        elif isinstance(model, CifarPreActResNet):
            stem, layers, head = model.conv1, ("layer1", "layer2", "layer3"), [model.norm]
        elif isinstance(model, CifarResNet):
            stem, layers, head = nn.Sequential(model.conv1, model.bn1, model.relu), ("layer1", "layer2", "layer3"), []
        else:
            stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            layers, head = ("layer1", "layer2", "layer3", "layer4"), []
        y = stem(x)
        add("stem", stem, x, y)
        for layer_name in layers:
            for i, block in enumerate(getattr(model, layer_name)):
                if not isinstance(block, (BasicBlock, Bottleneck, PreActBlockMixin)):
                    raise TypeError(f"{layer_name}[{i}] is a {type(block).__name__}, not a ResNet block")
                out = block(y)
                add(f"{layer_name}.{i}", block, y, out)
                y = out
        if head is not None:  # a detection body has none
            head = nn.Sequential(*head, model.avgpool, nn.Flatten(1), model.fc)
            add("head", head, y, head(y))
    return stages


def count_module_flops(module: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of `module(x)` per image: 2 x multiply-accumulates of its conv and linear layers."""
    total = 0.0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2.0 * out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * out[0].numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    return total
