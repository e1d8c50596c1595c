"""A torch.fx tracer that keeps every convolution visible.

torchvision's feature-extraction tracer makes ``Conv2dNormActivation`` and friends leaves,
and timm's leaf registry contains conv-bearing blocks (``NormFreeBlock``, ``MobileVitBlock``
...): both hide convolutions from a graph pass. :class:`ConvTracer` instead

* makes every *plain* ``nn.Conv2d`` a leaf, so each conv is exactly one ``call_module`` node;
* traces *through* conv subclasses that change the forward pass (timm's ``StdConv2d``,
  ``ScaledStdConv2d``, ``Conv2dSame``...), so their standardized weight or dynamic padding
  shows up as the ``F.conv2d`` call that really runs;
* borrows timm's leaf modules and autowrapped functions, except leaves that contain a conv,
  and autowraps timm's dynamic "same" padding so that shape arithmetic does not break tracing;
* makes timm's ``CondConv2d`` (per-sample expert kernels; its grouped conv depends on the
  batch size) and its rewritten :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d` leaves, so
  each is one ``call_module`` node that a module swap replaces;
* treats :class:`~convnorm_fx.modules.ConvNorm2d` stages and (optionally)
  :class:`~convnorm_fx.modules.ConvNormConv2d` as leaves, so a rewritten model traces too;
* traces *through* parametrized convs (``torch.nn.utils.parametrize``), whose convolved
  weight is computed by the parametrization.

Tracing leaves the traced module as it was: ``torch.fx`` stores tensor constants it meets as
attributes of the root (``_tensor_constant0`` ...); :func:`trace_module` removes them again
and hands them back with the graph.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .cond_conv import ConvNormCondConv2d, is_cond_conv2d
from .modules import ConvNorm2d, ConvNormConv2d

__all__ = [
    "CONVNORM_MODULES",
    "CONV_FUNCTIONS",
    "ConvTracer",
    "TracedModule",
    "TracingFailed",
    "is_plain_conv2d",
    "register_with_timm",
    "trace",
    "trace_module",
]

#: Callables that are a 2-D convolution when they appear as ``call_function`` targets.
CONV_FUNCTIONS: tuple[Callable[..., Any], ...] = (F.conv2d, torch.conv2d)


class TracingFailed(RuntimeError):
    """A module could not be traced symbolically (its forward has data-dependent Python)."""


def is_plain_conv2d(module: nn.Module) -> bool:
    """True for ``nn.Conv2d`` and subclasses that keep its forward pass and its weight.

    Such a module becomes a :class:`ConvNormConv2d` without changing what it computes.
    Subclasses overriding ``forward`` or ``_conv_forward`` (weight standardization, dynamic
    padding, ...) and parametrized convs (the convolved weight is computed) are not plain:
    they are traced through, so the weight that is really convolved is the one normalized.
    """
    if not isinstance(module, nn.Conv2d) or isinstance(module, ConvNormConv2d):
        return False
    if parametrize.is_parametrized(module):
        return False
    cls = type(module)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


@functools.lru_cache(maxsize=1)
def _timm_registry() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """timm's leaf classes and autowrapped functions, plus its dynamic 'same' padding helpers."""
    try:
        import timm.layers as timm_layers
        from timm.layers import padding as timm_padding
    except ImportError:  # timm is a dependency, but keep the tracer usable without it
        return (), ()
    leaves = tuple(timm_layers.get_notrace_modules())
    functions = list(timm_layers.get_notrace_functions())
    # pad_same computes its padding from the input's shape: as a leaf function it becomes one
    # node, and the F.conv2d that follows it stays visible.
    for name in ("pad_same", "pad_same_arg", "get_same_padding"):
        fn = getattr(timm_padding, name, None)
        if fn is not None:
            functions.append(fn)
    return leaves, tuple(functions)


class ConvTracer(fx.Tracer):
    """``torch.fx`` tracer for conv rewriting; see the module docstring.

    Args:
        leaf_modules: extra module classes to keep as leaves (e.g. a block with
            data-dependent control flow and no convs).
        autowrap_functions: extra functions to record as single nodes.
        trace_convnorm_convs: trace through :class:`ConvNormConv2d` (to expose the full conv
            and its stage in a flat graph) instead of keeping it as a leaf.
        leaf_names: qualified names (relative to the traced module) of submodules to keep as
            leaves, e.g. children found to be untraceable on their own.
        own_code_only: keep every submodule as a leaf, so that the graph holds only the traced
            module's own code (how the rewrite traces a module whose forward calls ``F.conv2d``).
    """

    def __init__(
        self,
        leaf_modules: Iterable[type] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
        trace_convnorm_convs: bool = False,
        leaf_names: Iterable[str] = (),
        own_code_only: bool = False,
    ) -> None:
        timm_leaves, timm_functions = _timm_registry()
        super().__init__(autowrap_functions=tuple(timm_functions) + tuple(autowrap_functions))
        self._extra_leaves = tuple(leaf_modules)
        self._timm_leaves = timm_leaves
        self._trace_convnorm_convs = trace_convnorm_convs
        self._leaf_names = frozenset(leaf_names)
        self._own_code_only = own_code_only

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or self._own_code_only:
            return True
        if isinstance(m, ConvNorm2d):
            return True
        if is_cond_conv2d(m) or isinstance(m, ConvNormCondConv2d):
            return True  # traced through, its conv's groups would be a proxy of the batch size
        if isinstance(m, ConvNormConv2d):
            return not self._trace_convnorm_convs
        if isinstance(m, nn.Conv2d):
            return is_plain_conv2d(m)
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        if self._timm_leaves and isinstance(m, self._timm_leaves) and not _contains_conv(m):
            # A non-conv leaf (norm-act layers, same-padding pools...) that timm knows
            # cannot be traced; functional convs inside such leaves would be hidden, but
            # timm's non-conv leaves do not call F.conv2d on learned weights.
            return not _calls_functional_conv(type(m))
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self.is_leaf_module(m, self.path_of_module(m)):
            # Trace the module's own code, not its hooks: hooks registered on it are the
            # user's code for real tensors (a traced hook would be handed proxies, and would
            # fire during the rewrite). They stay on the module and run when the model runs.
            forward = m.forward
        return super().call_module(m, forward, args, kwargs)


@functools.lru_cache(maxsize=None)
def _calls_functional_conv(cls: type) -> bool:
    """Whether a class's own forward source mentions a 2-D conv call (best effort)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "conv2d" in source


#: The library's modules, for other tracers: leaves in timm's registry (and traceable by
#: any tracer, their forward being one ``torch.fx.wrap``-ed call).
CONVNORM_MODULES: tuple[type, ...] = (ConvNorm2d, ConvNormConv2d, ConvNormCondConv2d)


def register_with_timm() -> None:
    """Add the library's modules to timm's FX leaf registry, so that timm's feature
    extraction (``features_only`` with ``feature_cls='fx'``, ``create_feature_extractor``)
    keeps each as one node and runs it exactly as in eager mode.

    Runs on import when timm is loaded, and at every :func:`convnorm_fx.apply`; adding a class
    twice does nothing. Without it timm traces through them, which works too.
    """
    timm_layers = sys.modules.get("timm.layers")
    register = getattr(timm_layers, "register_notrace_module", None)
    if register is not None:
        for cls in CONVNORM_MODULES:
            register(cls)


class TracedModule(NamedTuple):
    """A graph of a module and the tensor constants its code refers to.

    Attributes:
        graph: the ``torch.fx`` graph; ``get_attr`` nodes name attributes of the module.
        constants: tensors that the tracer met as constants (not parameters or buffers),
            by the attribute name the graph reads them from (``_tensor_constant0`` ...). They
            are not left on the module: a rewrite that runs the graph as the module's forward
            sets them.
    """

    graph: fx.Graph
    constants: dict[str, Any]


def trace_module(
    module: nn.Module,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
    trace_convnorm_convs: bool = False,
    leaf_names: Iterable[str] = (),
    own_code_only: bool = False,
) -> TracedModule:
    """Trace ``module`` with :class:`ConvTracer` (arguments as in its constructor), leaving
    the module as it was (mode and attributes).

    Raises:
        TracingFailed: with the original error chained and hints on how to help the tracer.
    """
    tracer = ConvTracer(leaf_modules, autowrap_functions, trace_convnorm_convs, leaf_names, own_code_only)
    was_training = module.training
    attributes = set(vars(module))
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for untraceable code
        raise TracingFailed(
            f"could not trace {type(module).__name__}: {type(e).__name__}: {e}. Hints: pass "
            "leaf_modules=[...] for blocks with data-dependent control flow that contain no conv, "
            "or concrete_args to pin optional forward() arguments"
        ) from e
    finally:
        module.train(was_training)
        added = {name: vars(module)[name] for name in set(vars(module)) - attributes}
        for name in added:
            delattr(module, name)
    return TracedModule(graph, added)


def trace(module: nn.Module, **options: Any) -> fx.Graph:
    """The graph of :func:`trace_module` (same arguments)."""
    return trace_module(module, **options).graph


register_with_timm()
