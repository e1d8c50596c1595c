"""The kinds of conv sites: how each is recognized, described and rewritten.

The planner (:mod:`convnorm_fx.planner`) finds candidate sites, modules and ``call_function``
nodes, and asks this registry what each is. Each kind owns its match, its description in the
report, and the change it prepares:

* :class:`ConvModuleKind`: ``nn.Conv2d`` and subclasses that keep its forward and its weight;
  becomes a :class:`~convnorm_fx.modules.ConvNormConv2d` in place;
* :class:`CondConvKind`: timm's ``CondConv2d``; becomes a
  :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d` in place;
* :class:`OutOfScopeKind`: 1-D, 3-D and transposed convs, listed and not rewritten;
* :class:`FunctionalConvKind`: ``F.conv2d``/``torch.conv2d`` in a module's own forward
  (weight standardization, parametrizations, user blocks); that module's graph is
  rewritten and becomes its forward.

A new kind of site is one new class in :data:`MODULE_KINDS` or :data:`FUNCTION_KINDS`; the
planner does not change. Changes are prepared here and made later, in one transaction
(:mod:`convnorm_fx.transaction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch.nn.functional as F
from torch import fx, nn

from .cond_conv import ConvNormCondConv2d, is_cond_conv2d
from .config import ConvNormConfig
from .derived import converted_class, forward_source, rewritten_forward_class
from .geometry import pair
from .graph_facts import conv_args, is_parametrization, join, weight_sources
from .modules import ConvNorm2d, ConvNormConv2d
from .report import ConvSite, SiteAction
from .tracing import CONV_FUNCTIONS, is_plain_conv2d, trace_module
from .transaction import Transaction

__all__ = [
    "FUNCTION_KINDS",
    "MODULE_KINDS",
    "CondConvKind",
    "ConvModuleKind",
    "Conversion",
    "ForwardRewrite",
    "FunctionalConvKind",
    "ModuleKind",
    "OutOfScopeKind",
    "PlannedSite",
    "describe_geometry",
    "function_kind",
    "module_kind",
    "rewritten_kind",
]

_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels")


@dataclass
class PlannedSite:
    """A site plus what the rewrite needs to act on it."""

    site: ConvSite
    module: nn.Module  # module sites: the conv; function sites: the module calling F.conv2d
    kind: Any = None  # the ModuleKind or FunctionalConvKind that handles it
    followed_by: str | None = None  # a normalization the conv output flows into
    pooled_input: str | None = None  # the conv reads a globally pooled 1x1 map (squeeze-excite)
    function_index: int = -1  # function sites: order among the owner's own conv calls
    kernel_shape: tuple[int, int, int, int] | None = None  # function sites: (C_out, C_in/g, kh, kw)
    reference: Any = None  # function sites: a tensor with the weight's device and dtype


# --------------------------------------------------------------------------------------
# Changes, made later in one transaction
# --------------------------------------------------------------------------------------


@dataclass
class Conversion:
    """A conv module that becomes a ConvNorm module in place: same object, new class, a stage."""

    module: nn.Module
    new_class: type
    stage: ConvNorm2d

    def commit(self, changes: Transaction) -> None:
        changes.touch(self.module)
        self.module.__class__ = self.new_class
        self.module.install_stage(self.stage)


@dataclass
class ForwardRewrite:
    """A module whose own forward calls F.conv2d: new children (the stages, and tensor
    constants of its code) and a subclass of its class whose forward is the rewritten graph."""

    owner: nn.Module
    new_class: type
    stages: dict[str, ConvNorm2d]
    constants: dict[str, Any] = field(default_factory=dict)

    def commit(self, changes: Transaction) -> None:
        changes.touch(self.owner)
        for name, stage in self.stages.items():
            self.owner.add_module(name, stage)
        for name, value in self.constants.items():
            setattr(self.owner, name, value)
        self.owner.__class__ = self.new_class


# --------------------------------------------------------------------------------------
# Module kinds
# --------------------------------------------------------------------------------------


def describe_geometry(module: nn.Module, site: ConvSite) -> None:
    """Copy a conv module's geometry (kernel size, stride, padding ...) into its site."""
    for key in _GEOMETRY:
        value = getattr(module, key, None)
        setattr(site, key, tuple(value) if isinstance(value, list) else value)


class ModuleKind:
    """A kind of conv module, converted in place into :attr:`convnorm_class`."""

    #: The class a module of this kind becomes; ``None``: listed, not rewritten.
    convnorm_class: type | None = None

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, module: nn.Module, site: ConvSite) -> None:
        """Fill the site's geometry (and reason, where the kind has more to say)."""
        describe_geometry(module, site)

    def prepare(self, planned: PlannedSite, config: ConvNormConfig) -> Conversion:
        """The conversion of ``planned.module`` with the site's ``config`` (``bn`` decided)."""
        module = planned.module
        stage = self.convnorm_class.stage_for(module, config)
        stage.site_name = planned.site.name
        stage.train(module.training)
        return Conversion(module, converted_class(self.convnorm_class, type(module)), stage)


class ConvModuleKind(ModuleKind):
    """``nn.Conv2d`` and subclasses that keep its forward and its weight."""

    convnorm_class = ConvNormConv2d

    def matches(self, module: nn.Module) -> bool:
        return is_plain_conv2d(module)


class CondConvKind(ModuleKind):
    """timm's ``CondConv2d``: each sample's mixed kernel is normalized on its own."""

    convnorm_class = ConvNormCondConv2d

    def matches(self, module: nn.Module) -> bool:
        return is_cond_conv2d(module)

    def describe(self, module: nn.Module, site: ConvSite) -> None:
        super().describe(module, site)
        site.padding_mode = "zeros"
        if module.dynamic_padding:
            site.padding = "same"  # timm's TF "same" padding, computed from each input
        if site.action != SiteAction.ALREADY:
            site.reason += (
                f"; per-sample CondConv ({module.num_experts} experts): each sample's mixed kernel is "
                f"normalized on its own (grouped conv, groups = batch x {module.groups}), its spectrum "
                "computed per sample in train and eval"
            )

    def prepare(self, planned: PlannedSite, config: ConvNormConfig) -> Conversion:
        if config.eval_spectrum == "running":
            planned.site.reason += "; eval_spectrum='running' does not apply (a new kernel per sample)"
        return super().prepare(planned, config)


class OutOfScopeKind(ModuleKind):
    """1-D, 3-D and transposed convs: listed as not rewritten (only 2-D convs are normalized)."""

    classes = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes)

    def describe(self, module: nn.Module, site: ConvSite) -> None:
        super().describe(module, site)
        site.reason = f"{type(module).__name__}: only 2-D convolutions are normalized"


#: Kinds of conv modules, asked in order.
MODULE_KINDS: tuple[ModuleKind, ...] = (ConvModuleKind(), CondConvKind(), OutOfScopeKind())


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The kind of a conv module not yet rewritten, if it is one."""
    return next((kind for kind in MODULE_KINDS if kind.matches(module)), None)


def rewritten_kind(module: nn.Module) -> ModuleKind | None:
    """The kind whose rewritten form ``module`` is, if it is one (a second ``apply``)."""
    return next(
        (kind for kind in MODULE_KINDS if kind.convnorm_class and isinstance(module, kind.convnorm_class)), None
    )


# --------------------------------------------------------------------------------------
# Functional convs
# --------------------------------------------------------------------------------------


class FunctionalConvKind:
    """``F.conv2d``/``torch.conv2d`` calls in a module's own forward, on a learned weight or
    one computed from learned weights; rewritten in the graph of that module (the owner)."""

    functions = CONV_FUNCTIONS

    def matches(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in self.functions

    def describe(self, planned: PlannedSite, node: fx.Node, root: nn.Module, prefix: str) -> None:
        """Decide whether the call can be rewritten and fill the site (``root`` is the traced
        module, at qualified name ``prefix``)."""
        site = planned.site
        args = conv_args(node)
        geometry = {key: args[key] for key in ("stride", "padding", "dilation", "groups")}
        site.action, site.reason = SiteAction.SKIPPED, ""
        users = list(node.users)
        stage_follows = len(users) == 1 and users[0].op == "call_module"
        if stage_follows and isinstance(root.get_submodule(users[0].target), ConvNorm2d):
            site.action, site.reason = SiteAction.ALREADY, "followed by a ConvNorm2d stage"
        elif any(isinstance(v, fx.Node) for v in geometry.values()):
            site.reason = "stride/padding/dilation/groups are computed from the input (dynamic geometry)"
        else:
            self._describe_weight(planned, args["weight"], root, prefix)
        _record_geometry(planned, geometry)

    def _describe_weight(self, planned: PlannedSite, weight: Any, root: nn.Module, prefix: str) -> None:
        site = planned.site
        sources, from_input = weight_sources(weight, root)
        parameters = [(n, t) for n, t in sources if isinstance(t, nn.Parameter)]
        kernels = [t for _, t in parameters if t.dim() == 4]
        if from_input:
            site.reason = "the weight is computed from the input (a kernel per sample), not from parameters alone"
        elif not parameters:
            site.reason = "weight is a buffer or constant, not a learned parameter"
            site.learned = False
        elif not kernels:
            site.reason = "weight is computed from parameters without a 4-D kernel (cannot read its shape)"
        else:
            kernel = max(kernels, key=lambda t: t.numel())
            planned.kernel_shape = tuple(kernel.shape)  # type: ignore[assignment]
            planned.reference = kernel
            weight_names = ", ".join(join(prefix, n) for n, _ in parameters)
            site.action = SiteAction.GRAPH_REWRITE
            site.reason = f"functional conv on a weight computed from {weight_names}"

    def prepare(
        self, owner: nn.Module, sites: list[tuple[PlannedSite, ConvNormConfig]], tracer_options: Mapping[str, Any]
    ) -> ForwardRewrite:
        """Trace ``owner``'s own code and rewrite its conv calls: full conv -> stage."""
        # Only the module's own code: its children stay calls, each rewritten on its own.
        traced = trace_module(owner, **tracer_options, own_code_only=True)
        graph = traced.graph
        _read_parametrized_attributes(graph, owner)
        own_calls = [n for n in graph.nodes if self.matches(n)]
        stages: dict[str, ConvNorm2d] = {}
        for planned, config in sites:
            if planned.function_index >= len(own_calls):
                raise ValueError(
                    f"could not find {planned.site.name} again when rewriting it; please report this model"
                )
            node = own_calls[planned.function_index]
            stage = _stage_for_call(planned, conv_args(node), config)
            stage.train(owner.training)
            index = planned.function_index
            name = _free_name(owner, stages, "convnorm" if index == 0 else f"convnorm_{index}")
            stages[name] = stage
            _replace_call(graph, node, name, stage)
        graph.lint()
        source, namespace = forward_source(graph)
        base = type(owner)
        recipe = getattr(base, "_convnorm_recipe", None)
        if recipe is not None and recipe[0] == "forward":
            base = recipe[1]  # rewritten before: derive from the user's class again
        return ForwardRewrite(owner, rewritten_forward_class(base, source, namespace), stages, traced.constants)


#: Kinds of functional conv calls, asked in order.
FUNCTION_KINDS: tuple[FunctionalConvKind, ...] = (FunctionalConvKind(),)


def function_kind(node: fx.Node) -> FunctionalConvKind | None:
    """The kind of a ``call_function`` node that is a conv, if it is one."""
    return next((kind for kind in FUNCTION_KINDS if kind.matches(node)), None)


def _record_geometry(planned: PlannedSite, geometry: Mapping[str, Any]) -> None:
    site = planned.site
    if planned.kernel_shape is not None:
        site.out_channels = planned.kernel_shape[0]
        site.kernel_size = tuple(planned.kernel_shape[2:])
        if not isinstance(geometry["groups"], fx.Node):
            site.in_channels = planned.kernel_shape[1] * int(geometry["groups"])
    for key in ("stride", "dilation"):
        value = geometry[key]
        setattr(site, key, None if isinstance(value, fx.Node) else pair(value, key))
    padding = geometry["padding"]
    if not isinstance(padding, (fx.Node, str)):
        padding = pair(padding, "padding")
    site.padding = None if isinstance(padding, fx.Node) else padding
    site.groups = None if isinstance(geometry["groups"], fx.Node) else int(geometry["groups"])
    site.padding_mode = "zeros"


def _stage_for_call(planned: PlannedSite, args: Mapping[str, Any], config: ConvNormConfig) -> ConvNorm2d:
    reference = planned.reference
    stage = ConvNorm2d(
        planned.kernel_shape[0],
        planned.kernel_shape[2:],
        args["stride"],
        args["padding"],
        args["dilation"],
        groups=int(args["groups"]),
        config=config,
        device=reference.device,
        dtype=reference.dtype,
    )
    stage.site_name = planned.site.name
    return stage


def _replace_call(graph: fx.Graph, node: fx.Node, stage_name: str, stage: ConvNorm2d) -> None:
    """``F.conv2d(x, w, b, ...)`` -> ``stage(F.conv2d(x, w, None, <feeding conv>), w, b)``."""
    args = conv_args(node)
    with graph.inserting_before(node):
        full = graph.call_function(
            F.conv2d,
            (
                args["input"], args["weight"], None, stage.feeding_stride, stage.feeding_padding, stage.dilation,
                stage.groups,
            ),
        )
        out = graph.call_module(stage_name, (full, args["weight"], args["bias"]))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _read_parametrized_attributes(graph: fx.Graph, owner: nn.Module) -> None:
    """Read parametrized tensors as attributes (``self.weight``), as the module's code does,
    not by calling their parametrization: ``torch.nn.utils.parametrize.cached()`` then
    still applies."""
    for node in list(graph.nodes):
        if node.op != "call_module" or node.args or node.kwargs:
            continue
        parent, _, tensor_name = node.target.rpartition(".")
        holder, _, registry = parent.rpartition(".")
        if registry != "parametrizations" or not is_parametrization(owner.get_submodule(node.target)):
            continue
        with graph.inserting_before(node):
            read = graph.get_attr(join(holder, tensor_name))
        node.replace_all_uses_with(read)
        graph.erase_node(node)


def _free_name(owner: nn.Module, taken: Iterable[str], name: str) -> str:
    candidate, suffix = name, 0
    while hasattr(owner, candidate) or candidate in taken:
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate
