"""The FX pass: put ConvNorm behind every 2-D convolution of a model.

The pass runs in a fixed order, and changes nothing until everything is known to work:

1. check the input (wrappers, lazy modules) and copy it unless ``inplace``;
2. **plan**: trace, and list every conv site (module, qualified names, action, reason);
3. **prepare**: choose options per site, build every ConvNorm stage, trace and rewrite the
   graphs of modules that call ``F.conv2d`` and generate their new forward;
4. **commit**: change the modules in place, as one transaction that is rolled back if
   anything fails, so a failing ``apply(inplace=True)`` leaves the model as it was.

Each rewritten site becomes: unstrided "full" conv on the *same* weight -> 
:class:`~convnorm_fx.modules.ConvNorm2d` (preconditioner, affine, crop, stride, bias,
optional BatchNorm). Every module keeps its identity (:mod:`convnorm_fx.derived`):

* an ``nn.Conv2d`` *becomes* a :class:`~convnorm_fx.modules.ConvNormConv2d` (its class is
  changed in place and the stage installed), so its Parameters, hooks, attributes and every
  name it is registered under stay as they are; a subclass of ``nn.Conv2d`` becomes a
  subclass of both;
* timm's ``CondConv2d`` (per-sample mixed expert kernels) becomes a
  :class:`~convnorm_fx.cond_conv.ConvNormCondConv2d` the same way;
* a functional conv (``F.conv2d``/``torch.conv2d`` on a learned or computed weight: timm's
  weight-standardized convs, parametrized convs, your own blocks) is rewritten in the graph
  of the module whose forward calls it, and that module gets a subclass of its own class
  whose ``forward`` is the rewritten graph, with the stages as new children.

Tracing is a means: where the whole model cannot be traced, the largest traceable
submodules are used, and plain convs in untraceable code are found by walking the modules.
Every conv is either rewritten or listed as skipped with a reason.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import difflib
import operator
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from . import report as rep
from .cond_conv import ConvNormCondConv2d, is_cond_conv2d
from .derived import converted_class, forward_source, rewritten_forward_class
from .modules import ConvNorm2d, ConvNormConv2d, check_stage_options
from .ops import DEFAULT_EPS
from .report import ConvSite, RewriteReport
from .tracing import CONV_FUNCTIONS, TracingFailed, is_plain_conv2d, register_with_timm, trace, trace_module
from .validation import check_bool, check_callables, check_choice, check_module_classes

__all__ = ["ConvNormConfig", "RewriteError", "apply"]

_BN_POLICIES = ("auto", True, False)


class RewriteError(ValueError):
    """Raised by ``apply(..., strict=True)`` when a learned conv is left out."""


@dataclass(frozen=True)
class ConvNormConfig:
    """Options of one rewritten site (see :func:`apply`)."""

    # BatchNorm after the stage: "auto" (only where the conv output does not already flow
    # into a normalization), True (always) or False (never).
    bn: str | bool = "auto"
    # Learnable per-channel depthwise affine transform r_k (§3.3).
    affine: bool = True
    # "identity" (start as pure ConvNorm) or "default" (PyTorch conv init, as the paper's code).
    affine_init: str = "identity"
    # Added to the kernel power spectrum; bounds the gain by eps ** -0.5. 0.0 = exact operator.
    eps: float = DEFAULT_EPS
    # Treat the preconditioner as a constant in backward (paper §3.3).
    stop_gradient: bool = True
    # Eval-mode spectrum: "cache" (of the current weight) or "running" (EMA of autocorrelation).
    eval_spectrum: str = "cache"
    # Momentum of the running spectrum.
    momentum: float = 0.1
    # Raise FloatingPointError naming the site at the first NaN/Inf in a weight, input or output.
    check_finite: bool = False

    def __post_init__(self) -> None:
        check_choice("bn", self.bn, _BN_POLICIES)
        check_stage_options(**self.stage_options(False))

    def stage_options(self, bn: bool) -> dict[str, Any]:
        return {
            "affine": self.affine,
            "affine_init": self.affine_init,
            "bn": bn,
            "eps": self.eps,
            "stop_gradient": self.stop_gradient,
            "eval_spectrum": self.eval_spectrum,
            "momentum": self.momentum,
            "check_finite": self.check_finite,
        }


# --------------------------------------------------------------------------------------
# Graph facts
# --------------------------------------------------------------------------------------

_NORM_CLASSES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, timm BatchNormAct2d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_NORM_NAME = re.compile(r"(Batch|Group|Layer|Instance|RMS|Frozen\w*)Norm")
_NORM_FUNCTIONS = {
    F.batch_norm,
    F.layer_norm,
    F.group_norm,
    F.instance_norm,
    torch.batch_norm,
    torch.layer_norm,
    torch.group_norm,
    torch.instance_norm,
}
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS.add(F.rms_norm)
# Nodes a conv output may pass through and still "flow into" a normalization.
_TRANSPARENT_METHODS = {
    "permute", "reshape", "view", "contiguous", "flatten", "transpose", "to", "float", "clone", "type_as", "add", "add_",
    "relu", "relu_",
}  # fmt: skip
_TRANSPARENT_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.flatten, torch.permute, torch.reshape, F.relu}
_TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Flatten,
)
_MAX_HOPS = 4
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ARG_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_OUT_OF_SCOPE_CLASSES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Rewritten module sites, reported as already rewritten by a second apply.
_REWRITTEN_CLASSES = (ConvNormConv2d, ConvNormCondConv2d)


def _is_convertible(module: nn.Module) -> bool:
    """A conv module that becomes a ConvNorm module in place (plain nn.Conv2d, timm CondConv2d)."""
    return is_plain_conv2d(module) or is_cond_conv2d(module)


def _is_norm_module(module: nn.Module) -> bool:
    if isinstance(module, _NORM_CLASSES):
        return True
    return bool(_NORM_NAME.search(type(module).__name__)) and not any(isinstance(m, nn.Conv2d) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _conv_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a conv2d call node by name, defaults filled in."""
    args = dict(_ARG_DEFAULTS)
    args.update(zip(_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _flows_into_norm(node: fx.Node, root: nn.Module) -> str | None:
    """Name of a normalization the value of ``node`` reaches through transparent ops, if any."""
    frontier, seen = [(node, 0)], set()
    while frontier:
        current, hops = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                module = root.get_submodule(user.target)
                if _is_norm_module(module):
                    return f"{type(module).__name__} '{user.target}'"
                transparent = isinstance(module, _TRANSPARENT_MODULES) or "DropPath" in type(module).__name__
            elif user.op == "call_function":
                if user.target in _NORM_FUNCTIONS:
                    return f"{getattr(user.target, '__name__', user.target)}()"
                transparent = user.target in _TRANSPARENT_FUNCTIONS
            elif user.op == "call_method":
                if user.target in ("batch_norm", "layer_norm", "group_norm"):
                    return f".{user.target}()"
                transparent = user.target in _TRANSPARENT_METHODS
            else:
                transparent = False
            if transparent and hops + 1 < _MAX_HOPS:
                frontier.append((user, hops + 1))
    return None


_GLOBAL_POOL_MODULES: tuple[type, ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _reads_pooled_map(node: fx.Node, root: nn.Module) -> str | None:
    """Whether the conv's input is a global pooling (squeeze-excite, gating branches)."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    for _ in range(2 * _MAX_HOPS):
        if not isinstance(source, fx.Node):
            return None
        if source.op == "call_module":
            module = root.get_submodule(source.target)
            size = getattr(module, "output_size", None)
            if isinstance(module, _GLOBAL_POOL_MODULES) and size in (1, (1, 1)):
                return f"{type(module).__name__} '{source.target}'"
            if "Pool" in type(module).__name__ and "Select" in type(module).__name__:
                return f"{type(module).__name__} '{source.target}'"  # timm SelectAdaptivePool2d
            keeps_size = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            if not (isinstance(module, _TRANSPARENT_MODULES) or keeps_size or "Act" in type(module).__name__):
                return None
        elif source.op == "call_method" and source.target in ("mean", "amax", "sum"):
            dims = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim")
            dims = {dims} if isinstance(dims, int) else set(dims or ())
            if {2, 3} <= dims or {-2, -1} <= dims:
                return f".{source.target}() over the spatial axes"
            return None
        elif source.op == "call_function" and source.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean):
            return f"{getattr(source.target, '__name__', source.target)}()"
        elif not (source.op == "call_function" and source.target in _TRANSPARENT_FUNCTIONS):
            if not (source.op == "call_method" and source.target in _TRANSPARENT_METHODS):
                return None
        source = source.args[0] if source.args else None
    return None


def _next_sibling_norm(parent: nn.Module, name: str) -> str | None:
    """For convs found by walking modules: is the next registered sibling a normalization?"""
    names = list(parent._modules)
    index = names.index(name)
    if index + 1 < len(names):
        sibling = parent._modules[names[index + 1]]
        if sibling is not None and _is_norm_module(sibling):
            return f"{type(sibling).__name__} '{names[index + 1]}' (next module)"
    return None




def _weight_sources(weight: fx.Node | Any, root: nn.Module) -> tuple[list[tuple[str, Any]], bool]:
    """What a conv's weight node is computed from: ``get_attr`` ancestors and the parameters
    of modules called on the way (a parametrization), by qualified name; and whether it
    depends on a forward input (a kernel made per sample)."""
    if not isinstance(weight, fx.Node):
        return [], False
    found, stack, seen, from_input = [], [weight], set(), False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr":
            found.append((node.target, _attribute(root, node.target)))
        elif node.op == "call_module":
            module = root.get_submodule(node.target)
            found.extend((_join(node.target, name), p) for name, p in module.named_parameters())
        elif node.op == "placeholder":
            from_input = True
        stack.extend(node.all_input_nodes)
    return found, from_input


def _attribute(root: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _is_parametrization(module: nn.Module) -> bool:
    return isinstance(module, parametrize.ParametrizationList)


def _stack_owner(node: fx.Node) -> tuple[str, bool]:
    """The qualified name of the module whose own code made ``node`` (from the tracer's
    module stack), and whether this is that module's first call."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", True
    key = next(reversed(stack))
    path = stack[key][0] if isinstance(stack[key], tuple) else key
    return path, re.search(r"@\d+$", key) is None


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


@dataclass
class _Planned:
    """A site plus what the rewrite needs to act on it."""

    site: ConvSite
    module: nn.Module  # module sites: the conv; function sites: the module calling F.conv2d
    followed_by: str | None = None
    function_index: int = -1  # function sites: order among the owner's own conv calls
    kernel_shape: tuple[int, int, int, int] | None = None  # function sites: (C_out, C_in/g, kh, kw)
    reference: Any = None  # function sites: a tensor with the weight's device and dtype
    pooled_input: str | None = None  # the conv reads a globally pooled 1x1 map (squeeze-excite)


class _Planner:
    """Finds every conv site of a model (trace where possible, walk modules elsewhere).

    Planning changes nothing: traces leave the modules as they were. A module registered
    under several names is one site, listed under its first name with the others as aliases.
    """

    def __init__(self, model: nn.Module, tracer_options: Mapping[str, Any]) -> None:
        self.model = model
        self.tracer_options = dict(tracer_options)
        self.planned: list[_Planned] = []
        self.report = RewriteReport(model_class=type(model).__name__)
        self._seen: set[int] = set()  # conv modules listed as sites
        self._walked: set[int] = set()  # untraceable modules walked
        self._function_counts: dict[int, int] = {}  # owner -> its F.conv2d calls listed

    # -- discovery ---------------------------------------------------------------------

    def run(self) -> list[_Planned]:
        if isinstance(self.model, _REWRITTEN_CLASSES):
            self._add_module_site(self.model, "", rep.ALREADY, type(self.model).__name__, None)
        elif _is_convertible(self.model):
            self._add_module_site(self.model, "", rep.MODULE_SWAP, "the model is itself a conv module", None)
        else:
            self._visit(self.model, "")
        self._sweep_unvisited()
        self._name_aliases()
        return self.planned

    def _visit(self, module: nn.Module, prefix: str) -> None:
        try:
            graph = trace(module, **self.tracer_options)
        except TracingFailed as e:
            graph = self._trace_around_untraceable_children(module, prefix, e)
            if graph is None:
                self.report.untraced[prefix] = str(e.__cause__ or e)
                self._walk_untraceable(module, prefix)
                return
        self.report.traced.append(prefix)
        for node in graph.nodes:
            if node.op == "call_module":
                self._plan_module_node(module, prefix, node)
            elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
                self._plan_function_node(module, prefix, node)

    def _trace_around_untraceable_children(self, module: nn.Module, prefix: str, error: Exception) -> fx.Graph | None:
        """Keep the largest traceable region: trace ``module`` again with the children that
        cannot be traced on their own as leaves (their convs are then found by walking them)."""
        children = list(module.named_children())
        stuck = []
        for name, child in children:
            if not _has_conv_work(child) or is_cond_conv2d(child) or isinstance(child, ConvNormCondConv2d):
                continue  # (CondConvs are leaves anyway)
            try:
                trace(child, **self.tracer_options)
            except TracingFailed as e:
                stuck.append(name)
                self.report.untraced[_join(prefix, name)] = str(e.__cause__ or e)
        if not stuck or len(stuck) == len(children):
            return None
        try:
            return trace(module, **self.tracer_options, leaf_names=stuck)
        except TracingFailed:
            for name in stuck:
                self.report.untraced.pop(_join(prefix, name), None)
            return None

    def _walk_untraceable(self, module: nn.Module, prefix: str) -> None:
        if id(module) in self._walked:
            return
        self._walked.add(id(module))
        kernels = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 4]
        if kernels and not isinstance(module, nn.Conv2d) and not _is_parametrization(module):
            site = ConvSite(
                name=f"{prefix}#conv2d",
                kind="function",
                conv_class=type(module).__name__,
                action=rep.SKIPPED,
                reason=f"'{prefix}' could not be traced and holds 4-D parameter(s) {kernels}: "
                "a functional conv in its forward cannot be rewritten (make it traceable or wrap the conv in nn.Conv2d)",
            )
            self.planned.append(_Planned(site=site, module=module))
            self.report.sites.append(site)
        for name, child in module.named_children():
            fqn = _join(prefix, name)
            if id(child) in self._seen:
                continue
            if _is_convertible(child):
                reason = f"'{prefix or type(module).__name__}' could not be traced; converted in place"
                self._add_module_site(child, fqn, rep.MODULE_SWAP, reason, _next_sibling_norm(module, name))
            elif isinstance(child, _REWRITTEN_CLASSES):
                self._add_module_site(child, fqn, rep.ALREADY, type(child).__name__, None)
            elif _has_conv_work(child) and not _is_parametrization(child):
                self._visit(child, fqn)

    def _plan_module_node(self, root: nn.Module, prefix: str, node: fx.Node) -> None:
        module = root.get_submodule(node.target)
        fqn = _join(prefix, node.target)
        if id(module) in self._seen:
            return  # a module called twice (or under two names) is one site
        if _is_convertible(module):
            followed = _flows_into_norm(node, root)
            self._add_module_site(module, fqn, rep.GRAPH_REWRITE, f"{type(module).__name__} in the traced graph", followed)
            self.planned[-1].pooled_input = _reads_pooled_map(node, root)
        elif isinstance(module, _REWRITTEN_CLASSES):
            self._add_module_site(module, fqn, rep.ALREADY, type(module).__name__, None)
        elif isinstance(module, _OUT_OF_SCOPE_CLASSES):
            reason = f"{type(module).__name__}: only 2-D convolutions are normalized"
            self._add_module_site(module, fqn, rep.OUT_OF_SCOPE, reason, None)
        elif _has_conv_work(module) and not isinstance(module, ConvNorm2d) and not _is_parametrization(module):
            # A leaf that hides convs (untraceable child, user leaf_modules): walk it.
            self._walk_untraceable(module, fqn)

    def _plan_function_node(self, root: nn.Module, prefix: str, node: fx.Node) -> None:
        owner_rel, first_call = _stack_owner(node)
        if not first_call:
            return  # the same F.conv2d of a module called again: one site
        owner_fqn = _join(prefix, owner_rel)
        owner = root.get_submodule(owner_rel) if owner_rel else root
        args = _conv_args(node)
        index = self._function_counts.get(id(owner), 0)
        self._function_counts[id(owner)] = index + 1
        name = f"{owner_fqn}#conv2d" + (f"_{index}" if index else "")
        geometry = {
            "stride": args["stride"],
            "padding": args["padding"],
            "dilation": args["dilation"],
            "groups": args["groups"],
        }
        site = ConvSite(name=name, kind="function", conv_class=type(owner).__name__, action=rep.SKIPPED, reason="")
        planned = _Planned(site=site, module=owner, function_index=index)
        if isinstance(owner, nn.Conv2d):
            self._seen.add(id(owner))
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(root.get_submodule(users[0].target), ConvNorm2d):
            site.action, site.reason = rep.ALREADY, "followed by a ConvNorm2d stage"
            self._record(planned, geometry)
            return
        if any(isinstance(v, fx.Node) for v in geometry.values()):
            site.reason = "stride/padding/dilation/groups are computed from the input (dynamic geometry)"
            self._record(planned, geometry)
            return
        sources, from_input = _weight_sources(args["weight"], root)
        parameters = [(n, t) for n, t in sources if isinstance(t, nn.Parameter)]
        if from_input:
            site.reason = "the weight is computed from the input (a kernel per sample), not from parameters alone"
            self._record(planned, geometry)
            return
        if not parameters:
            site.reason = "weight is a buffer or constant, not a learned parameter"
            site.learned = False
            self._record(planned, geometry)
            return
        kernels = [t for _, t in parameters if t.dim() == 4]
        if not kernels:
            site.reason = "weight is computed from parameters without a 4-D kernel (cannot read its shape)"
            self._record(planned, geometry)
            return
        kernel = max(kernels, key=lambda t: t.numel())
        planned.kernel_shape = tuple(kernel.shape)  # type: ignore[assignment]
        planned.reference = kernel
        planned.followed_by = _flows_into_norm(node, root)
        planned.pooled_input = _reads_pooled_map(node, root)
        weight_name = ", ".join(_join(prefix, n) for n, _ in parameters)
        site.action = rep.GRAPH_REWRITE
        site.reason = f"functional conv on a weight computed from {weight_name}"
        self._record(planned, geometry)

    def _record(self, planned: _Planned, geometry: Mapping[str, Any]) -> None:
        site = planned.site
        if planned.kernel_shape is not None:
            site.out_channels = planned.kernel_shape[0]
            site.kernel_size = tuple(planned.kernel_shape[2:])
            if not isinstance(geometry["groups"], fx.Node):
                site.in_channels = planned.kernel_shape[1] * int(geometry["groups"])
        for key in ("stride", "dilation"):
            value = geometry[key]
            setattr(site, key, None if isinstance(value, fx.Node) else _pair(value))
        padding = geometry["padding"]
        site.padding = None if isinstance(padding, fx.Node) else padding if isinstance(padding, str) else _pair(padding)
        site.groups = None if isinstance(geometry["groups"], fx.Node) else int(geometry["groups"])
        site.padding_mode = "zeros"
        self.planned.append(planned)
        self.report.sites.append(site)

    def _add_module_site(self, module: nn.Module, fqn: str, action: str, reason: str, followed: str | None) -> None:
        self._seen.add(id(module))
        cond_conv = is_cond_conv2d(module) or isinstance(module, ConvNormCondConv2d)
        if cond_conv and action != rep.ALREADY:
            reason += (
                f"; per-sample CondConv ({module.num_experts} experts): each sample's mixed kernel is "
                f"normalized on its own (grouped conv, groups = batch x {module.groups}), its spectrum "
                "computed per sample in train and eval"
            )
        site = ConvSite(name=fqn, kind="module", conv_class=type(module).__name__, action=action, reason=reason)
        for key in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels"):
            value = getattr(module, key, None)
            setattr(site, key, tuple(value) if isinstance(value, list) else value)
        if cond_conv:
            site.padding_mode = "zeros"
            if module.dynamic_padding:
                site.padding = "same"  # timm's TF "same" padding, computed from each input
        self.planned.append(_Planned(site=site, module=module, followed_by=followed))
        self.report.sites.append(site)

    def _sweep_unvisited(self) -> None:
        """Convs that no graph reached (not called by forward, or inside leaves): list them all."""
        for fqn, module in self.model.named_modules():
            if id(module) in self._seen:
                continue
            if _is_convertible(module):
                parent_name, _, name = fqn.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                reason = "not called by the traced forward(); converted in place"
                self._add_module_site(module, fqn, rep.MODULE_SWAP, reason, _next_sibling_norm(parent, name))
            elif isinstance(module, _REWRITTEN_CLASSES):
                self._add_module_site(module, fqn, rep.ALREADY, type(module).__name__, None)
            elif isinstance(module, nn.Conv2d) and id(module) not in self._function_counts:
                # A conv that changes nn.Conv2d's forward (or is parametrized) and that no
                # traced graph reached: trace it on its own.
                if id(module) not in self._walked:
                    self._visit(module, fqn)
                if id(module) not in self._seen:
                    how = "could not be traced" if id(module) in self._walked else "was not reached by a traced graph"
                    reason = f"{type(module).__name__} changes nn.Conv2d's forward and {how}"
                    self._add_module_site(module, fqn, rep.SKIPPED, reason, None)
            elif isinstance(module, _OUT_OF_SCOPE_CLASSES):
                reason = f"{type(module).__name__}: only 2-D convolutions are normalized"
                self._add_module_site(module, fqn, rep.OUT_OF_SCOPE, reason, None)

    def _name_aliases(self) -> None:
        """Every other name under which a site's module is registered."""
        names: dict[int, list[str]] = collections.defaultdict(list)
        for fqn, module in self.model.named_modules(remove_duplicate=False):
            names[id(module)].append(fqn)
        for planned in self.planned:
            site = planned.site
            owner_name, hash_sign, suffix = site.name.partition("#")
            site.aliases = tuple(
                name + hash_sign + suffix for name in dict.fromkeys(names[id(planned.module)]) if name != owner_name
            )


def _has_conv_work(module: nn.Module) -> bool:
    """Whether a module holds convs, stages, or 4-D parameters a forward might convolve with."""
    return any(
        isinstance(m, (nn.Conv2d, ConvNorm2d))
        or is_cond_conv2d(m)
        or any(p.dim() == 4 for p in m.parameters(recurse=False))
        for m in module.modules()
    )


# --------------------------------------------------------------------------------------
# Checks on the input
# --------------------------------------------------------------------------------------


def _wrapper_kind(module: nn.Module) -> str | None:
    """The name of the wrapper ``module`` is, if it is one that distributes or compiles a model."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(module, nn.DataParallel):
        return "DataParallel"
    # Only look where the wrapper's module is loaded: a model cannot hold an instance otherwise.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        cls = getattr(fsdp, name, None)
        if cls is not None and isinstance(module, cls):
            return "FSDP"
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", None)
    if compiled is not None and isinstance(module, compiled):
        return "torch.compile"
    return None


_WRAPPER_ADVICE = {
    "DistributedDataParallel": (
        "DDP registers the parameters it synchronizes when it is built, so the ConvNorm parameters that apply "
        "adds would silently differ across ranks. Rewrite first, then wrap: "
        "DistributedDataParallel(convnorm_fx.apply(model), ...)"
    ),
    "FSDP": (
        "FSDP shards the parameters it holds when it is built, and the ConvNorm parameters that apply adds would "
        "not be sharded or synchronized. Rewrite first, then shard: fully_shard(convnorm_fx.apply(model)) or "
        "FullyShardedDataParallel(convnorm_fx.apply(model), ...)"
    ),
    "torch.compile": (
        "the compiled wrapper would keep running the code it compiled. Rewrite first, then compile: "
        "torch.compile(convnorm_fx.apply(model)) (the wrapper holds the original module as ._orig_mod)"
    ),
    "DataParallel": (
        "apply rewrites a top-level nn.DataParallel through its .module, but not one nested inside a model. "
        "Rewrite the model before wrapping parts of it"
    ),
}


def _check_supported(model: nn.Module) -> None:
    """Refuse, before anything changes, what apply cannot rewrite correctly."""
    for name, module in model.named_modules():
        kind = _wrapper_kind(module)
        if kind is not None:
            where = f" at '{name}'" if name else ""
            raise TypeError(f"convnorm_fx.apply got a model wrapped in {kind}{where}: {_WRAPPER_ADVICE[kind]}. Nothing was changed.")
        if isinstance(module, nn.Conv2d) and isinstance(module, nn.modules.lazy.LazyModuleMixin):
            if module.has_uninitialized_params():
                raise ValueError(
                    f"{type(module).__name__} '{name or type(model).__name__}' has no weight yet: run one forward pass "
                    "(e.g. model(example_input)) to materialize it, then call convnorm_fx.apply. Nothing was changed."
                )


def _deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding a computed tensor as a plain
    attribute (``torch.nn.utils.weight_norm`` and ``spectral_norm`` keep ``weight`` so; such
    tensors are not graph leaves, which deepcopy refuses). The copy gets their detached value,
    which the module's hook recomputes at the next forward anyway."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


_UNMATCHED_OVERRIDES = ("error", "warn", "ignore")


@dataclass
class _Override:
    """One ``overrides`` entry: its key, the key as a regex, and the options (None: skip)."""

    key: str
    pattern: re.Pattern[str]
    config: ConvNormConfig | None
    matched: bool = False


def _compile_overrides(overrides: Any, base: ConvNormConfig) -> list[_Override]:
    """Validate ``overrides`` and turn each entry into an :class:`_Override`."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict {{site name or regex: None, {{option: value}} or ConvNormConfig}}, got {overrides!r}")
    compiled = []
    fields = [f.name for f in dataclasses.fields(ConvNormConfig)]
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise TypeError(f"overrides keys must be site names or regexes (str), got {key!r}")
        try:
            pattern = re.compile(key)
        except re.error as e:
            raise ValueError(
                f"overrides key {key!r} is not a valid regular expression ({e}); for a name with special "
                "characters, use re.escape(name)"
            ) from e
        if value is None or isinstance(value, ConvNormConfig):
            config = value
        elif isinstance(value, Mapping):
            unknown = [k for k in value if k not in fields]
            if unknown:
                close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"overrides[{key!r}] has unknown option {unknown[0]!r}{hint}; options: {', '.join(fields)}")
            try:
                config = dataclasses.replace(base, **dict(value))
            except (TypeError, ValueError) as e:
                raise type(e)(f"overrides[{key!r}]: {e}") from e
        else:
            raise TypeError(
                f"overrides[{key!r}] must be None (leave the site as it is), a dict of options or a ConvNormConfig, "
                f"got {value!r}"
            )
        compiled.append(_Override(key, pattern, config))
    return compiled


def _site_names(site: ConvSite) -> list[str]:
    """The names an override can use for a site: its names and aliases, and for a function
    site the names of the module that calls it."""
    names = [site.name, *site.aliases]
    return names + [n.partition("#")[0] for n in names if "#" in n]


def _matching_override(site: ConvSite, overrides: list[_Override]) -> _Override | None:
    """The override for ``site``: an exact name first, then the first full-match regex."""
    names = _site_names(site)
    for override in overrides:
        if override.key in names:
            return override
    for override in overrides:
        if any(override.pattern.fullmatch(name) for name in names):
            return override
    return None


def _check_unmatched(overrides: list[_Override], sites: list[ConvSite], policy: str) -> None:
    unmatched = [o.key for o in overrides if not o.matched]
    if not unmatched or policy == "ignore":
        return
    names = sorted({name for site in sites for name in _site_names(site)})
    close = difflib.get_close_matches(unmatched[0], names, n=5, cutoff=0.4)
    message = (
        f"overrides key {unmatched[0]!r} matches no conv site"
        + (f" (nor do {unmatched[1:]!r})" if len(unmatched) > 1 else "")
        + (f"; closest site names: {', '.join(close)}" if close else "")
        + ". Site names are those of rewrite_report(model); pass unmatched_overrides='ignore' to allow keys that match nothing"
    )
    if policy == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def _select(
    planned: _Planned,
    base: ConvNormConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    overrides: list[_Override],
) -> ConvNormConfig | None:
    site = planned.site
    names = _site_names(site)
    for candidate in overrides:  # a key matches a site even where another key takes precedence
        candidate.matched = candidate.matched or candidate.key in names or any(candidate.pattern.fullmatch(n) for n in names)
    override = _matching_override(site, overrides)
    if filter_fn is not None and not filter_fn(planned.module, site.name):
        site.action, site.reason = rep.SKIPPED, "excluded by filter_fn"
        return None
    if override is None:
        return base
    if override.config is None:
        site.action, site.reason = rep.SKIPPED, f"excluded by overrides[{override.key!r}]"
    return override.config


def _decide_bn(config: ConvNormConfig, planned: _Planned) -> bool:
    if config.bn == "auto":
        if planned.followed_by:
            planned.site.reason += f"; no BN added (flows into {planned.followed_by})"
            return False
        if planned.pooled_input:
            # BatchNorm over a 1x1 map sees one value per sample: with small batches its
            # statistics are degenerate and gradients explode through gating branches.
            planned.site.reason += f"; no BN added (reads a globally pooled map: {planned.pooled_input})"
            return False
        planned.site.reason += "; BN added (no normalization follows)"
        return True
    return bool(config.bn)


# --------------------------------------------------------------------------------------
# Preparing: everything that can fail, before any module changes
# --------------------------------------------------------------------------------------


@dataclass
class _Conversion:
    """A conv module that becomes a ConvNorm module in place."""

    module: nn.Module
    new_class: type
    stage: ConvNorm2d

    def commit(self, transaction: _Transaction) -> None:
        transaction.touch(self.module)
        self.module.__class__ = self.new_class
        self.module.install_stage(self.stage)


@dataclass
class _ForwardRewrite:
    """A module whose own forward calls F.conv2d: new children (the stages, and tensor
    constants of its code) and a subclass of its class whose forward is the rewritten graph."""

    owner: nn.Module
    new_class: type
    stages: dict[str, ConvNorm2d]
    constants: dict[str, Any] = field(default_factory=dict)

    def commit(self, transaction: _Transaction) -> None:
        transaction.touch(self.owner)
        for name, stage in self.stages.items():
            self.owner.add_module(name, stage)
        for name, value in self.constants.items():
            setattr(self.owner, name, value)
        self.owner.__class__ = self.new_class


def _prepare(
    planned_sites: list[_Planned],
    base: ConvNormConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    overrides: list[_Override],
    tracer_options: Mapping[str, Any],
) -> list[_Conversion | _ForwardRewrite]:
    """Choose each site's options and build every change; the model is not touched."""
    edits: list[_Conversion | _ForwardRewrite] = []
    owners: dict[int, list[tuple[_Planned, dict[str, Any]]]] = {}
    for planned in planned_sites:
        if planned.site.action not in (rep.GRAPH_REWRITE, rep.MODULE_SWAP):
            continue
        config = _select(planned, base, filter_fn, overrides)
        if config is None:
            continue
        use_bn = _decide_bn(config, planned)
        planned.site.bn = use_bn
        options = config.stage_options(use_bn)
        if planned.site.kind == "function":
            owners.setdefault(id(planned.module), []).append((planned, options))
            continue
        module = planned.module
        convnorm_class = ConvNormCondConv2d if is_cond_conv2d(module) else ConvNormConv2d
        if convnorm_class is ConvNormCondConv2d and config.eval_spectrum == "running":
            planned.site.reason += "; eval_spectrum='running' does not apply (a new kernel per sample)"
        stage = convnorm_class.stage_for(module, **options)
        stage.site_name = planned.site.name
        stage.train(module.training)
        edits.append(_Conversion(module, converted_class(convnorm_class, type(module)), stage))
    for sites in owners.values():
        edits.append(_prepare_forward_rewrite(sites[0][0].module, sites, tracer_options))
    return edits


def _read_parametrized_attributes(graph: fx.Graph, owner: nn.Module) -> None:
    """Read parametrized tensors as attributes (``self.weight``), as the module's code does,
    not by calling their parametrization: ``torch.nn.utils.parametrize.cached()`` then
    still applies."""
    for node in list(graph.nodes):
        if node.op != "call_module" or node.args or node.kwargs:
            continue
        parent, _, tensor_name = node.target.rpartition(".")
        holder, _, registry = parent.rpartition(".")
        if registry != "parametrizations" or not _is_parametrization(owner.get_submodule(node.target)):
            continue
        with graph.inserting_before(node):
            read = graph.get_attr(_join(holder, tensor_name))
        node.replace_all_uses_with(read)
        graph.erase_node(node)


def _free_name(owner: nn.Module, taken: Iterable[str], name: str) -> str:
    candidate, suffix = name, 0
    while hasattr(owner, candidate) or candidate in taken:
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate


def _prepare_forward_rewrite(
    owner: nn.Module, sites: list[tuple[_Planned, dict[str, Any]]], tracer_options: Mapping[str, Any]
) -> _ForwardRewrite:
    """Trace the module whose forward calls F.conv2d and rewrite those calls in its graph."""
    # Only the module's own code: its children stay calls, each rewritten on its own.
    traced = trace_module(owner, **tracer_options, own_code_only=True)
    graph = traced.graph
    _read_parametrized_attributes(graph, owner)
    own_calls = [n for n in graph.nodes if n.op == "call_function" and n.target in CONV_FUNCTIONS]
    stages: dict[str, ConvNorm2d] = {}
    for planned, options in sites:
        if planned.function_index >= len(own_calls):
            raise RewriteError(f"could not find {planned.site.name} again when rewriting it; please report this model")
        node = own_calls[planned.function_index]
        args = _conv_args(node)
        reference = planned.reference
        stage = ConvNorm2d(
            planned.kernel_shape[0],
            planned.kernel_shape[2:],
            args["stride"],
            args["padding"],
            args["dilation"],
            groups=int(args["groups"]),
            device=reference.device,
            dtype=reference.dtype,
            **options,
        )
        stage.site_name = planned.site.name
        stage.train(owner.training)
        stage_name = _free_name(owner, stages, "convnorm" if planned.function_index == 0 else f"convnorm_{planned.function_index}")
        stages[stage_name] = stage
        with graph.inserting_before(node):
            full = graph.call_function(
                F.conv2d,
                (args["input"], args["weight"], None, stage.feeding_stride, stage.feeding_padding, stage.dilation, stage.groups),
            )
            out = graph.call_module(stage_name, (full, args["weight"], args["bias"]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    source, namespace = forward_source(graph)
    base = type(owner)
    recipe = getattr(base, "_convnorm_recipe", None)
    if recipe is not None and recipe[0] == "forward":
        base = recipe[1]  # rewritten before: derive from the user's class again
    return _ForwardRewrite(owner, rewritten_forward_class(base, source, namespace), stages, traced.constants)


# --------------------------------------------------------------------------------------
# Committing: one transaction
# --------------------------------------------------------------------------------------


class _Transaction:
    """Module changes that can be undone: before its first change, each module's class and
    shallow state (attributes, children, parameters, buffers) are recorded."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, type, dict[str, Any], dict[str, dict[str, Any]]]] = []
        self._touched: set[int] = set()

    def touch(self, module: nn.Module) -> None:
        if id(module) in self._touched:
            return
        self._touched.add(id(module))
        registries = {key: dict(getattr(module, key)) for key in ("_modules", "_parameters", "_buffers")}
        self._saved.append((module, type(module), dict(vars(module)), registries))

    def rollback(self) -> None:
        for module, cls, attributes, registries in reversed(self._saved):
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for key, saved in registries.items():
                registry = getattr(module, key)
                registry.clear()
                registry.update(saved)


@contextlib.contextmanager
def _transaction() -> Iterator[_Transaction]:
    transaction = _Transaction()
    try:
        yield transaction
    except BaseException:
        transaction.rollback()
        raise


# --------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------


def apply(
    model: nn.Module,
    *,
    bn: str | bool = "auto",
    affine: bool = True,
    affine_init: str = "identity",
    eps: float = DEFAULT_EPS,
    stop_gradient: bool = True,
    eval_spectrum: str = "cache",
    momentum: float = 0.1,
    check_finite: bool = False,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: Mapping[str, Mapping[str, Any] | ConvNormConfig | None] | None = None,
    unmatched_overrides: str = "error",
    inplace: bool = False,
    strict: bool = False,
    graph_module: bool = False,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Rewrite every 2-D convolution of ``model`` into conv -> ConvNorm -> crop/stride -> (BN).

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own), or an ``nn.DataParallel``
            around one (the module inside is rewritten). Models wrapped in
            ``DistributedDataParallel``, FSDP or ``torch.compile`` are refused: rewrite first,
            then wrap. Lazy convs must have run one forward pass.
        bn: BatchNorm after each stage: ``'auto'`` (only where the conv output does not
            already flow into a normalization), ``True`` (always) or ``False`` (never).
        affine, affine_init, eps, stop_gradient, eval_spectrum, momentum: options of every
            :class:`~convnorm_fx.modules.ConvNorm2d` stage.
        check_finite: make every stage raise ``FloatingPointError`` naming its site at the
            first NaN or Inf in its weight, input or output (for debugging divergence; one
            reduction per tensor, skipped under ``torch.compile``). Toggle it later with
            ``stage.check_finite`` on the :class:`~convnorm_fx.modules.ConvNorm2d` modules.
        filter_fn: ``filter_fn(module, name) -> bool``; ``False`` leaves that site as it is
            (reported as skipped). ``module`` is the conv, or the module calling ``F.conv2d``.
        overrides: per-site options, ``{key: None | {option: value} | ConvNormConfig}``:
            ``{"conv1": None}`` leaves the stem as it is, ``{r"layer4\\..*": {"bn": False}}``
            changes options (a dict is applied on top of the keyword options, a
            ``ConvNormConfig`` replaces them). A key is a site's name (the ``name`` column of
            :func:`rewrite_report`, one of its aliases, or the name of the module that calls
            ``F.conv2d``) or a regex that must match a whole name. Precedence: a key equal to
            one of the site's names wins; otherwise the first regex (in the dict's order)
            that matches. Options are checked before anything changes.
        unmatched_overrides: what a key that matches no conv site does: ``'error'``
            (default: a ``ValueError`` listing the closest site names, since such a key is
            most often a typo), ``'warn'`` or ``'ignore'``.
        inplace: modify ``model`` itself instead of a deep copy. Either way nothing changes
            if ``apply`` raises.
        strict: raise :class:`RewriteError` if any learned conv is not rewritten.
        graph_module: return one flat ``torch.fx.GraphModule`` of the rewritten model
            instead of the model object.
        leaf_modules, autowrap_functions, concrete_args: help the tracer with code it
            cannot trace (see :func:`convnorm_fx.tracing.trace`).

    Returns:
        The rewritten model: by default the same class and attributes (a deep copy unless
        ``inplace``). Every rewritten module is the same object as before, with a subclass
        of its class, so hooks, parametrizations, attributes and module sharing survive. Its
        report is available from :func:`rewrite_report`.

    Example:
        >>> import torchvision
        >>> model = convnorm_fx.apply(torchvision.models.resnet18())
        >>> print(convnorm_fx.rewrite_report(model).summary())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects an nn.Module, got {type(model).__name__}")
    register_with_timm()  # (timm may have been imported after convnorm_fx)
    base = ConvNormConfig(
        bn=bn,
        affine=affine,
        affine_init=affine_init,
        eps=eps,
        stop_gradient=stop_gradient,
        eval_spectrum=eval_spectrum,
        momentum=momentum,
        check_finite=check_finite,
    )
    for name, flag in (("inplace", inplace), ("strict", strict), ("graph_module", graph_module)):
        check_bool(name, flag)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}")
    compiled_overrides = _compile_overrides(overrides, base)
    check_choice("unmatched_overrides", unmatched_overrides, _UNMATCHED_OVERRIDES)
    if concrete_args is not None and not isinstance(concrete_args, Mapping):
        raise TypeError(f"concrete_args must be a dict {{forward argument name: value}}, got {concrete_args!r}")
    tracer_options = {
        "leaf_modules": check_module_classes("leaf_modules", leaf_modules),
        "autowrap_functions": check_callables("autowrap_functions", autowrap_functions),
    }
    wrapped = isinstance(model, nn.DataParallel)
    _check_supported(model.module if wrapped else model)
    if not inplace:
        model = _deep_copy(model)
    target = model.module if wrapped else model
    planner = _Planner(target, {**tracer_options, "concrete_args": concrete_args})
    planned_sites = planner.run()
    report = planner.report
    edits = _prepare(planned_sites, base, filter_fn, compiled_overrides, tracer_options)
    _check_unmatched(compiled_overrides, report.sites, unmatched_overrides)

    if not report.sites:
        warnings.warn(f"{type(target).__name__} has no 2-D convolution: nothing to rewrite", stacklevel=2)
    left_out = [s for s in report.sites if s.action == rep.SKIPPED and s.learned and not s.reason.startswith("excluded")]
    if strict and left_out:
        lines = "\n".join(f"  {s.name}: {s.reason}" for s in left_out)
        raise RewriteError(f"{len(left_out)} conv site(s) were not rewritten (strict=True):\n{lines}")

    with _transaction() as transaction:
        for edit in edits:
            edit.commit(transaction)
        for holder in {id(m): m for m in (model, target)}.values():
            transaction.touch(holder)
            setattr(holder, rep.REPORT_ATTRIBUTE, report)
    if graph_module:
        graph = trace(target, **tracer_options, trace_convnorm_convs=True)
        flat = fx.GraphModule(target, graph, class_name=f"{type(target).__name__}ConvNorm")
        setattr(flat, rep.REPORT_ATTRIBUTE, report)
        return flat
    return model
