"""A stage's data: its own tasks' training and validation cases, plus the method's replay buffer of earlier tasks.

The method chooses what to replay (`Method.replay_buffer`); this module enforces the contract around it: only a
method that declares ``keeps_old_data`` may replay, it may only name earlier tasks' training cases, and its
``replay_share`` of every batch is what the replayed sources get.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PluginContractError
from ..methods import Method, Stage
from ..nnunet.trainer import DataSource
from ..tasks import Task, validation_split
from .context import RunContext, tasks_before


@dataclass(frozen=True)
class StageSources:
    """Builds every stage's `DataSource` list. ``preprocessed_folder(task)``: nnU-Net's preprocessed data of a task
    being trained; ``replay_folder(task)``: where the run keeps the replay buffer's copies of an earlier task's cases
    (`RunFolder.replay_dir`); ``validation_fraction`` and ``seed``: the spec's, for the per-epoch validation cases."""
    tasks: list[Task]
    method: Method
    schedule: list[Stage]
    preprocessed_folder: Callable[[Task], Path]
    replay_folder: Callable[[str], Path]
    validation_fraction: float
    seed: int

    @classmethod
    def of(cls, ctx: RunContext) -> StageSources:
        return cls(ctx.tasks, ctx.method, ctx.schedule, ctx.workspace.preprocessed_folder, ctx.run.replay_dir,
                   ctx.exp.validation_fraction, ctx.exp.seed)

    def split_train_val(self, task: Task) -> tuple[list[str], list[str]]:
        """The task's (training, validation) cases: `tasks.validation_split` with the spec's fraction and seed."""
        return validation_split(task, self.validation_fraction, self.seed)

    def __call__(self, stage: Stage) -> list[DataSource]:
        """The stage's own tasks, plus the method's replay buffer drawn with its share of every batch."""
        by_name = {t.name: t for t in self.tasks}
        method = self.method
        current = []
        for name in stage.train_tasks:
            t = by_name[name]
            train, val = self.split_train_val(t)
            current.append(DataSource(name, self.preprocessed_folder(t), train, val))
        earlier = {name: self.split_train_val(by_name[name])[0] for name in tasks_before(self.schedule, stage)
                   if name not in stage.train_tasks}
        buffer = method.replay_buffer(stage, earlier) if earlier else {}
        if buffer and not method.keeps_old_data:
            raise PluginContractError(f"method '{method.name}' replays old data but does not declare keeps_old_data")
        for name, cases in buffer.items():
            unknown = sorted(set(cases) - set(earlier.get(name, [])))
            if unknown:
                raise PluginContractError(f"replay buffer of '{method.name}' names cases outside {name}'s training "
                                          f"cases: {unknown[:3]}")
        share = method.replay_share(stage) if buffer else 0.0
        replay = [DataSource(name, self.replay_folder(name), sorted(cases), []) for name, cases in buffer.items()
                  if cases]
        for group, total in ((current, 1.0 - share), (replay, share)):
            n = sum(len(s.train_keys) for s in group)
            for s in group:
                s.weight = total * len(s.train_keys) / n
        return current + replay
