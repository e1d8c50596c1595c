"""Tiny factories for command-line tests (importable as ``cli_models:tiny_net``)."""

from torch import nn


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def untraceable_conv_net() -> nn.Module:
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(nn.init.kaiming_normal_(nn.Parameter(__import__("torch").empty(4, 3, 3, 3))))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: cannot be traced, and its conv is functional
                x = x * 1.0
            return nn.functional.conv2d(x, self.weight, padding=1)

    return nn.Sequential(Hidden(), nn.Flatten())


def raising_factory() -> nn.Module:
    raise RuntimeError("broken on purpose")


def not_a_model() -> list:
    return [nn.Conv2d(3, 3, 3)]
