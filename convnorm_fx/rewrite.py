"""The FX pass: put ConvNorm behind every 2-D convolution of a model.

The pass runs in a fixed order, and changes nothing until everything is known to work:

1. check the input (options, wrappers, lazy modules) and copy it unless ``inplace``;
2. **plan** (:mod:`convnorm_fx.planner`): trace, and list every conv site with its kind
   (:mod:`convnorm_fx.sites`), names, action and reason;
3. **select and prepare**: choose each site's options (``filter_fn``, ``overrides``, the BN
   policy) and let its kind build every change: the stages, and the rewritten forward of each
   module whose own code calls ``F.conv2d``;
4. **commit**: make the changes in place, as one transaction that is rolled back if anything
   fails (:mod:`convnorm_fx.transaction`), so a failing ``apply(inplace=True)`` leaves the
   model as it was.

Each rewritten site becomes: unstrided "full" conv on the *same* weight ->
:class:`~convnorm_fx.modules.ConvNorm2d` (preconditioner, affine, crop, stride, bias,
optional BatchNorm). Every module keeps its identity (:mod:`convnorm_fx.derived`): a conv
becomes a ConvNorm module of a subclass of its own class, and a module whose forward calls
``F.conv2d`` gets a subclass whose forward is the rewritten graph, so hooks,
parametrizations, attributes and module sharing survive.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn

from .config import ConvNormConfig
from .overrides import UNMATCHED_OVERRIDES, Override, check_unmatched, compile_overrides, matching_override, site_names
from .planner import Planner
from .report import REPORT_ATTRIBUTE, SiteAction
from .sites import Conversion, ForwardRewrite, PlannedSite
from .tracing import register_with_timm, trace
from .transaction import transaction
from .validation import check_bool, check_callables, check_choice, check_module_classes

__all__ = ["TRACER_OPTIONS", "RewriteError", "apply"]

FilterFn = Callable[[nn.Module, str], bool]
Overrides = Mapping[str, "Mapping[str, Any] | ConvNormConfig | None"]

#: Keys of ``tracer_options``: help for the tracer with code it cannot trace.
TRACER_OPTIONS = ("leaf_modules", "autowrap_functions", "concrete_args")


class RewriteError(ValueError):
    """Raised by ``apply(..., strict=True)`` when a learned conv is left out."""


# --------------------------------------------------------------------------------------
# Checks on the input
# --------------------------------------------------------------------------------------


def wrapper_kind(module: nn.Module) -> str | None:
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
        kind = wrapper_kind(module)
        if kind is not None:
            where = f" at '{name}'" if name else ""
            raise TypeError(
                f"convnorm_fx.apply got a model wrapped in {kind}{where}: {_WRAPPER_ADVICE[kind]}. Nothing was changed."
            )
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


def _check_tracer_options(tracer_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``tracer_options`` with every key present."""
    if tracer_options is None:
        tracer_options = {}
    if not isinstance(tracer_options, Mapping):
        raise TypeError(f"tracer_options must be a dict with keys among {TRACER_OPTIONS}, got {tracer_options!r}")
    unknown = [k for k in tracer_options if k not in TRACER_OPTIONS]
    if unknown:
        raise TypeError(f"tracer_options has unknown key {unknown[0]!r}; keys: {', '.join(TRACER_OPTIONS)}")
    concrete_args = tracer_options.get("concrete_args")
    if concrete_args is not None and not isinstance(concrete_args, Mapping):
        raise TypeError(f"concrete_args must be a dict {{forward argument name: value}}, got {concrete_args!r}")
    return {
        "leaf_modules": check_module_classes("leaf_modules", tracer_options.get("leaf_modules", ())),
        "autowrap_functions": check_callables("autowrap_functions", tracer_options.get("autowrap_functions", ())),
        "concrete_args": concrete_args,
    }


def _base_config(config: ConvNormConfig | None, options: Mapping[str, Any]) -> ConvNormConfig:
    misplaced = [name for name in options if name in TRACER_OPTIONS]
    if misplaced:
        raise TypeError(f"{misplaced[0]} is a tracer option: pass tracer_options={{{misplaced[0]!r}: ...}}")
    return ConvNormConfig.build(config, **options)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def _select(
    planned: PlannedSite, base: ConvNormConfig, filter_fn: FilterFn | None, overrides: list[Override]
) -> ConvNormConfig | None:
    """The site's options, or ``None`` where ``filter_fn`` or an override leaves it as it is."""
    site = planned.site
    names = site_names(site)
    for candidate in overrides:  # a key matches a site even where another key takes precedence
        matches = candidate.key in names or any(candidate.pattern.fullmatch(n) for n in names)
        candidate.matched = candidate.matched or matches
    override = matching_override(site, overrides)
    if filter_fn is not None and not filter_fn(planned.module, site.name):
        site.action, site.reason = SiteAction.SKIPPED, "excluded by filter_fn"
        return None
    if override is None:
        return base
    if override.config is None:
        site.action, site.reason = SiteAction.SKIPPED, f"excluded by overrides[{override.key!r}]"
    return override.config


def _decide_bn(config: ConvNormConfig, planned: PlannedSite) -> bool:
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


def _prepare(
    planned_sites: list[PlannedSite],
    base: ConvNormConfig,
    filter_fn: FilterFn | None,
    overrides: list[Override],
    tracer_options: Mapping[str, Any],
) -> list[Conversion | ForwardRewrite]:
    """Choose each site's options and let its kind build the change; the model is not touched."""
    changes: list[Conversion | ForwardRewrite] = []
    owners: dict[int, list[tuple[PlannedSite, ConvNormConfig]]] = {}
    for planned in planned_sites:
        if planned.site.action not in (SiteAction.GRAPH_REWRITE, SiteAction.MODULE_SWAP):
            continue
        config = _select(planned, base, filter_fn, overrides)
        if config is None:
            continue
        planned.site.bn = _decide_bn(config, planned)
        config = dataclasses.replace(config, bn=planned.site.bn)
        if planned.site.kind == "function":
            owners.setdefault(id(planned.module), []).append((planned, config))
        else:
            changes.append(planned.kind.prepare(planned, config))
    for sites in owners.values():
        first = sites[0][0]
        changes.append(first.kind.prepare(first.module, sites, tracer_options))
    return changes


# --------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------

# fmt: off
def apply(model: nn.Module, config: ConvNormConfig | None = None, *, overrides: Overrides | None = None,
          unmatched_overrides: str = "error", filter_fn: FilterFn | None = None, inplace: bool = False, strict: bool = False,
          graph_module: bool = False, tracer_options: Mapping[str, Any] | None = None, **options: Any) -> nn.Module:
    # fmt: on
    """Rewrite every 2-D convolution of ``model`` into conv -> ConvNorm -> crop/stride -> (BN).

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own), or an ``nn.DataParallel``
            around one (the module inside is rewritten). Models wrapped in
            ``DistributedDataParallel``, FSDP or ``torch.compile`` are refused: rewrite first,
            then wrap. Lazy convs must have run one forward pass.
        config: the options of every site (:class:`~convnorm_fx.config.ConvNormConfig`:
            ``bn``, ``affine``, ``affine_init``, ``eps``, ``stop_gradient``, ``eval_spectrum``,
            ``momentum``, ``check_finite``, ``algorithm``); default: its defaults.
        overrides: per-site options, ``{key: None | {option: value} | ConvNormConfig}``:
            ``{"conv1": None}`` leaves the stem as it is, ``{r"layer4\\..*": {"bn": False}}``
            changes options on top of ``config`` (a ``ConvNormConfig`` replaces them). A key is
            a site's name (the ``name`` column of :func:`rewrite_report`, one of its aliases, or
            the name of the module that calls ``F.conv2d``) or a regex that must match a whole
            name. Precedence: a key equal to one of the site's names wins; otherwise the first
            regex (in the dict's order) that matches (see :mod:`convnorm_fx.overrides`).
        unmatched_overrides: what a key that matches no conv site does: ``'error'``
            (default: a ``ValueError`` listing the closest site names, since such a key is
            most often a typo), ``'warn'`` or ``'ignore'``.
        filter_fn: ``filter_fn(module, name) -> bool``; ``False`` leaves that site as it is
            (reported as skipped). ``module`` is the conv, or the module calling ``F.conv2d``.
        inplace: modify ``model`` itself instead of a deep copy. Either way nothing changes
            if ``apply`` raises.
        strict: raise :class:`RewriteError` if any learned conv is not rewritten.
        graph_module: return one flat ``torch.fx.GraphModule`` of the rewritten model
            instead of the model object.
        tracer_options: help for the tracer with code it cannot trace: ``leaf_modules`` (a
            sequence of module classes with data-dependent control flow and no conv),
            ``autowrap_functions`` and ``concrete_args`` (see :func:`convnorm_fx.tracing.trace`).
        **options: shortcuts for fields of ``config`` (``bn=False``, ``eps=1e-3``, ...).

    Returns:
        The rewritten model: by default the same class and attributes (a deep copy unless
        ``inplace``). Every rewritten module is the same object as before, with a subclass
        of its class, so hooks, parametrizations, attributes and module sharing survive. Its
        report is available from :func:`rewrite_report`.

    Example:
        >>> import torchvision
        >>> model = convnorm_fx.apply(torchvision.models.resnet18(), eps=1e-4)
        >>> print(convnorm_fx.rewrite_report(model).summary())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects an nn.Module, got {type(model).__name__}")
    register_with_timm()  # (timm may have been imported after convnorm_fx)
    base = _base_config(config, options)
    for name, flag in (("inplace", inplace), ("strict", strict), ("graph_module", graph_module)):
        check_bool(name, flag)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}")
    compiled_overrides = compile_overrides(overrides, base)
    check_choice("unmatched_overrides", unmatched_overrides, UNMATCHED_OVERRIDES)
    tracer_options = _check_tracer_options(tracer_options)
    wrapped = isinstance(model, nn.DataParallel)
    _check_supported(model.module if wrapped else model)
    if not inplace:
        model = _deep_copy(model)
    target = model.module if wrapped else model
    planner = Planner(target, tracer_options)
    planned_sites = planner.run()
    report = planner.report
    graph_options = {k: v for k, v in tracer_options.items() if k != "concrete_args"}
    changes = _prepare(planned_sites, base, filter_fn, compiled_overrides, graph_options)
    check_unmatched(compiled_overrides, report.sites, unmatched_overrides)
    if not report.sites:
        warnings.warn(f"{type(target).__name__} has no 2-D convolution: nothing to rewrite", stacklevel=2)
    left_out = [
        s for s in report.sites if s.action == SiteAction.SKIPPED and s.learned and not s.reason.startswith("excluded")
    ]
    if strict and left_out:
        lines = "\n".join(f"  {s.name}: {s.reason}" for s in left_out)
        raise RewriteError(f"{len(left_out)} conv site(s) were not rewritten (strict=True):\n{lines}")

    with transaction() as changes_made:
        for change in changes:
            change.commit(changes_made)
        for holder in {id(m): m for m in (model, target)}.values():
            changes_made.touch(holder)
            setattr(holder, REPORT_ATTRIBUTE, report)
    if graph_module:
        graph = trace(target, **graph_options, trace_convnorm_convs=True)
        flat = fx.GraphModule(target, graph, class_name=f"{type(target).__name__}ConvNorm")
        setattr(flat, REPORT_ATTRIBUTE, report)
        return flat
    return model
