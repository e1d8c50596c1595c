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

Names are imported on first use, so that ``import convnorm_fx`` does not load PyTorch: the
``convnorm-fx`` command sets a passive OpenMP wait policy for its own process before PyTorch
loads OpenMP (see :mod:`convnorm_fx.cli`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "SpectralReport": "analysis",
    "SpectralRow": "analysis",
    "spectral_report": "analysis",
    "ConvNormCondConv2d": "cond_conv",
    "ConvNorm2d": "modules",
    "ConvNormConv2d": "modules",
    "bypass": "modules",
    "DEFAULT_EPS": "ops",
    "conv_norm2d": "ops",
    "ConvSite": "report",
    "RewriteReport": "report",
    "rewrite_report": "report",
    "ConvNormConfig": "config",
    "RewriteError": "rewrite",
    "apply": "rewrite",
    "ConvTracer": "tracing",
    "TracingFailed": "tracing",
}

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

if TYPE_CHECKING:
    from .analysis import SpectralReport, SpectralRow, spectral_report
    from .cond_conv import ConvNormCondConv2d
    from .modules import ConvNorm2d, ConvNormConv2d, bypass
    from .ops import DEFAULT_EPS, conv_norm2d
    from .report import ConvSite, RewriteReport, rewrite_report
    from .config import ConvNormConfig
    from .rewrite import RewriteError, apply
    from .tracing import ConvTracer, TracingFailed


_SUBMODULES = frozenset(
    {
        "analysis", "checks", "cli", "cond_conv", "config", "cost", "deploy", "derived", "dft", "geometry",
        "graph_facts", "models", "modules", "ops", "overrides", "pipeline", "planner", "precision", "report",
        "rewrite", "sites", "spectral", "spectrum", "tracing", "transaction", "validation",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'convnorm_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
