"""Image backbones for the self-supervised methods: image [B, 3, S, S] -> features [B, dim].

    resnet18-small   torchvision ResNet-18 with a small-image stem (3x3 conv, stride 1, no max-pool),
                     as SimCLR/SwAV use for CIFAR-sized images; dim 512
    resnet18         torchvision ResNet-18 as published (ImageNet stem); dim 512
    resnet-micro     timm ResNet with one basic block per stage, widths 32-256 and a 3x3 stride-2
                     64-wide stem (no max-pool): a CPU-sized convnet for 32-64 px images; dim 256
    vit-micro        timm ViT, width 96, depth 4, 3 heads (CPU-sized); dim 96
    vit-tiny         timm ViT-Tiny: width 192, depth 12, 3 heads; dim 192
    vit-small        timm ViT-Small: width 384, depth 12, 6 heads; dim 384
    timm:NAME        any timm model by name, random init, classifier removed

ViTs take `patch_size` (default: image_size // 8) and pool the class token.
Their attention runs through PyTorch's scaled_dot_product_attention, which the
ONNX exporter writes as plain MatMul/Softmax ops (checked at export).
"""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

VITS = {"vit-micro": (96, 4, 3), "vit-tiny": (192, 12, 3), "vit-small": (384, 12, 6)}
NAMES = ("resnet18-small", "resnet18", "resnet-micro", *VITS, "timm:NAME")


class Backbone(nn.Module):
    """A feature extractor with a known output width."""

    def __init__(self, net: nn.Module, dim: int, name: str):
        super().__init__()
        self.net, self.dim, self.name = net, dim, name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _resnet18(small_stem: bool) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _resnet_micro() -> nn.Module:
    # zero_init_last=False: the random-init baseline keeps its residual branches, as torchvision's does.
    net = timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, (1, 1, 1, 1), channels=(32, 64, 128, 256),
                                    num_classes=0, zero_init_last=False)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def vit(width: int, depth: int, heads: int, image_size: int, patch_size: int | None = None,
        dynamic_size: bool = False) -> nn.Module:
    patch = patch_size or max(1, image_size // 8)
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch}")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
        num_classes=0, global_pool="token", class_token=True, dynamic_img_size=dynamic_size,
    )


def build_backbone(name: str, image_size: int, patch_size: int | None = None, dynamic_size: bool = False) -> Backbone:
    """`dynamic_size`: ViTs accept other input sizes (position embeddings are resampled), for multi-crop."""
    if name in ("resnet18-small", "resnet18"):
        return Backbone(_resnet18(small_stem=name == "resnet18-small"), 512, name)
    if name == "resnet-micro":
        return Backbone(_resnet_micro(), 256, name)
    if name in VITS:
        width, depth, heads = VITS[name]
        return Backbone(vit(width, depth, heads, image_size, patch_size, dynamic_size), width, name)
    if name.startswith("timm:"):
        net = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=0)
        return Backbone(net, int(net.num_features), name)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(NAMES)}")
