"""convnorm_fx: Convolutional Normalization (Liu et al., NeurIPS 2021) for any PyTorch ConvNet.

Public API:

* :func:`conv_norm2d` - a conv followed by ConvNorm, as one function;
* :class:`ConvNorm2d` - the normalization stage of one conv site;
* :class:`ConvNormConv2d` - a drop-in ``nn.Conv2d`` with ConvNorm;
* :func:`bypass` - turn ConvNorm off on a whole model (identity preconditioner).
"""

from .modules import ConvNorm2d, ConvNormConv2d, bypass
from .ops import DEFAULT_EPS, conv_norm2d

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPS",
    "ConvNorm2d",
    "ConvNormConv2d",
    "__version__",
    "bypass",
    "conv_norm2d",
]
