"""Describing a stage's images for task inference, from the stage's preprocessed training data.

Runs when a stage of a method with per-task parts (``Method.infers_task``) has trained, while its preprocessed
training cases are still in the run's cache workspace. Each task of the stage gets a `task_inference.StageDescription`
fitted on nnU-Net's training cases of the task and calibrated on its validation cases (`StageSources.split_train_val`:
part of the task's training cases, never its test cases). Only the parameters are written to the run folder.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..console import progress_bar
from ..methods import Stage
from ..task_inference import StageDescription, fit_description, image_features
from .context import RunContext
from .sources import StageSources


def describe_task(task: str, folder: Path, fit_cases: list[str], calibration_cases: list[str],
                  advance: Callable[[], None] = lambda: None) -> StageDescription:
    """One task's description from its preprocessed ``folder``: fitted on ``fit_cases``, threshold calibrated on
    ``calibration_cases`` (validation cases, disjoint from the fit; a shared case is a bug and refused)."""
    from ..nnunet.trainer import read_preprocessed_image
    shared = sorted(set(fit_cases) & set(calibration_cases))
    if shared:
        raise ValueError(f"calibration cases {shared[:3]} are also fit cases of {task}")

    def features(cases):
        for case in cases:
            yield image_features(read_preprocessed_image(folder, case))
            advance()
    return fit_description(task, list(features(fit_cases)), list(features(calibration_cases)))


def describe_stage(ctx: RunContext, stage: Stage, sources: StageSources | None = None) -> None:
    """Write the descriptions of ``stage``'s tasks into its folder (`RunFolder.task_description`)."""
    sources = sources or StageSources.of(ctx)
    started, descriptions = time.time(), {}
    splits = {name: sources.split_train_val(ctx.by_name[name]) for name in stage.train_tasks}
    with progress_bar(ctx.log.quiet) as bar:
        job = bar.add_task(f"Stage {stage.index} describing its images", info="",
                           total=sum(len(a) + len(b) for a, b in splits.values()))
        for name, (fit, calibration) in splits.items():
            descriptions[name] = describe_task(name, ctx.workspace.preprocessed_folder(ctx.by_name[name]), fit,
                                               calibration, lambda: bar.advance(job))
    ctx.run.write_task_description(stage.index, descriptions)
    ctx.log(f"Stage {stage.index}: images described for task inference in {time.time() - started:.1f} s")
