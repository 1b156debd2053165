"""Declared method parameters: each one's default and check, written once, validated in one place.

A method lists its parameters in ``params`` as `Param` objects, usually made by the constructors below::

    params = {"lambda": number(1000.0, min=0), "online": flag(False), "init_new": one_of("background", ("background",
              "random"))}

`Method.__init__` (and only it) checks the spec's values against them: an unknown name or a value the check refuses
raises `MethodParamError`, always in the same words, with a "did you mean" from `difflib` where a close spelling
exists (MONAI's ``look_up_option`` and Avalanche's ``_check_mispelled_kwargs`` do the same). Values are kept as
given, not converted, so a run's stored ``method_params`` and its method state stay what the spec said.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MethodParamError


@dataclass(frozen=True)
class Param:
    """One parameter: its ``default``, ``accepts(value)`` (True when the value is valid) and ``allowed``, what it
    accepts in words for the error message. ``choices``: the finite set of valid values, when there is one (the
    "did you mean" candidates)."""
    default: Any
    allowed: str
    accepts: Callable[[Any], bool]
    choices: tuple[Any, ...] = ()

    def check(self, method: str, name: str, value: Any) -> None:
        if not self.accepts(value):
            raise MethodParamError(method, name, value, self.allowed, closest(value, self.choices))


def closest(word: Any, candidates: Sequence[Any]) -> str | None:
    """The candidate spelled most like ``word`` (difflib, ratio >= 0.6), or None."""
    if not isinstance(word, str):
        return None
    names = [c for c in candidates if isinstance(c, str)]
    found = difflib.get_close_matches(word, names, n=1)
    return found[0] if found else None


def is_number(value: Any) -> bool:
    """An int or float that is finite (bools are not numbers here: ``true`` in a spec is never meant as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range(min: float | None, max: float | None, min_open: bool, max_open: bool) -> tuple[str, Callable]:
    """The words and the test of an interval."""
    def inside(v: float) -> bool:
        return ((min is None or (v > min if min_open else v >= min))
                and (max is None or (v < max if max_open else v <= max)))
    if min is not None and max is not None:
        words = f"in {'(' if min_open else '['}{min:g}, {max:g}{')' if max_open else ']'}"
    elif min is not None:
        words = f"{'>' if min_open else '>='} {min:g}"
    elif max is not None:
        words = f"{'<' if max_open else '<='} {max:g}"
    else:
        words = ""
    return words, inside


def number(default: float, *, min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False) -> Param:
    """A real number, optionally within bounds (closed unless ``min_open`` / ``max_open``)."""
    words, inside = _range(min, max, min_open, max_open)
    return Param(default, f"a number {words}".rstrip(), lambda v: is_number(v) and inside(v))


def integer(default: int | None, *, min: int | None = None, null: str | None = None) -> Param:
    """A whole number (at least ``min``); with ``null`` also ``null``/None, which means what ``null`` says."""
    words, inside = _range(min, None, False, False)
    allowed = f"a whole number {words}".rstrip() + (f", or null ({null})" if null else "")
    return Param(default, allowed, lambda v: (null is not None and v is None) or (is_whole(v) and inside(v)))


def flag(default: bool) -> Param:
    return Param(default, "true or false", lambda v: isinstance(v, bool))


def one_of(default: str, choices: Sequence[str]) -> Param:
    choices = tuple(choices)
    return Param(default, "one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices, choices)


def numbers(default: Sequence[float], *, min: float | None = None, min_open: bool = False,
            whole: bool = False) -> Param:
    """A non-empty list of numbers (whole numbers with ``whole``), each at least (above, with ``min_open``) ``min``."""
    words, inside = _range(min, None, min_open, False)
    kind = "whole numbers" if whole else "numbers"
    test = is_whole if whole else is_number
    return Param(list(default), f"a non-empty list of {kind} {words}".rstrip(),
                 lambda v: isinstance(v, list) and bool(v) and all(test(x) and inside(x) for x in v))


def names(default: Sequence[str], what: str) -> Param:
    """A non-empty list of strings (``what`` they name, for the message)."""
    return Param(list(default), f"a non-empty list of {what}",
                 lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v))


__all__ = ["Param", "closest", "flag", "integer", "is_number", "is_whole", "names", "number", "numbers", "one_of"]
