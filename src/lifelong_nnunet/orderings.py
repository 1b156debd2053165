"""Task orderings for a sweep: continual results depend on the order the tasks arrive in, so a sweep repeats each
method over several orders.

An ordering request is ``given``, ``reverse`` (the given order and its reverse), ``all`` (every permutation, refused
above ``max_orderings``) or an integer N (the given order, then N-1 further distinct permutations drawn with a seed).
Orderings are named for folders and reports: ``o0-given`` for the given order, ``o<i>-<short task names joined>``
for the others, so a name says which order it is and stays the same when the sweep is repeated.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserInputError
from .names import DATASET_RE, short_task_name

ORDERING_KINDS = ("given", "reverse", "all")
DEFAULT_MAX_ORDERINGS = 720  # 6 tasks: 6! = 720 orderings; 7 tasks would be 5040 runs per method and seed
SHUFFLE_ALL_UP_TO = 8  # tasks; 8! = 40320 permutations are cheap to list, beyond that draw by rejection
MAX_NAME_CHARS = 60  # longer joined short names fall back to dataset IDs, to keep folder names readable


@dataclass(frozen=True)
class Ordering:
    """One order of the tasks: ``name`` for folders and reports, ``order`` the task names in training order."""
    name: str
    order: tuple[str, ...]


def parse_ordering_request(value: object) -> str | int:
    """``given``, ``reverse``, ``all`` or a positive integer (also as text, from the command line)."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < 1:
            raise UserInputError(f"orderings {value} is not allowed: give a number >= 1 (1 = the given order only).")
        return value
    if isinstance(value, str) and value.strip().lower() in ORDERING_KINDS:
        return value.strip().lower()
    raise UserInputError(f"orderings {value!r} is unknown: use given, reverse, all, or a number N of orderings (the "
                         f"given order plus N-1 seeded random permutations).")


def ordering_count(n_tasks: int, request: str | int) -> int:
    """How many orderings a request gives for ``n_tasks`` tasks (before any guard)."""
    if request == "given":
        return 1
    if request == "reverse":
        return 1 if n_tasks < 2 else 2
    if request == "all":
        return math.factorial(n_tasks)
    return int(request)


def make_orderings(tasks: Sequence[str], request: str | int, seed: int = 0,
                   max_orderings: int = DEFAULT_MAX_ORDERINGS) -> list[Ordering]:
    """The orderings of ``tasks`` (task names in the given order) that ``request`` asks for; the given order first.

    Raises UserInputError when ``all`` (or N) exceeds ``max_orderings``, or when N exceeds the number of distinct
    orders that exist (n!).
    """
    tasks = tuple(tasks)
    if len(set(tasks)) != len(tasks) or not tasks:
        raise UserInputError(f"orderings need a non-empty list of distinct tasks (got {list(tasks)}).")
    request = parse_ordering_request(request)
    n = len(tasks)
    count = ordering_count(n, request)
    if request == "all" and count > max_orderings:
        raise_it = f", or raise max_orderings (--max-orderings {count}) if you mean it" if count <= 10**6 else ""
        raise UserInputError(
            f"orderings 'all' of {n} tasks gives {n}! = {count} orderings, more than max_orderings ({max_orderings}) "
            f"allows; each ordering is a full run per method and seed. Ask for a number of seeded random orderings "
            f"instead (e.g. orderings: 10){raise_it}.")
    if isinstance(request, int):
        if count > math.factorial(n):
            raise UserInputError(
                f"orderings {count} asks for more orderings than {n} task(s) have ({n}! = {math.factorial(n)}). "
                f"Use orderings: all, or a number <= {math.factorial(n)}.")
        if count > max_orderings:
            raise UserInputError(
                f"orderings {count} is more than max_orderings ({max_orderings}). Ask for fewer, or raise "
                f"max_orderings (--max-orderings {count}) if you mean it.")
    if request == "given" or count == 1:
        orders = [tasks]
    elif request == "reverse":
        orders = [tasks, tasks[::-1]]
    elif request == "all":
        orders = [tasks] + [p for p in itertools.permutations(tasks) if p != tasks]
    else:
        orders = [tasks] + _random_orders(tasks, count - 1, seed)
    return [Ordering(ordering_name(i, order, tasks), order) for i, order in enumerate(orders)]


def _random_orders(tasks: tuple[str, ...], k: int, seed: int) -> list[tuple[str, ...]]:
    """``k`` distinct permutations other than ``tasks``, drawn from one seeded generator. For a given task list the
    draw does not depend on ``k``, so asking for more orderings later keeps the earlier ones (a prefix) and their
    run folders."""
    if len(tasks) <= SHUFFLE_ALL_UP_TO:  # few permutations: shuffle them all (no slow rejection when k is near n!)
        pool = [p for p in itertools.permutations(tasks) if p != tasks]
        random.Random(seed).shuffle(pool)
        return pool[:k]
    rng = random.Random(seed)
    seen = {tasks}
    out: list[tuple[str, ...]] = []
    while len(out) < k:
        order = list(tasks)
        rng.shuffle(order)
        if tuple(order) not in seen:
            seen.add(tuple(order))
            out.append(tuple(order))
    return out


def ordering_name(index: int, order: Sequence[str], given: Sequence[str]) -> str:
    """``o0-given`` for the given order, else ``o<index>-<short names joined by '-'>`` (dataset IDs when too long)."""
    if tuple(order) == tuple(given):
        return f"o{index}-given"
    label = "-".join(short_task_name(t) for t in order)
    if len(label) > MAX_NAME_CHARS:
        label = "-".join((m.group(1) if (m := DATASET_RE.match(t)) else t) for t in order)
    return f"o{index}-{label}"
