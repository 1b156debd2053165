"""Describing a stage's images for task inference, from the stage's preprocessed training data.

Runs when a stage of a method with per-task parts (``Method.infers_task`` or ``describes_images``) has trained,
while its preprocessed training cases are still in the run's cache workspace. Each task of the stage gets a
`task_inference.StageDescription` fitted on the task's training cases (nnU-Net's training and validation cases, never
the test cases) with its threshold calibrated by leave-one-out over them. Only the parameters are written to the run
folder.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..console import progress_bar
from ..methods import Stage
from ..task_inference import StageDescription, fit_description, image_features
from .context import RunContext


def describe_task(task: str, folder: Path, train_cases: list[str], test_cases: list[str],
                  advance: Callable[[], None] = lambda: None) -> StageDescription:
    """One task's description from its preprocessed ``folder``, fitted and calibrated on ``train_cases``;
    ``test_cases`` are named only to refuse a split that shares one (a bug upstream)."""
    from ..nnunet.trainer import read_preprocessed_image
    shared = sorted(set(train_cases) & set(test_cases))
    if shared:
        raise ValueError(f"test cases {shared[:3]} of {task} are also given as training cases")

    def features(cases):
        for case in cases:
            yield image_features(read_preprocessed_image(folder, case))
            advance()
    return fit_description(task, list(features(train_cases)))


def describe_stage(ctx: RunContext, stage: Stage) -> None:
    """Write the descriptions of ``stage``'s tasks into its folder (`RunFolder.task_description`)."""
    started, descriptions = time.time(), {}
    tasks = [ctx.by_name[name] for name in stage.train_tasks]
    with progress_bar(ctx.log.quiet) as bar:
        job = bar.add_task(f"Stage {stage.index} describing its images", info="",
                           total=sum(len(t.train_cases) for t in tasks))
        for t in tasks:
            descriptions[t.name] = describe_task(t.name, ctx.workspace.preprocessed_folder(t), list(t.train_cases),
                                                 list(t.test_cases), lambda: bar.advance(job))
    ctx.run.write_task_description(stage.index, descriptions)
    ctx.log(f"Stage {stage.index}: images described for task inference in {time.time() - started:.1f} s")
