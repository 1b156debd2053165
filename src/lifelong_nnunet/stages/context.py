"""What every stage of one run shares, and what the schedule says about the tasks before a stage.

The run loop imports this package lazily (it needs the runner's run-folder helpers, and the runner needs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from ..console import RunLog
from ..experiment import Experiment
from ..labels import LabelSpace
from ..methods import Method, Stage
from ..run_folder import RunFolder
from ..runner import model_dataset_json
from ..tasks import Task

if TYPE_CHECKING:  # pragma: no cover
    from ..nnunet.planning import Workspace


def tasks_before(schedule: list[Stage], stage: Stage) -> list[str]:
    """Tasks trained into the weights ``stage`` starts from: none when it starts from the initial model, else
    every task of the stages before it, in training order, each once."""
    if stage.init != "previous":
        return []
    done = [s for s in schedule if s.index < stage.index]
    return list(dict.fromkeys(t for s in done for t in s.train_tasks))


def tasks_trained_by(schedule: list[Stage], index: int) -> list[str]:
    """Tasks whose training went into the model of stage ``index`` (none for stage 0)."""
    if index == 0:
        return []
    stage = next(s for s in schedule if s.index == index)
    return list(dict.fromkeys([*tasks_before(schedule, stage), *stage.train_tasks]))


@dataclass(frozen=True)
class RunContext:
    """The parts of a run every stage uses; ``schedule`` is the run's stage plan (as stored in the run folder) and
    ``workspace`` the planned nnU-Net workspace. Frozen: a stage reads it and changes none of it."""
    exp: Experiment
    run: RunFolder
    workspace: Workspace
    tasks: list[Task]
    method: Method
    device: torch.device
    log: RunLog
    labels: LabelSpace
    schedule: list[Stage]

    @cached_property
    def by_name(self) -> dict[str, Task]:
        return {t.name: t for t in self.tasks}

    @cached_property
    def plans(self) -> dict:
        """The shared plans, as the run stored them: after `extend` the workspace holds only the new tasks (the plans
        nnU-Net writes for each task differ only in the dataset's name)."""
        return self.run.read_plans()

    def plans_for(self, task: str) -> dict:
        """The plans that preprocess ``task``'s images: the shared architecture with the task's own normalisation."""
        return self.run.task_plans(task, self.exp.configuration)

    @cached_property
    def dataset_json(self) -> dict:
        """The model's dataset.json: every structure of the sequence in the class scenario. Built from the first
        task's record, which outlives its data."""
        first = self.tasks[0]
        return model_dataset_json(dict(first.dataset_json, numTraining=len(first.train_cases)), self.labels)

    def tasks_before(self, stage: Stage) -> list[str]:
        return tasks_before(self.schedule, stage)

    def tasks_trained_by(self, index: int) -> list[str]:
        return tasks_trained_by(self.schedule, index)
