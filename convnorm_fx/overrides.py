"""Per-site options: ``overrides={key: None | {option: value} | ConvNormConfig}``.

A key is a site's name (the ``name`` column of :func:`convnorm_fx.rewrite_report`, one of its
aliases, or the name of the module that calls ``F.conv2d``) or a regular expression that
must match a whole name. **Precedence**, as in ``torch.ao.quantization``'s ``QConfigMapping``
(one object per level, priority written down): a key equal to one of the site's names wins,
whatever its place in the dict; otherwise the first regex, in the dict's order, that matches;
otherwise the options of :func:`convnorm_fx.apply`. ``None`` leaves the site as it is, a dict
changes options on top of ``apply``'s, a :class:`~convnorm_fx.config.ConvNormConfig`
replaces them. A key that matches no conv site is an error (most often a typo), unless
``unmatched_overrides`` says otherwise.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from .config import ConvNormConfig
from .report import ConvSite

__all__ = ["UNMATCHED_OVERRIDES", "Override", "check_unmatched", "compile_overrides", "matching_override", "site_names"]


#: What a key that matches no conv site does.
UNMATCHED_OVERRIDES = ("error", "warn", "ignore")


@dataclass
class Override:
    """One ``overrides`` entry: its key, the key as a regex, and the options (None: skip)."""

    key: str
    pattern: re.Pattern[str]
    config: ConvNormConfig | None
    matched: bool = False


def compile_overrides(overrides: Any, base: ConvNormConfig) -> list[Override]:
    """Validate ``overrides`` and turn each entry into an :class:`Override`."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a dict {{site name or regex: None, {{option: value}} or ConvNormConfig}}, got {overrides!r}"
        )
    compiled = []
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
            try:
                config = ConvNormConfig.build(base, **dict(value))
            except (TypeError, ValueError) as e:
                raise type(e)(f"overrides[{key!r}]: {e}") from e
        else:
            raise TypeError(
                f"overrides[{key!r}] must be None (leave the site as it is), a dict of options or a ConvNormConfig, "
                f"got {value!r}"
            )
        compiled.append(Override(key, pattern, config))
    return compiled


def site_names(site: ConvSite) -> list[str]:
    """The names an override can use for a site: its names and aliases, and for a function
    site the names of the module that calls it."""
    names = [site.name, *site.aliases]
    return names + [n.partition("#")[0] for n in names if "#" in n]


def matching_override(site: ConvSite, overrides: list[Override]) -> Override | None:
    """The override for ``site``: an exact name first, then the first full-match regex."""
    names = site_names(site)
    for override in overrides:
        if override.key in names:
            return override
    for override in overrides:
        if any(override.pattern.fullmatch(name) for name in names):
            return override
    return None


def check_unmatched(overrides: list[Override], sites: list[ConvSite], policy: str) -> None:
    unmatched = [o.key for o in overrides if not o.matched]
    if not unmatched or policy == "ignore":
        return
    names = sorted({name for site in sites for name in site_names(site)})
    close = difflib.get_close_matches(unmatched[0], names, n=5, cutoff=0.4)
    message = (
        f"overrides key {unmatched[0]!r} matches no conv site"
        + (f" (nor do {unmatched[1:]!r})" if len(unmatched) > 1 else "")
        + (f"; closest site names: {', '.join(close)}" if close else "")
        + ". Site names are those of rewrite_report(model); pass unmatched_overrides='ignore' to allow keys "
        "that match nothing"
    )
    if policy == "error":
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)
