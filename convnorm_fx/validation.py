"""Argument checks at the door: each names the option, the value and what is allowed.

A wrong type is a ``TypeError`` (``affine="no"`` is not a boolean, even though it is truthy);
a value of the right type outside the allowed set or range is a ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Sequence

from torch import nn

__all__ = [
    "AFFINE_INITS",
    "ALGORITHMS",
    "EVAL_SPECTRA",
    "check_bool",
    "check_callables",
    "check_choice",
    "check_module_classes",
    "check_real",
]

#: Values of ``affine_init``: a centred delta (the stage starts as pure ConvNorm), or
#: PyTorch's conv initialization (as the paper's code).
AFFINE_INITS = ("identity", "default")
#: Values of ``eval_spectrum``: a cache of the current weight's spectrum, or a running average.
EVAL_SPECTRA = ("cache", "running")
#: How a site is computed. ``'direct'``: the full conv, then the stage (FFT normalization,
#: affine depthwise conv, crop, stride). ``'spectral'``: one transform of the input, a
#: per-frequency ``C_out x C_in`` product with the normalized kernel spectrum, one inverse
#: transform of the kept output samples. ``'auto'``: the cheaper by a cost model
#: (:func:`convnorm_fx.cost.select_algorithm`).
ALGORITHMS = ("auto", "direct", "spectral")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; otherwise ``TypeError`` (strings and numbers are refused,
    since ``"no"`` and ``2`` are truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_real(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, allowed: str = "a real number"
) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, compared by type too (``1`` is not ``True``): a
    value of none of the choices' types is a ``TypeError``, another value a ``ValueError``."""
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    allowed = ", ".join(map(repr, choices))
    if not any(type(value) is type(choice) for choice in choices):
        raise TypeError(f"{name} must be one of {allowed}; got {value!r} ({type(value).__name__})")
    raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def check_module_classes(name: str, value: Any) -> tuple[type, ...]:
    """A tuple of ``nn.Module`` subclasses from a sequence of them."""
    if isinstance(value, type):
        raise TypeError(
            f"{name} must be a sequence of nn.Module classes, got the class {value.__name__} itself: pass [{value.__name__}]"
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of nn.Module classes, got {value!r}")
    classes = tuple(value)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{name} must hold nn.Module classes, got {cls!r}")
    return classes


def check_callables(name: str, value: Any) -> tuple[Callable[..., Any], ...]:
    """A tuple of callables from a sequence of them."""
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        name_hint = getattr(value, "__name__", value)
        raise TypeError(f"{name} must be a sequence of functions, got {value!r}: pass [{name_hint}]")
    functions = tuple(value)
    for fn in functions:
        if not callable(fn):
            raise TypeError(f"{name} must hold functions, got {fn!r}")
    return functions
