"""Continual-learning methods, discovered automatically: drop a file with a `Method` subclass here and it is usable.

`available_methods()` lists the names; `create_method(name, params)` builds one.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..errors import UserInputError
from .base import Method, Stage

__all__ = ["Method", "Stage", "available_methods", "create_method"]


def _registry() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Method]] = {}
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def available_methods() -> list[str]:
    return list(_registry())


def create_method(name: str, params: dict[str, Any] | None = None) -> Method:
    registry = _registry()
    if name not in registry:
        raise UserInputError(f"Unknown method '{name}'. Available: {', '.join(registry)}.")
    return registry[name](**(params or {}))
