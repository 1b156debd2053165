"""What one stage of a run does, split by concern; the run loop that calls them is `runner.run_experiment`.

- `context`: what every stage of a run shares (the spec, the run folder, the workspace, the method, the schedule);
- `sources`: the stage's training and validation data (its own tasks plus the method's replay buffer);
- `training`: the stage-0 model, the stage's trainer with its `StageState`, training and saving the stage's model;
- `evaluation`: predicting every task's test cases with a stage's model and scoring them;
- `description`: what a stage's images look like, for task inference (methods with per-task parts);
- `task_agnostic`: the same cells scored with the head task inference chooses instead of the oracle's.
"""
from .context import RunContext
from .evaluation import evaluate_stage
from .sources import StageSources
from .task_agnostic import evaluate_task_agnostic
from .training import StageTraining

__all__ = ["RunContext", "StageSources", "StageTraining", "evaluate_stage", "evaluate_task_agnostic"]
