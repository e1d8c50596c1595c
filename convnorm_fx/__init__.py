"""convnorm_fx: Convolutional Normalization (Liu et al., NeurIPS 2021) for any PyTorch ConvNet.

One line puts ConvNorm behind every 2-D convolution of a model::

    model = convnorm_fx.apply(model)
    print(convnorm_fx.rewrite_report(model).summary())

Public API:

* :func:`apply`, :func:`rewrite_report` - the FX pass and what it did;
* :func:`conv_norm2d` - a conv followed by ConvNorm, as one function;
* :class:`ConvNorm2d` - the normalization stage of one conv site;
* :class:`ConvNormConv2d` - a drop-in ``nn.Conv2d`` with ConvNorm;
* :class:`ConvNormCondConv2d` - timm's ``CondConv2d`` with ConvNorm on each sample's kernel;
* :func:`bypass` - turn ConvNorm off on a whole model (identity preconditioner);
* :func:`spectral_report` - per-layer singular values and condition numbers (Figure 2).
"""

from .analysis import SpectralReport, SpectralRow, spectral_report
from .cond_conv import ConvNormCondConv2d
from .modules import ConvNorm2d, ConvNormConv2d, bypass
from .ops import DEFAULT_EPS, conv_norm2d
from .report import ConvSite, RewriteReport, rewrite_report
from .rewrite import ConvNormConfig, RewriteError, apply
from .tracing import ConvTracer, TracingFailed

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPS",
    "ConvNorm2d",
    "ConvNormCondConv2d",
    "ConvNormConfig",
    "ConvNormConv2d",
    "ConvSite",
    "ConvTracer",
    "RewriteError",
    "RewriteReport",
    "SpectralReport",
    "SpectralRow",
    "TracingFailed",
    "__version__",
    "apply",
    "bypass",
    "conv_norm2d",
    "rewrite_report",
    "spectral_report",
]
