"""Module changes that are undone together if one of them fails.

:func:`convnorm_fx.apply` prepares every change first and then makes them in a
:func:`transaction`: before its first change, each module's class and shallow state
(attributes, children, parameters, buffers) are recorded, and if anything raises, every
touched module gets them back, so a failing ``apply(model, inplace=True)`` leaves the model
as it was.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

__all__ = ["Transaction", "transaction"]

_REGISTRIES = ("_modules", "_parameters", "_buffers")


class Transaction:
    """Records modules before they change; :meth:`rollback` restores them."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, type, dict[str, Any], dict[str, dict[str, Any]]]] = []
        self._touched: set[int] = set()

    def touch(self, module: nn.Module) -> None:
        """Record ``module`` (once) before it is changed."""
        if id(module) in self._touched:
            return
        self._touched.add(id(module))
        registries = {key: dict(getattr(module, key)) for key in _REGISTRIES}
        self._saved.append((module, type(module), dict(vars(module)), registries))

    def rollback(self) -> None:
        """Give every touched module back its class and shallow state, last touched first."""
        for module, cls, attributes, registries in reversed(self._saved):
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for key, saved in registries.items():  # the same dicts, with their old contents
                registry = getattr(module, key)
                registry.clear()
                registry.update(saved)


@contextlib.contextmanager
def transaction() -> Iterator[Transaction]:
    """A :class:`Transaction` that rolls back if the ``with`` block raises."""
    changes = Transaction()
    try:
        yield changes
    except BaseException:
        changes.rollback()
        raise
