"""The options of a ConvNorm site, in one frozen object that validates itself.

Every entry point builds or receives a :class:`ConvNormConfig`: :func:`convnorm_fx.apply`
(one per site, from its keyword options and ``overrides``), the stage
:class:`~convnorm_fx.modules.ConvNorm2d`, the drop-in :class:`~convnorm_fx.modules.ConvNormConv2d`
and :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d`. Keyword options on any of them are a
shortcut that builds the config in :meth:`ConvNormConfig.build`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from .spectrum import DEFAULT_EPS
from .validation import AFFINE_INITS, ALGORITHMS, EVAL_SPECTRA, check_bool, check_choice, check_real

__all__ = ["BN_POLICIES", "STAGE_DEFAULTS", "ConvNormConfig", "stage_config"]

#: Values of ``bn``: ``"auto"`` lets :func:`convnorm_fx.apply` decide per site.
BN_POLICIES = ("auto", True, False)


@dataclass(frozen=True)
class ConvNormConfig:
    """Options of one ConvNorm site (Liu et al. 2021, §3.2-3.3).

    Invalid values raise ``TypeError`` (wrong type) or ``ValueError`` (wrong value) naming the
    option, the value and what is allowed.

    Example:
        >>> config = ConvNormConfig(eps=1e-3, bn=False)
        >>> ConvNormConfig.build(config, affine=False).eps
        0.001
    """

    # BatchNorm after the stage: "auto" (apply adds one only where the conv output does not
    # already flow into a normalization), True (always) or False (never).
    bn: str | bool = "auto"
    # Learnable per-channel depthwise affine transform r_k (§3.3).
    affine: bool = True
    # "identity" (start as pure ConvNorm) or "default" (PyTorch conv init, as the paper's code).
    affine_init: str = "identity"
    # Added to the kernel power spectrum; bounds the gain by eps ** -0.5. 0.0 = exact operator.
    eps: float = DEFAULT_EPS
    # Treat the preconditioner as a constant in backward (§3.3).
    stop_gradient: bool = True
    # Eval-mode spectrum: "cache" (of the current weight) or "running" (EMA of autocorrelation).
    eval_spectrum: str = "cache"
    # Momentum of the running spectrum.
    momentum: float = 0.1
    # Raise FloatingPointError naming the site at the first NaN/Inf in a weight, input or output.
    check_finite: bool = False
    # How a site is computed: "auto" (a cost model picks), "direct" or "spectral".
    algorithm: str = "auto"
    # Eval mode: keep each spectral site's per-frequency operator between calls (memory for speed).
    eval_kernel_cache: bool = False

    def __post_init__(self) -> None:
        check_choice("bn", self.bn, BN_POLICIES)
        check_bool("affine", self.affine)
        check_choice("affine_init", self.affine_init, AFFINE_INITS)
        eps = check_real("eps", self.eps, low=0.0, allowed="a finite real number >= 0 (0.0 is the exact operator)")
        check_bool("stop_gradient", self.stop_gradient)
        check_choice("eval_spectrum", self.eval_spectrum, EVAL_SPECTRA)
        momentum = check_real("momentum", self.momentum, low=0.0, high=1.0, allowed="a real number in [0, 1]")
        check_bool("check_finite", self.check_finite)
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_bool("eval_kernel_cache", self.eval_kernel_cache)
        object.__setattr__(self, "eps", eps)  # a plain float (from an int or a NumPy number)
        object.__setattr__(self, "momentum", momentum)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The option names."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, config: ConvNormConfig | None = None, /, **options: Any) -> ConvNormConfig:
        """``config`` (default: all defaults) with ``options`` replaced, validated.

        Raises:
            TypeError: for an option that does not exist (with the closest name), or a
                ``config`` that is not a ``ConvNormConfig``.
        """
        if config is None:
            config = cls()
        elif not isinstance(config, ConvNormConfig):
            raise TypeError(f"config must be a ConvNormConfig or None, got {config!r}")
        unknown = [name for name in options if name not in cls.fields()]
        if unknown:
            close = difflib.get_close_matches(unknown[0], cls.fields(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown ConvNorm option {unknown[0]!r}{hint}; options: {', '.join(cls.fields())}")
        return dataclasses.replace(config, **options) if options else config


#: What a stage built on its own starts from: like :class:`ConvNormConfig`, but without a
#: BatchNorm unless asked (``"auto"`` is for :func:`convnorm_fx.apply` to decide).
STAGE_DEFAULTS = ConvNormConfig(bn=False)


def stage_config(config: ConvNormConfig | None = None, /, **options: Any) -> ConvNormConfig:
    """The config of a stage built on its own: ``config`` (default :data:`STAGE_DEFAULTS`) with
    ``options`` replaced, whose ``bn`` must be ``True`` or ``False``."""
    config = ConvNormConfig.build(STAGE_DEFAULTS if config is None else config, **options)
    if config.bn == "auto":
        raise ValueError(
            "bn='auto' is for convnorm_fx.apply, which decides per site; a ConvNorm module takes bn=True or bn=False"
        )
    return config
