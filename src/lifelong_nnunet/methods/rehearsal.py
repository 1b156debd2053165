"""Rehearsal (experience replay): a small, bounded, seeded memory of earlier tasks' training cases is mixed into
every later stage (iCaRL's fixed exemplar memory, Rebuffi et al. 2017; "tiny episodic memories", Chaudhry et al.
2019).

The memory is explicit: when a task's stage ends, ``cases_per_task`` of its training cases are drawn once (seeded),
and the runner keeps preprocessed copies of exactly those cases in the run folder (``replay/<task>/``, the only
image data a run folder holds), so later stages and ``extend`` replay them after the original data are deleted.
``max_cases`` bounds the memory: when a new task does not fit, the tasks' quotas are made as even
as possible and each task keeps a prefix of its sample, so cases only ever leave the memory, never come back.
``share`` is the expected fraction of every training batch drawn from the memory. See docs/methods/rehearsal.md.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .base import Method, Stage
from .params import Param, integer, is_number, number


def _cases_per_task(value: Any) -> bool:
    """A whole number of cases (>= 1, also written 3.0) or a fraction of the task's cases in (0, 1)."""
    return is_number(value) and value > 0 and (value < 1 or float(value).is_integer())


class Rehearsal(Method):
    name = "rehearsal"
    keeps_old_data = True
    # replayed cases do not annotate later tasks' structures, so they would teach them as background
    scenarios = ("domain",)
    params = {
        # a count of cases per task, or a fraction of each task's training cases
        "cases_per_task": Param(2, "a whole number >= 1 or a fraction in (0, 1)", _cases_per_task),
        "max_cases": integer(20, min=1, null="no bound"),
        "share": number(0.3, min=0, max=1, max_open=True),
        "seed": integer(0),
    }

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        #: task -> kept case IDs, in the order drawn (tasks in the order they entered the memory)
        self.buffer: dict[str, list[str]] = {}

    # ---- the memory -----------------------------------------------------------------------------------------
    def sample_size(self, n_cases: int) -> int:
        """How many of a task's ``n_cases`` training cases are drawn (before the ``max_cases`` bound)."""
        per_task = self.config["cases_per_task"]
        n = int(per_task) if per_task >= 1 else int(np.ceil(per_task * n_cases))
        return max(1, min(n, n_cases)) if n_cases else 0

    def draw(self, task: str, cases: list[str]) -> list[str]:
        """A seeded sample of ``cases``: depends only on (seed, task name, the set of cases)."""
        rng = np.random.default_rng([self.config["seed"], zlib.crc32(task.encode())])
        order = rng.permutation(sorted(cases)).tolist()
        return order[: self.sample_size(len(order))]

    def keep_for_replay(self, task: str, train_cases: list[str]) -> dict[str, list[str]]:
        """The task's sample enters the memory when its stage ends (the same draw a later stage would make), so
        its cases can be kept in the run folder before the original data may be deleted."""
        if task not in self.buffer:
            self.buffer[task] = self.draw(task, train_cases)
        self._bound()
        return {t: list(cases) for t, cases in self.buffer.items()}

    def replay_buffer(self, stage: Stage, earlier: dict[str, list[str]]) -> dict[str, list[str]]:
        for task, cases in earlier.items():
            if task not in self.buffer:
                self.buffer[task] = self.draw(task, cases)
        self._bound()
        return {task: [c for c in self.buffer[task] if c in set(cases)]
                for task, cases in earlier.items() if self.buffer.get(task)}

    def _bound(self) -> None:
        """Shrink to ``max_cases``: the largest per-task quota q such that sum(min(len, q)) fits ("water filling");
        what is left below the next whole quota goes to the most recent tasks. Each task keeps a prefix."""
        limit = self.config["max_cases"]
        sizes = [len(v) for v in self.buffer.values()]
        if limit is None or sum(sizes) <= limit:
            return
        alloc = [0] * len(sizes)
        left, open_ = limit, [i for i, s in enumerate(sizes) if s > 0]
        while left > 0 and open_:
            quota = left // len(open_)
            if quota == 0:
                for i in reversed(open_[-left:]):  # the newest tasks get the last few places
                    alloc[i] += 1
                break
            for i in open_:
                give = min(quota, sizes[i] - alloc[i])
                alloc[i] += give
                left -= give
            open_ = [i for i in open_ if alloc[i] < sizes[i]]
        for (task, kept), n in zip(list(self.buffer.items()), alloc):
            self.buffer[task] = kept[:n]

    def replay_share(self, stage: Stage) -> float:
        return float(self.config["share"])

    # ---- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": {task: list(cases) for task, cases in self.buffer.items()},
                "order": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffer = state.get("buffer", {})
        self.buffer = {task: list(buffer[task]) for task in state.get("order", list(buffer))}
