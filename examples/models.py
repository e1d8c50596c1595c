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

The backbones are the package's (:mod:`convnorm_fx.models`), built with ``norm=False``:

* ``resnet18`` - :func:`convnorm_fx.models.cifar_resnet18`, the CIFAR ResNet-18 (3x3 stem with
  stride 1, no max-pool, 1x1 strided convs on the shortcuts that change shape);
* ``vgg16`` - :func:`convnorm_fx.models.cifar_vgg16`, the CIFAR VGG-16 (configuration "D",
  one linear layer).

``width`` multiplies every channel count, for reduced-scale runs (``width=0.25`` gives a
ResNet-18 with 16, 32, 64, 128 channels). Weights keep PyTorch's default initialization,
as in the paper (§4: "the default initialization in PyTorch for all networks"). ``bn`` is
built from the vanilla network (rather than with ``norm=True``) so that every variant starts
from the same conv weights for the same seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

try:
    import convnorm_fx
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the package next door
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import convnorm_fx
from convnorm_fx.models import BasicBlock, cifar_resnet18, cifar_vgg16

__all__ = ["ARCHS", "VARIANTS", "BasicBlock", "ConvBN", "add_batchnorm", "add_spectral_norm", "build_model"]

ARCHS = ("resnet18", "vgg16")
VARIANTS = ("vanilla", "bn", "convnorm", "convnorm_bn", "sn")


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
    backbone = cifar_resnet18 if arch == "resnet18" else cifar_vgg16
    model: nn.Module = backbone(num_classes, width, norm=False)
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
