"""What :func:`convnorm_fx.apply` did to each convolution: typed records and their table."""

from __future__ import annotations

import collections
import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = ["REPORT_ATTRIBUTE", "ConvSite", "RewriteReport", "SiteAction", "rewrite_report"]

class SiteAction(str, enum.Enum):
    """What :func:`convnorm_fx.apply` did to a conv site (a ``str``: compares equal to its value)."""

    #: Found in a traced graph and rewritten.
    GRAPH_REWRITE = "graph rewrite"
    #: Found by walking modules where tracing failed (or not called by forward), and
    #: converted in place into an equivalent ConvNorm module.
    MODULE_SWAP = "module swap"
    #: Left as it is, with the reason.
    SKIPPED = "skipped"
    #: Already a ConvNorm site (a second ``apply``).
    ALREADY = "already rewritten"
    #: Not a 2-D conv (1-D, 3-D, transposed): out of scope.
    OUT_OF_SCOPE = "not rewritten"

    def __str__(self) -> str:
        return self.value

    # Equal to its value as a str, so it must hash as one (dict lookups by the plain string).
    __hash__ = str.__hash__


GRAPH_REWRITE, MODULE_SWAP, SKIPPED, ALREADY, OUT_OF_SCOPE = SiteAction

#: Attribute of a rewritten model that holds its :class:`RewriteReport`.
REPORT_ATTRIBUTE = "_convnorm_report"


@dataclass
class ConvSite:
    """One convolution of the model and what happened to it.

    Attributes:
        name: qualified name of the conv module; for a functional conv, the qualified name
            of the module whose forward calls it, with ``#conv2d`` (``#conv2d_1``, ...) appended.
        kind: ``'module'`` (an ``nn.Conv2d`` called as a module) or ``'function'``
            (``F.conv2d``/``torch.conv2d`` in a forward pass).
        conv_class: class of the conv module (or of the module that calls the function).
        kernel_size, stride, padding, dilation, groups, padding_mode: the geometry
            (``None`` where it could not be read).
        in_channels, out_channels: channel counts where known.
        action: ``'graph rewrite'`` (found in a traced graph and rewritten there),
            ``'module swap'`` (found by walking modules where tracing failed, and converted
            in place into an equivalent ``ConvNormConv2d``), ``'skipped'``, ``'already
            rewritten'``, or
            ``'not rewritten'`` (1-D, 3-D and transposed convs: out of scope).
        reason: why, in words.
        bn: whether a BatchNorm was inserted after the stage.
        learned: whether the conv's weight is learned (a buffer or constant kernel, such as
            a blur filter, is not: it is skipped by design, and ``strict`` ignores it).
        aliases: the site's other qualified names, where its module is registered under
            several names (``nn.Sequential(conv, act, conv)``, a stem shared by two heads):
            one module is one site, rewritten once, and every name reaches the same module.
    """

    name: str
    kind: str
    conv_class: str
    action: SiteAction
    reason: str
    kernel_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: Any = None
    dilation: tuple[int, ...] | None = None
    groups: int | None = None
    padding_mode: str | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    bn: bool = False
    learned: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def rewritten(self) -> bool:
        return self.action in (GRAPH_REWRITE, MODULE_SWAP)

    def geometry(self) -> str:
        if self.kernel_size is None:
            return "?"
        k = "x".join(str(v) for v in self.kernel_size)
        parts = [f"k{k}"]
        if self.stride and any(s != 1 for s in self.stride):
            parts.append("s" + "x".join(str(v) for v in self.stride))
        parts.append(f"p{self.padding}" if not isinstance(self.padding, tuple) else "p" + "x".join(map(str, self.padding)))
        if self.dilation and any(d != 1 for d in self.dilation):
            parts.append("d" + "x".join(str(v) for v in self.dilation))
        if self.groups and self.groups != 1:
            parts.append(f"g{self.groups}")
        if self.padding_mode and self.padding_mode != "zeros":
            parts.append(self.padding_mode)
        return " ".join(parts)


@dataclass
class RewriteReport:
    """Every conv site of a model, with a summary. Returned by :func:`rewrite_report`.

    Attributes:
        sites: one :class:`ConvSite` per convolution, in discovery order.
        traced: qualified names of the modules traced as a whole (``''`` is the model).
        untraced: qualified names of modules that could not be traced, with the error.
        model_class: class name of the rewritten model.
    """

    sites: list[ConvSite] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)
    model_class: str = ""

    @property
    def rewritten(self) -> list[ConvSite]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[ConvSite]:
        return [s for s in self.sites if s.action == SKIPPED]

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(str(s.action) for s in self.sites))

    def summary(self) -> str:
        """One line: how many sites, how many rewritten and how, how many skipped and why."""
        counts = self.counts()
        total = len(self.sites)
        n_graph, n_swap = counts.get(GRAPH_REWRITE, 0), counts.get(MODULE_SWAP, 0)
        line = f"{total} conv sites: {n_graph + n_swap} rewritten ({n_graph} in the graph, {n_swap} by module swap)"
        n_bn = sum(1 for s in self.sites if s.bn and s.rewritten)
        if n_bn:
            line += f", BatchNorm added after {n_bn}"
        if counts.get(ALREADY):
            line += f", {counts[ALREADY]} already rewritten"
        skipped = collections.Counter(s.reason for s in self.skipped)
        if skipped:
            line += f", {sum(skipped.values())} skipped (" + "; ".join(f"{n}x {r}" for r, n in skipped.items()) + ")"
        if counts.get(OUT_OF_SCOPE):
            line += f", {counts[OUT_OF_SCOPE]} not 2-D convs (out of scope)"
        if self.untraced:
            line += f"; {len(self.untraced)} module(s) could not be traced"
        return line

    def format_table(self) -> str:
        """A plain-text table, one row per site."""
        header = ("site", "kind", "class", "geometry", "action", "bn", "reason")
        rows = [
            (s.name, s.kind, s.conv_class, s.geometry(), s.action, "yes" if s.bn else "", s.reason) for s in self.sites
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        widths[-1] = 0  # the reason runs to the end of the line
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "summary": self.summary(),
            "counts": self.counts(),
            "traced": list(self.traced),
            "untraced": dict(self.untraced),
            "sites": [asdict(s) for s in self.sites],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return self.format_table()


def rewrite_report(model: nn.Module) -> RewriteReport:
    """The report :func:`convnorm_fx.apply` attached to ``model``.

    Raises:
        ValueError: if ``model`` was not produced by :func:`convnorm_fx.apply`.
    """
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if not isinstance(report, RewriteReport):
        raise ValueError(
            f"{type(model).__name__} carries no rewrite report: call convnorm_fx.apply(model) first "
            "and pass the model it returns"
        )
    return report
