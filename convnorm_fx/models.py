"""Small reference ConvNets used by the command line, the benchmarks and the examples.

The CIFAR variants of ResNet-18 and VGG-16 the paper trains (Section 4): a 3x3 stride-1 stem
without max pooling, for 32x32 inputs. ``norm=False`` builds the "vanilla" network without
BatchNorm, the starting point of the paper's ``ConvNorm`` variant; ``norm=True`` the usual
conv + BN network. ``width`` scales every channel count (reduced-scale runs).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["cifar_resnet18", "cifar_vgg16", "CifarResNet", "BasicBlock"]


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _norm(channels: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm)
        self.bn1 = _norm(c_out, norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not norm)
        self.bn2 = _norm(c_out, norm)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not norm), _norm(c_out, norm))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, four stages of :class:`BasicBlock`, global pooling.

    Shape:
        - input: ``(N, 3, H, W)``
        - output: ``(N, num_classes)``
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: float = 1.0, norm: bool = True) -> None:
        super().__init__()
        widths = [_channels(c, width) for c in (64, 128, 256, 512)]
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
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


def cifar_resnet18(num_classes: int = 10, width: float = 1.0, norm: bool = True) -> CifarResNet:
    """CIFAR ResNet-18 (11.2M parameters at ``width=1``)."""
    return CifarResNet((2, 2, 2, 2), num_classes, width, norm)


def cifar_vgg16(num_classes: int = 10, width: float = 1.0, norm: bool = True) -> nn.Sequential:
    """CIFAR VGG-16: thirteen 3x3 convs in five pooled stages and one linear classifier."""
    config = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    layers: list[nn.Module] = []
    c_in = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = _channels(int(item), width)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm), _norm(c_out, norm), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
