"""Finding every conv site of a model: trace where possible, walk modules elsewhere.

The planner traces the model with :class:`~convnorm_fx.tracing.ConvTracer`. Where the whole
model cannot be traced, it keeps the largest traceable region (children that cannot be traced
become leaves) and walks the modules the graphs do not reach. For every candidate, a module
or a ``call_function`` node, it asks the site kinds (:mod:`convnorm_fx.sites`) what it is.
Every conv ends up in the report: rewritten, skipped with a reason, or out of scope.

Planning changes nothing: traces leave the modules as they were. A module registered under
several names is one site, listed under its first name with the others as aliases.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

from torch import fx, nn

from .cond_conv import ConvNormCondConv2d, is_cond_conv2d
from .graph_facts import flows_into_norm, is_parametrization, join, next_sibling_norm, reads_pooled_map, stack_owner
from .modules import ConvNorm2d
from .report import ConvSite, RewriteReport, SiteAction
from .sites import PlannedSite, describe_geometry, function_kind, module_kind, rewritten_kind
from .tracing import TracingFailed, trace

__all__ = ["Planner", "has_conv_work"]


def has_conv_work(module: nn.Module) -> bool:
    """Whether a module holds convs, stages, or 4-D parameters a forward might convolve with."""
    return any(
        isinstance(m, (nn.Conv2d, ConvNorm2d))
        or is_cond_conv2d(m)
        or any(p.dim() == 4 for p in m.parameters(recurse=False))
        for m in module.modules()
    )


class Planner:
    """Lists every conv site of ``model`` (see the module docstring).

    Args:
        model: the model (or the module inside an ``nn.DataParallel``).
        tracer_options: ``leaf_modules``, ``autowrap_functions``, ``concrete_args`` for
            :func:`~convnorm_fx.tracing.trace`.
    """

    def __init__(self, model: nn.Module, tracer_options: Mapping[str, Any]) -> None:
        self.model = model
        self.tracer_options = dict(tracer_options)
        self.planned: list[PlannedSite] = []
        self.report = RewriteReport(model_class=type(model).__name__)
        self._seen: set[int] = set()  # conv modules listed as sites
        self._walked: set[int] = set()  # untraceable modules walked
        self._function_counts: dict[int, int] = {}  # owner -> its F.conv2d calls listed

    def run(self) -> list[PlannedSite]:
        """Plan the whole model; the report is :attr:`report`."""
        if rewritten_kind(self.model) or module_kind(self.model):
            self._add_module_site(self.model, "", SiteAction.MODULE_SWAP, "the model is itself a conv module", None)
        else:
            self._visit(self.model, "")
        self._sweep_unvisited()
        self._name_aliases()
        return self.planned

    # -- tracing -----------------------------------------------------------------------

    def _visit(self, module: nn.Module, prefix: str) -> None:
        try:
            graph = trace(module, **self.tracer_options)
        except TracingFailed as e:
            graph = self._trace_around_untraceable_children(module, prefix)
            if graph is None:
                self.report.untraced[prefix] = str(e.__cause__ or e)
                self._walk_untraceable(module, prefix)
                return
        self.report.traced.append(prefix)
        for node in graph.nodes:
            if node.op == "call_module":
                self._plan_module_node(module, prefix, node)
            elif function_kind(node) is not None:
                self._plan_function_node(module, prefix, node)

    def _trace_around_untraceable_children(self, module: nn.Module, prefix: str) -> fx.Graph | None:
        """Keep the largest traceable region: trace ``module`` again with the children that
        cannot be traced on their own as leaves (their convs are then found by walking them)."""
        children = list(module.named_children())
        stuck = []
        for name, child in children:
            if not has_conv_work(child) or is_cond_conv2d(child) or isinstance(child, ConvNormCondConv2d):
                continue  # (CondConvs are leaves anyway)
            try:
                trace(child, **self.tracer_options)
            except TracingFailed as e:
                stuck.append(name)
                self.report.untraced[join(prefix, name)] = str(e.__cause__ or e)
        if not stuck or len(stuck) == len(children):
            return None
        try:
            return trace(module, **self.tracer_options, leaf_names=stuck)
        except TracingFailed:
            for name in stuck:
                self.report.untraced.pop(join(prefix, name), None)
            return None

    def _walk_untraceable(self, module: nn.Module, prefix: str) -> None:
        if id(module) in self._walked:
            return
        self._walked.add(id(module))
        kernels = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 4]
        if kernels and not isinstance(module, nn.Conv2d) and not is_parametrization(module):
            site = ConvSite(
                name=f"{prefix}#conv2d",
                kind="function",
                conv_class=type(module).__name__,
                action=SiteAction.SKIPPED,
                reason=f"'{prefix}' could not be traced and holds 4-D parameter(s) {kernels}: "
                "a functional conv in its forward cannot be rewritten (make it traceable or wrap the conv in nn.Conv2d)",
            )
            self._record(PlannedSite(site=site, module=module))
        for name, child in module.named_children():
            fqn = join(prefix, name)
            if id(child) in self._seen:
                continue
            if rewritten_kind(child) or module_kind(child):
                reason = f"'{prefix or type(module).__name__}' could not be traced; converted in place"
                self._add_module_site(child, fqn, SiteAction.MODULE_SWAP, reason, next_sibling_norm(module, name))
            elif has_conv_work(child) and not is_parametrization(child):
                self._visit(child, fqn)

    # -- sites ---------------------------------------------------------------------------

    def _plan_module_node(self, root: nn.Module, prefix: str, node: fx.Node) -> None:
        module = root.get_submodule(node.target)
        fqn = join(prefix, node.target)
        if id(module) in self._seen:
            return  # a module called twice (or under two names) is one site
        if rewritten_kind(module) or module_kind(module):
            reason = f"{type(module).__name__} in the traced graph"
            self._add_module_site(module, fqn, SiteAction.GRAPH_REWRITE, reason, flows_into_norm(node, root))
            self.planned[-1].pooled_input = reads_pooled_map(node, root)
        elif has_conv_work(module) and not isinstance(module, ConvNorm2d) and not is_parametrization(module):
            # A leaf that hides convs (untraceable child, user leaf_modules): walk it.
            self._walk_untraceable(module, fqn)

    def _plan_function_node(self, root: nn.Module, prefix: str, node: fx.Node) -> None:
        owner_rel, first_call = stack_owner(node)
        if not first_call:
            return  # the same F.conv2d of a module called again: one site
        owner = root.get_submodule(owner_rel) if owner_rel else root
        index = self._function_counts.get(id(owner), 0)
        self._function_counts[id(owner)] = index + 1
        if isinstance(owner, nn.Conv2d):
            self._seen.add(id(owner))
        name = f"{join(prefix, owner_rel)}#conv2d" + (f"_{index}" if index else "")
        site = ConvSite(name, "function", type(owner).__name__, SiteAction.SKIPPED, "")
        kind = function_kind(node)
        planned = PlannedSite(site=site, module=owner, kind=kind, function_index=index)
        kind.describe(planned, node, root, prefix)
        if site.action == SiteAction.GRAPH_REWRITE:
            planned.followed_by = flows_into_norm(node, root)
            planned.pooled_input = reads_pooled_map(node, root)
        self._record(planned)

    def _add_module_site(
        self, module: nn.Module, fqn: str, action: SiteAction, reason: str, followed: str | None
    ) -> None:
        """List a conv module: as already rewritten, as out of scope, or with ``action``."""
        self._seen.add(id(module))
        kind = rewritten_kind(module)
        if kind is not None:
            action, reason = SiteAction.ALREADY, type(module).__name__
        else:
            kind = module_kind(module)
            if kind.convnorm_class is None:
                action = SiteAction.OUT_OF_SCOPE
        site = ConvSite(name=fqn, kind="module", conv_class=type(module).__name__, action=action, reason=reason)
        kind.describe(module, site)
        self._record(PlannedSite(site=site, module=module, kind=kind, followed_by=followed))

    def _record(self, planned: PlannedSite) -> None:
        self.planned.append(planned)
        self.report.sites.append(planned.site)

    def _sweep_unvisited(self) -> None:
        """Convs that no graph reached (not called by forward, or inside leaves): list them all."""
        for fqn, module in self.model.named_modules():
            if id(module) in self._seen:
                continue
            if rewritten_kind(module) or module_kind(module):
                parent_name, _, name = fqn.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                reason = "not called by the traced forward(); converted in place"
                self._add_module_site(module, fqn, SiteAction.MODULE_SWAP, reason, next_sibling_norm(parent, name))
            elif isinstance(module, nn.Conv2d) and id(module) not in self._function_counts:
                # A conv that changes nn.Conv2d's forward (or is parametrized) and that no
                # traced graph reached: trace it on its own.
                if id(module) not in self._walked:
                    self._visit(module, fqn)
                if id(module) not in self._seen:
                    how = "could not be traced" if id(module) in self._walked else "was not reached by a traced graph"
                    reason = f"{type(module).__name__} changes nn.Conv2d's forward and {how}"
                    site = ConvSite(fqn, "module", type(module).__name__, SiteAction.SKIPPED, reason)
                    describe_geometry(module, site)
                    self._seen.add(id(module))
                    self._record(PlannedSite(site=site, module=module))

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
