"""CIFAR backbones of the paper's experiments (Liu et al. 2021, §4), and their variants.

The architectures are written plainly and carry **no normalization layer** (the paper's
"vanilla" networks). The other variants of Table 1 are built from them:

* ``vanilla`` - the plain network: conv (with bias) -> ReLU;
* ``bn`` - the same network with ``nn.BatchNorm2d`` after every conv (the conv bias is
  dropped, since BatchNorm's shift replaces it): the usual conv -> BN -> ReLU;
* ``convnorm`` - ``convnorm_fx.apply(vanilla, bn=False)``: conv -> ConvNorm -> ReLU;
* ``convnorm_bn`` - ``convnorm_fx.apply(vanilla, bn=True)``: conv -> ConvNorm -> BN -> ReLU
  ("BatchNorm after ConvNorm", §4);
* ``sn`` - the vanilla network with spectral normalization (Miyato et al. 2018) on every conv
  (torch's ``spectral_norm`` parametrization: the kernel reshaped to ``C_out x (C_in k k)``,
  divided by its largest singular value from one power iteration per step), no BatchNorm: the
  SN baseline of Table 4 and Figure 4. The final linear layer is left as it is.

Backbones:

* :class:`ResNet18` - the CIFAR ResNet-18 (He et al. 2016 as adapted to 32x32 inputs): a 3x3
  stem conv with stride 1 and no max-pool, four stages of two basic blocks
  (64, 128, 256, 512 channels, strides 1, 2, 2, 2), 1x1 strided convs on the shortcuts
  that change shape, global average pooling and one linear layer.
* :class:`VGG16` - the CIFAR VGG-16 (configuration "D"): thirteen 3x3 convs in five blocks
  separated by 2x2 max-pools, then one linear layer on the 1x1x512 feature map.

``width`` multiplies every channel count, for reduced-scale runs (``width=0.25`` gives a
ResNet-18 with 16, 32, 64, 128 channels). Weights keep PyTorch's default initialization,
as in the paper (§4: "the default initialization in PyTorch for all networks").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

try:
    import convnorm_fx
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the package next door
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import convnorm_fx

__all__ = ["ARCHS", "VARIANTS", "ResNet18", "VGG16", "add_batchnorm", "add_spectral_norm", "build_model", "scaled"]

ARCHS = ("resnet18", "vgg16")
VARIANTS = ("vanilla", "bn", "convnorm", "convnorm_bn", "sn")

_VGG16_CONFIG: Sequence[int | str] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1.

    Args:
        channels: channel count of the full-width network.
        width: channel multiplier (> 0).

    Returns:
        The channel count of the scaled network.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (no normalization).

    Shape:
        - input: ``(N, C_in, H, W)``
        - output: ``(N, C_out, H // stride, W // stride)``
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.conv1(x))
        out = self.conv2(out)
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 without normalization layers.

    Args:
        num_classes: number of output classes.
        width: channel multiplier (1.0 is the paper's network, 11.2 M parameters).

    Shape:
        - input: ``(N, 3, H, W)`` (32x32 for CIFAR)
        - output: ``(N, num_classes)``

    Example:
        >>> ResNet18(10, width=0.25)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1)
        self.relu = nn.ReLU(inplace=True)
        layers, in_channels = [], widths[0]
        for index, (channels, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
            blocks = [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
            layers.append((f"layer{index + 1}", nn.Sequential(*blocks)))
            in_channels = channels
        for name, layer in layers:
            self.add_module(name, layer)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG16(nn.Module):
    """CIFAR VGG-16 without normalization layers.

    Args:
        num_classes: number of output classes.
        width: channel multiplier.

    Shape:
        - input: ``(N, 3, 32, 32)``
        - output: ``(N, num_classes)``

    Example:
        >>> VGG16(10, width=0.25)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                channels = scaled(int(item), width)
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class ConvBN(nn.Sequential):
    """A conv followed by ``nn.BatchNorm2d`` (what :func:`add_batchnorm` puts in place of a conv)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)


def add_batchnorm(model: nn.Module) -> nn.Module:
    """Put ``nn.BatchNorm2d`` after every ``nn.Conv2d`` of ``model`` (in place).

    Each conv ``name`` becomes a :class:`ConvBN` at the same name (parameters
    ``name.conv.weight``, ``name.bn.weight`` ...). The conv's bias is removed, because the
    BatchNorm that follows subtracts any constant per-channel shift and adds its own.

    Args:
        model: a network without normalization layers.

    Returns:
        ``model`` itself.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                child.bias = None
                setattr(parent, name, ConvBN(child))
    return model


def add_spectral_norm(model: nn.Module) -> nn.Module:
    """Put torch's ``spectral_norm`` parametrization on the weight of every ``nn.Conv2d`` (in place).

    Args:
        model: a network without normalization layers.

    Returns:
        ``model`` itself; each conv's weight becomes ``weight / sigma_max(weight.reshape(C_out, -1))``
        (parameter ``name.parametrizations.weight.original``).
    """
    for module in list(model.modules()):
        if type(module) is nn.Conv2d:
            nn.utils.parametrizations.spectral_norm(module)
    return model


def build_model(
    arch: str,
    variant: str,
    num_classes: int = 10,
    width: float = 1.0,
    *,
    affine: bool = True,
    affine_init: str = "identity",
    stop_gradient: bool = True,
) -> nn.Module:
    """Build one network of the paper's experiments.

    Args:
        arch: ``'resnet18'`` or ``'vgg16'``.
        variant: ``'vanilla'``, ``'bn'``, ``'convnorm'``, ``'convnorm_bn'`` or ``'sn'`` (module docstring).
        num_classes: number of classes (10 for CIFAR-10, 100 for CIFAR-100).
        width: channel multiplier.
        affine: ConvNorm variants: learn the per-channel affine kernel ``r_k`` (§3.3);
            ``False`` is the ablation of Table 2.
        affine_init: ConvNorm variants: ``'identity'`` or ``'default'`` (see
            :class:`convnorm_fx.ConvNorm2d`).
        stop_gradient: ConvNorm variants: treat the preconditioner as a constant in backward
            (§3.3, the library's default); ``False`` differentiates through it.

    Returns:
        The network, in training mode, on the CPU.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model: nn.Module = ResNet18(num_classes, width) if arch == "resnet18" else VGG16(num_classes, width)
    if variant == "bn":
        return add_batchnorm(model)
    if variant == "sn":
        return add_spectral_norm(model)
    if variant in ("convnorm", "convnorm_bn"):
        return convnorm_fx.apply(
            model,
            bn=(variant == "convnorm_bn"),
            affine=affine,
            affine_init=affine_init,
            stop_gradient=stop_gradient,
            inplace=True,
            strict=True,
        )
    return model
