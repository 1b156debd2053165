"""The stage loop: check inputs -> plan once -> stage 0 -> (train -> evaluate every task -> save) per stage -> report.

Everything a stage produces is written atomically, and a stage counts as done only when its evaluation file exists,
so a run killed at any point and started again with the same command continues from the last checkpoint. What one
stage does (its data, its training, its evaluation) lives in the `stages` package; this module runs the loop.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from .console import RunLog, progress_bar
from .errors import UserInputError
from .experiment import Experiment
from .evaluation.summary import write_summary_and_report
from .labels import LabelSpace
from .methods import Method, Stage, create_method
from .run_folder import RunFolder
from .tasks import (Task, check_case, check_sequence, content_fingerprint, load_task, resolve_task_folder,
                    scored_cases, task_record)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIFELONG_NNUNET_CACHE", Path.home() / ".cache" / "lifelong-nnunet"))


def prepare(exp: Experiment, run_dir: Path, log: RunLog, imported: Task | None = None) -> tuple[list[Task], LabelSpace]:
    """Every check on the spec, the data and the run folder. Writes no file (it resolves ``exp.tasks`` to folders
    and sets each task's test cases, in memory). ``imported``: the first task is the one a stock model was trained
    on (``--start-from``), known from the model folder, with no data here."""
    run = RunFolder(Path(run_dir))
    raw_root = exp.raw_root or os.environ.get("nnUNet_raw")
    given = exp.tasks[1:] if imported is not None else exp.tasks
    tasks = [load_task(resolve_task_folder(t, Path(raw_root) if raw_root else None)) for t in given]
    tasks = [imported, *tasks] if imported is not None else tasks
    exp.tasks = [str(t.folder) for t in tasks]  # the identity of a run names folders, however they were typed
    check_sequence(tasks, exp.scenario)
    if exp.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device 'cuda' was requested but no CUDA GPU is visible. Use device 'auto' or 'cpu'.")
    if run.spec.is_file():
        stored = run.read_experiment().identity()
        if stored != exp.identity():
            diff = sorted(k for k in set(stored) | set(exp.identity()) if stored.get(k) != exp.identity().get(k))
            raise UserInputError(
                f"{run.root} already holds a different experiment (differs in: {', '.join(diff)}). Use a new output "
                f"folder, or repeat the original command to resume that run.")
    elif run.root.exists() and any(run.root.iterdir()):
        raise UserInputError(f"{run.root} exists and is not empty, but holds no lifelong-nnunet run "
                             f"({run.spec.name} is missing). Choose an empty or new output folder.")
    stored_splits = run.read_splits() if run.splits.is_file() else {}
    total = sum(len(t.cases) for t in tasks)
    with progress_bar(log.quiet) as bar:
        job = bar.add_task("Checking data", total=total, info="")
        for t in tasks:
            if t is imported:
                continue
            for case in t.cases.values():
                check_case(t, case)
                bar.advance(job)
            held_out = scored_cases(t, exp.test_split.fraction, exp.test_split.min_cases, exp.seed, exp.score_on)
            t.test_cases = stored_splits.get(t.name) or held_out
    return tasks, LabelSpace.from_tasks(tasks, exp.scenario)


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, quiet: bool = False) -> dict:
    """Run (or resume) an experiment into ``run_dir`` and return its summary."""
    from .nnunet.planning import Workspace, describe_plans
    if exp.start_from is not None:
        from .lifelong import run_from_stock_model
        return run_from_stock_model(exp, run_dir, quiet)

    run = RunFolder(Path(run_dir).resolve())
    log = RunLog(None, quiet)
    tasks, labels = prepare(exp, run.root, log)
    check_data_unchanged(run, tasks)
    method = method_for(exp, labels)
    stages = method.schedule([t.name for t in tasks])
    if is_complete(run, stages, tasks):
        log(f"Run in {run.root} is already complete; nothing to do. (Use 'lifelong-nnunet report' to re-render.)")
        return run.read_summary()

    log.path = run.log
    write_run_records(run, exp, tasks, stages, labels)
    log(f"Run {run.root}: method '{method.name}', {len(tasks)} task(s), {len(stages)} stage(s), "
        f"configuration {exp.configuration}")

    planning = planning_for(run, exp)
    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), tasks,
                          exp.configuration, plan_with=exp.plan_with, planning=planning)
    workspace.ensure_planned(log)
    plans = workspace.plans(workspace.plan_task)
    log(f"Plans: {describe_plans(plans, exp.configuration)} ({planning.reason})")
    if run.plans.is_file() and run.read_plans() != plans:
        raise UserInputError(
            f"The data of {run.root} changed since the run started: nnU-Net now plans it differently than the "
            f"plans stored in {run.plans}. A run folder's plans are never overwritten, since its models were "
            f"trained with them. Use a new output folder for the changed data.")
    run.write_plans(plans)
    run.write_planning(planning.to_dict())
    run.write_dataset_json(model_dataset_json(workspace.dataset_json(workspace.plan_task), labels))
    return advance(exp, run, workspace, tasks, method, stages, labels, log, origin="run")


def planning_for(run: RunFolder, exp: Experiment):
    """The planner settings: the ones the run recorded when it planned (a resumed run plans as it did, on whichever
    machine it resumes), else the spec's ``planning`` resolved for this machine's device."""
    from .nnunet.env import resolve_device
    from .nnunet.planning import NNUNET_DEFAULTS, PlanningChoice, resolve_planning
    recorded = run.read_planning()
    if recorded is not None:
        return PlanningChoice.from_dict(recorded)
    if run.plans.is_file():  # planned before the choice was recorded: with nnU-Net's defaults
        return NNUNET_DEFAULTS
    return resolve_planning(exp.planning, resolve_device(exp.device).type)


def check_data_unchanged(run: RunFolder, tasks: list[Task]) -> None:
    """Refuse to resume a run whose trained tasks' files changed since their stage (rebuilt in place, say): the
    stages already trained learned other data, and a resumed run would mix the two. Compares the content
    fingerprint each stage recorded in history.json (names and bytes of every case file) before anything is
    written; a moved copy of the same files passes (`relocate_tasks`)."""
    recorded = {d["name"]: d["fingerprint"] for h in run.read_history() for d in h.get("datasets", [])
                if not str(d.get("fingerprint", "")).startswith("checkpoint")}  # imported stock models
    for t in tasks:
        if t.name in recorded and content_fingerprint(t) != recorded[t.name]:
            raise UserInputError(
                f"The files of {t.name} in {t.folder} changed since the run in {run.root} trained on them (their "
                f"content fingerprint is not the one recorded in {run.history}). Its stages learned the old data, so "
                f"the run cannot resume on the new. Use a new output folder for the changed data, or restore the "
                f"original files.")


def record_normalisation(run: RunFolder, workspace, tasks: list[Task], configuration: str, log: RunLog) -> None:
    """Store the normalisation each task of the workspace was preprocessed with (its own, as nnU-Net would choose it
    for the task alone), and say when the tasks' inputs differ. A task keeps the normalisation its stages learned:
    one recorded differently before (its data changed), or a task trained by a version that normalised every task
    with the first task's plans, is refused rather than silently evaluated with another mapping."""
    from .nnunet.normalisation import describe, same_normalisation, task_normalisation
    stored = run.read_normalisation()
    trained = {d["name"] for h in run.read_history() for d in h.get("datasets", [])}
    # what a task trained before normalisation.json existed was normalised with
    legacy = task_normalisation(run.read_plans(), configuration) if trained and run.plans.is_file() else None
    current = {}
    for t in workspace.tasks:
        now = task_normalisation(workspace.plans(t), configuration, t.dataset_json.get("channel_names"))
        before = stored.get(t.name) or (legacy if t.name in trained else None)
        if before is not None and not same_normalisation(before, now):
            raise UserInputError(
                f"{t.name} is now normalised differently ({describe(now)}) than when the run in {run.root} trained on "
                f"it ({describe(before)}): its data changed, or the run was started by a lifelong-nnunet that gave "
                f"every task the first task's normalisation. Use a new output folder (or finish the run with the "
                f"version that started it).")
        current[t.name] = now
    if current:
        run.write_normalisation({**stored, **current})
    everything = run.read_normalisation()
    channels = {t.name: t.dataset_json.get("channel_names") for t in tasks}
    if len({json.dumps(c, sort_keys=True) for c in channels.values()}) > 1:
        log("Warning: the tasks' input channels differ ("
            + "; ".join(f"{t.short_name}: {', '.join(map(str, (c or {}).values()))}" for t, c in
                        zip(tasks, channels.values()))
            + "). One architecture serves them all; each task is normalised as nnU-Net would for it alone: "
            + "; ".join(f"{t.short_name}: {describe(everything[t.name])}" for t in tasks if t.name in everything))


def method_for(exp: Experiment, labels: LabelSpace) -> Method:
    """The experiment's method with the run's label space bound, checked against its scenario."""
    method = create_method(exp.method, exp.method_params, labels=labels)
    if exp.scenario not in method.scenarios:
        raise UserInputError(f"method '{method.name}' is not defined for the {exp.scenario} scenario (it supports: "
                             f"{', '.join(method.scenarios)}); see docs/methods/{method.name}.md. Choose another "
                             f"method (lifelong-nnunet methods) or scenario.")
    return method


def write_run_records(run: RunFolder, exp: Experiment, tasks: list[Task], stages: list[Stage],
                      labels: LabelSpace) -> None:
    """The spec, splits, schedule, label space and task records: everything later stages (and `extend`, after the
    old training data are gone) need to know about the tasks, without their images."""
    run.write_experiment(exp)
    run.write_splits({t.name: t.test_cases for t in tasks})
    run.write_schedule(stages)
    run.write_labels(labels)
    run.write_task_records({t.name: task_record(t) for t in tasks})


def is_complete(run: RunFolder, stages: list[Stage], tasks: list[Task]) -> bool:
    """Every stage trained and every cell evaluated whose task still has its test data."""
    if not run.summary.is_file() or not all(run.model(s.index).is_file() for s in stages):
        return False
    return all(run.read_cell(i, t.name) is not None for i in [0, *(s.index for s in stages)] for t in tasks
               if t.evaluable)


def advance(exp: Experiment, run: RunFolder, workspace, tasks: list[Task], method: Method, stages: list[Stage],
            labels: LabelSpace, log: RunLog, origin: str) -> dict:
    """Bring a run up to date: train every stage without a model, evaluate every cell not yet scored (whose task
    still has its test data), then write results.csv, summary.json and the report. ``origin`` ("run" or "extend")
    goes into the history of each stage trained now."""
    from .nnunet.env import resolve_device
    from .stages import RunContext, StageTraining, evaluate_stage, evaluate_task_agnostic
    record_normalisation(run, workspace, tasks, exp.configuration, log)
    ctx = RunContext(exp, run, workspace, tasks, method, resolve_device(exp.device), log, labels, stages)
    training = StageTraining(ctx)
    training.ensure_initial_model()
    evaluate_stage(ctx, 0, "none")
    for stage in stages:
        if run.model(stage.index).is_file():
            scored = all(run.read_cell(stage.index, t.name) is not None for t in tasks if t.evaluable)
            log(f"Stage {stage.index} ({stage.label}) already "
                + ("done, skipping" if scored else "trained; evaluating its missing cells"))
            training.load_method_state(stage.index)
        else:
            training.train(stage, origin)
        evaluate_stage(ctx, stage.index, stage.label)
        evaluate_task_agnostic(ctx, stage.index, stage.label)  # methods with heads: the head inferred per case
    cells = [run.read_cell(i, t.name) for i in [0, *(s.index for s in stages)] for t in tasks]
    run.write_results(pd.concat([c for c in cells if c is not None]))
    summary = write_summary_and_report(run.root)
    run.write_format()  # every record is now in the current format (see run_folder)
    for warning in summary["warnings"]:  # a stage that learned nothing must not wait to be found in the report
        log(f"Warning: {warning}")
    log(f"Done. Report: {run.report}")
    return summary


def model_dataset_json(first_task_json: dict, labels: LabelSpace) -> dict:
    """The dataset.json of the run's model: the first task's, with every structure of the sequence in the class
    scenario (global IDs), so the final model's label map and its dataset.json list everything learned."""
    if not labels.is_class_incremental:
        return first_task_json
    return {**first_task_json, "labels": labels.dataset_labels(),
            "description": "lifelong-nnunet class-incremental model over: " + ", ".join(labels.tasks)}


def known_labels_json(dataset_json: dict, labels: LabelSpace, tasks_seen: list[str]) -> dict:
    """``dataset_json`` restricted to the structures a model trained on ``tasks_seen`` outputs (class scenario: its
    channels 0..n-1); nnU-Net's predictor sizes its buffers from this label list."""
    if not labels.is_class_incremental:
        return dataset_json
    n = labels.num_outputs(tasks_seen)
    return {**dataset_json, "labels": {k: v for k, v in dataset_json["labels"].items() if v < n}}


