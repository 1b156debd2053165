"""Continual-learning methods, discovered automatically: drop a file with a `Method` subclass here and it is usable.

`available_methods()` lists the names; `create_method(name, params, labels=...)` builds one. Discovery only finds
classes defined in this package, so a subclass written elsewhere (a test's probe, a user's experiment) never shows
up by accident: it is made available explicitly, for as long as needed, with `registered_methods`.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import PluginContractError, UserInputError
from .base import Method, Stage, StageState, StockNetwork, TrainerView

if TYPE_CHECKING:  # pragma: no cover
    from ..labels import LabelSpace

__all__ = ["Method", "Stage", "StageState", "StockNetwork", "TrainerView", "available_methods", "create_method",
           "registered_methods"]

_REGISTERED: dict[str, type[Method]] = {}  # methods defined outside this package, see `registered_methods`


def _registry() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "params"):
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Method]] = {}
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name and cls.__module__.startswith(f"{__name__}."):
            if found.setdefault(cls.name, cls) is not cls:
                raise PluginContractError(f"two methods are named '{cls.name}': {found[cls.name].__qualname__} and "
                                          f"{cls.__qualname__}; give each method its own name")
    for name, cls in _REGISTERED.items():
        if name in found:
            raise PluginContractError(f"method '{name}' ({cls.__qualname__}) would hide the installed method of that "
                                      f"name; give it another name")
        found[name] = cls
    return dict(sorted(found.items()))


def available_methods() -> list[str]:
    return list(_registry())


def create_method(name: str, params: dict[str, Any] | None = None, labels: LabelSpace | None = None) -> Method:
    """The method ``name`` with the spec's ``params`` (validated, see `methods.params`) and the run's label space."""
    registry = _registry()
    if name not in registry:
        raise UserInputError(f"Unknown method '{name}'. Available: {', '.join(registry)}.")
    return registry[name](labels=labels, **(params or {}))


@contextlib.contextmanager
def registered_methods(*classes: type[Method]) -> Iterator[None]:
    """Make ``classes`` (Method subclasses defined outside this package, each with a ``name``) available by name
    inside the block, e.g. a test's probe run end to end; afterwards `available_methods` no longer lists them."""
    added = []
    try:
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Method) and cls.name):
                raise PluginContractError(f"{cls!r} is not a Method subclass with a name")
            if cls.name in _REGISTERED:
                raise PluginContractError(f"method '{cls.name}' is already registered")
            _REGISTERED[cls.name] = cls
            added.append(cls.name)
        yield
    finally:
        for name in added:
            del _REGISTERED[name]
