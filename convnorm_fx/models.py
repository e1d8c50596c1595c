"""The CIFAR ConvNets of the paper's experiments (Liu et al. 2021, §4): one definition for the
command line, the benchmarks and the examples.

* :class:`CifarResNet` / :func:`cifar_resnet18`: ResNet-18 as adapted to 32x32 inputs (He et
  al. 2016): a 3x3 stem conv with stride 1 and no max-pool, four stages of two basic blocks
  (64, 128, 256, 512 channels, strides 1, 2, 2, 2), 1x1 strided convs on the shortcuts that
  change shape, global average pooling and one linear layer.
* :class:`CifarVGG` / :func:`cifar_vgg16`: VGG-16 (configuration "D"): thirteen 3x3 convs in
  five blocks separated by 2x2 max-pools, then one linear layer.

``norm=True`` puts ``BatchNorm2d`` after every conv (whose bias is then dropped);
``norm=False`` builds the "vanilla" network, conv (with bias) -> ReLU, the starting point of
the paper's ConvNorm variants. ``width`` scales every channel count (reduced-scale runs).
Weights keep PyTorch's default initialization, as in the paper.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "CifarVGG", "cifar_resnet18", "cifar_vgg16", "scaled"]

_VGG16_CONFIG: Sequence[int | str] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(1, int(round(channels * width)))


def _norm(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016).

    Shape:
        - input: ``(N, C_in, H, W)``
        - output: ``(N, C_out, H // stride, W // stride)``
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm)
        self.bn1 = _norm(c_out, norm)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not norm)
        self.bn2 = _norm(c_out, norm)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride, bias=not norm)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(c_out)) if norm else conv

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, four stages of :class:`BasicBlock`, global pooling.

    Shape:
        - input: ``(N, 3, H, W)``
        - output: ``(N, num_classes)``

    Example:
        >>> CifarResNet(num_classes=10, width=0.25)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: float = 1.0, norm: bool = True
    ) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=not norm)
        self.bn1 = _norm(widths[0], norm)
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], widths[0]
        for stage, (count, c_out) in enumerate(zip(blocks, widths)):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(count):
                stage_blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1, norm))
                c_in = c_out
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


class CifarVGG(nn.Module):
    """VGG for 32x32 inputs: 3x3 convs in pooled blocks (``features``) and one linear layer.

    Shape:
        - input: ``(N, 3, 32, 32)``
        - output: ``(N, num_classes)``
    """

    def __init__(
        self, config: Sequence[int | str] = _VGG16_CONFIG, num_classes: int = 10, width: float = 1.0, norm: bool = True
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            c_out = scaled(int(item), width)
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def cifar_resnet18(num_classes: int = 10, width: float = 1.0, norm: bool = True) -> CifarResNet:
    """CIFAR ResNet-18 (11.2M parameters at ``width=1``)."""
    return CifarResNet((2, 2, 2, 2), num_classes, width, norm)


def cifar_vgg16(num_classes: int = 10, width: float = 1.0, norm: bool = True) -> CifarVGG:
    """CIFAR VGG-16: thirteen 3x3 convs in five pooled stages and one linear classifier."""
    return CifarVGG(_VGG16_CONFIG, num_classes, width, norm)
