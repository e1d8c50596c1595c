"""Rewritten modules keep their class: generated subclasses that copy and pickle.

:func:`convnorm_fx.apply` changes a module in place, by giving the very object a subclass of
its own class, so that everything the user holds or registered stays valid: references to
the module, ``isinstance`` checks, methods, every buffer and attribute, hooks, state-dict
hooks, parametrizations, and module sharing (a module registered under several names is
one object, rewritten once).

* A conv becomes a :class:`~convnorm_fx.modules.ConvNormConv2d` (a timm ``CondConv2d`` a
  :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d`). For a subclass ``C`` of ``nn.Conv2d``
  (or of ``CondConv2d``) the new class derives from both the ConvNorm class and ``C``
  (:func:`converted_class`).
* A module whose own forward calls ``F.conv2d`` gets a subclass of its class whose
  ``forward`` is the rewritten graph's code (:func:`rewritten_forward_class`).

Generated classes are not importable by name, so their instances pickle (and ``torch.save``)
through a recipe: the original class, and the forward's source for rewritten forwards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import linecache
import types
from typing import Any, Mapping

from torch import fx, nn

from .cond_conv import ConvNormCondConv2d
from .modules import ConvNormConv2d

__all__ = ["converted_class", "forward_source", "rewritten_forward_class"]

# The ConvNorm class for each kind of conv, and the base class it already derives from.
_CONVNORM_CLASSES: dict[type, type] = {ConvNormConv2d: nn.Conv2d, ConvNormCondConv2d: nn.Module}


def _reduce_generated(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """Pickle an instance of a generated class by its recipe and its state."""
    getstate = getattr(self, "__getstate__", None)
    state = getstate() if getstate is not None else self.__dict__
    return (_new_instance, (type(self)._convnorm_recipe,), state)


def _new_instance(recipe: tuple[Any, ...]) -> nn.Module:
    kind, *arguments = recipe
    cls = converted_class(*arguments) if kind == "converted" else _forward_class_from_recipe(*arguments)
    return cls.__new__(cls)


def converted_class(convnorm_class: type, base: type) -> type:
    """The class a module of class ``base`` gets when it becomes ``convnorm_class``.

    ``convnorm_class`` itself when ``base`` is the class it derives from (``nn.Conv2d`` for
    :class:`ConvNormConv2d`); otherwise a subclass of both, named ``ConvNorm<base>``, so
    that ``isinstance(module, base)`` and ``base``'s methods survive. The same arguments
    give the same class.
    """
    if convnorm_class not in _CONVNORM_CLASSES:
        raise TypeError(f"{convnorm_class.__name__} is not a ConvNorm module class")
    if base is _CONVNORM_CLASSES[convnorm_class] or issubclass(base, convnorm_class):
        return convnorm_class
    return _converted_class(convnorm_class, base)


@functools.lru_cache(maxsize=None)
def _converted_class(convnorm_class: type, base: type) -> type:
    namespace = {
        "__module__": base.__module__,
        "__doc__": f"{base.__name__} with ConvNorm ({convnorm_class.__name__}); see convnorm_fx.apply.",
        "__reduce_ex__": _reduce_generated,
        "_convnorm_recipe": ("converted", convnorm_class, base),
    }
    return type(f"ConvNorm{base.__name__}", (convnorm_class, base), namespace)


def forward_source(graph: fx.Graph) -> tuple[str, dict[str, Any]]:
    """The Python source of ``def forward(self, ...)`` running ``graph`` on ``self``, and the
    globals that source needs."""
    code = graph.python_code(root_module="self")
    return code.src, dict(code.globals)


def rewritten_forward_class(base: type, source: str, namespace: Mapping[str, Any]) -> type:
    """A subclass of ``base``, with its name, whose ``forward`` is ``source``.

    Args:
        base: the module's class.
        source: a ``def forward(self, ...)`` (:func:`forward_source` of the rewritten graph).
        namespace: the globals ``source`` refers to. Modules are pickled by name, other
            values (functions, classes, constants) by reference or value.
    """
    spec = tuple(
        sorted(
            (name, "module", value.__name__) if isinstance(value, types.ModuleType) else (name, "value", value)
            for name, value in namespace.items()
        )
    )
    return _forward_class_from_recipe(base, source, spec)


def _forward_class_from_recipe(base: type, source: str, spec: tuple[tuple[str, str, Any], ...]) -> type:
    try:
        return _forward_class(base, source, spec)
    except TypeError:  # an unhashable global value: build an uncached class
        return _forward_class.__wrapped__(base, source, spec)


@functools.lru_cache(maxsize=None)
def _forward_class(base: type, source: str, spec: tuple[tuple[str, str, Any], ...]) -> type:
    namespace: dict[str, Any] = {}
    for name, kind, value in spec:
        namespace[name] = importlib.import_module(value) if kind == "module" else value
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<convnorm_fx forward of {base.__qualname__} {digest}>"
    # Registered with linecache, as torch.fx does, so tracebacks and inspect show the code.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    attributes = {
        "forward": namespace["forward"],
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__reduce_ex__": _reduce_generated,
        "_convnorm_recipe": ("forward", base, source, spec),
    }
    return type(base.__name__, (base,), attributes)
