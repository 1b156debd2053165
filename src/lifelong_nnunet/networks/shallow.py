"""Shallow copies of modules: the one way our network wrappers build new views without copying weights."""
from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn


def shallow_copy(module: nn.Module, drop: Iterable[str] = ()) -> nn.Module:
    """A new module object of the same class sharing every submodule, parameter and buffer, with its own table of
    children (so replacing a child in the copy leaves the original untouched), without the children in ``drop``.

    Wrappers use it instead of ``deepcopy`` because a view must train the very parameters of the original (a head
    of a multi-head network, a grown output layer), and a new object so the trainer sees a changed network and
    rebuilds its optimizer."""
    drop = set(drop)
    clone = copy.copy(module)
    clone._modules = type(module._modules)((k, v) for k, v in module._modules.items() if k not in drop)
    return clone
