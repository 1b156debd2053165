"""What a report tells about a run beyond its result matrix: what it cost, what data it saw, which cells the run
delivers, what it scored per label and per case, and whether a stage learned anything at all.

Users who ran `run` on real data could not tell from the report what budget and device a run had, how many cases
each task had, or that only 3 of a class run's structures scored anything (that was in results.csv only). These
functions read the run folder's records and results; `summary.summarize` stores their output in summary.json and
`report` renders it. Numbers that were never recorded (runs written before resources.json existed) are None, and
the report says "not recorded".
"""
from __future__ import annotations

import pandas as pd

from ..experiment import Experiment
from ..methods import Stage
from ..run_folder import RunFolder, is_one_model_per_task
from ..tasks import task_from_record, validation_split

# The metric the "learned nothing" check reads: overlap with the reference, where the untrained model's chance
# overlap is the floor a trained stage must beat.
LEARNED_NOTHING_METRIC = "dice"
# Means of the same scores summed in another order differ by rounding (1e-16); a stage that beats the untrained
# model by less than this learned nothing either.
DICE_TIE = 1e-9


def imported_stages(infos: dict[int, dict]) -> set[int]:
    """Stages whose model was imported from a stock nnU-Net model (`--start-from`): trained elsewhere, not here."""
    return {index for index, info in infos.items() if info.get("imported_from")}


def resources(run: RunFolder, schedule: list[Stage], imported: set[int] = frozenset()) -> dict:
    """Wall time and peak memory per stage (stage 0 included: it is evaluated), summed over every recorded session.

    Per stage: ``train_seconds`` (None for stage 0, which trains nothing, and where not recorded),
    ``evaluate_seconds``, ``sessions``, ``peak_rss_mb``, ``peak_gpu_mb`` (CUDA only), ``devices``; ``imported``
    stages were trained elsewhere, so their training is neither counted nor missing. Totals:
    ``wall_seconds`` = recorded training + evaluation time, and ``not_recorded``, the parts of the run that have no
    record (their time is not in the total), so a partial total is never shown as the whole."""
    stages, missing = [], []
    for index in [0, *(s.index for s in schedule)]:
        sessions = run.read_sessions(index) or []
        entry = {"stage": index, "sessions": len(sessions), "imported": index in imported}
        for phase, key in (("train", "train_seconds"), ("evaluate", "evaluate_seconds")):
            times = [s["seconds"] for s in sessions if s["phase"] == phase]
            entry[key] = sum(times) if times else None
            if not times and not (phase == "train" and (index == 0 or index in imported)):
                missing.append(f"stage {index} {'training' if phase == 'train' else 'evaluation'}")
        entry["peak_rss_mb"] = max((s["peak_rss_mb"] for s in sessions), default=None)
        entry["peak_gpu_mb"] = max((s["peak_gpu_mb"] for s in sessions if s.get("peak_gpu_mb") is not None),
                                   default=None)
        entry["devices"] = sorted({s["device"] for s in sessions})
        stages.append(entry)
    recorded = [v for e in stages for v in (e["train_seconds"], e["evaluate_seconds"]) if v is not None]
    peaks = [e["peak_rss_mb"] for e in stages if e["peak_rss_mb"] is not None]
    gpu = [e["peak_gpu_mb"] for e in stages if e["peak_gpu_mb"] is not None]
    return {"stages": stages, "wall_seconds": sum(recorded) if recorded else None, "not_recorded": missing,
            "peak_rss_mb": max(peaks) if peaks else None, "peak_gpu_mb": max(gpu) if gpu else None,
            "devices": sorted({d for e in stages for d in e["devices"]})}


def budget(run: RunFolder, exp: Experiment, infos: dict[int, dict]) -> dict:
    """What each trained stage was given, as its model's info recorded it (the budget actually used), with the
    configuration, the requested device and the batch size: the spec's, else the one nnU-Net planned
    (``batch_size_from`` says which)."""
    from ..nnunet.planning import describe_plans
    plans = run.read_plans() if run.plans.is_file() else {}
    config = plans.get("configurations", {}).get(exp.configuration, {})
    batch, source = exp.training.batch_size, "spec"
    if batch is None:
        batch, source = config.get("batch_size"), "nnU-Net plans" if "batch_size" in config else None
    planned = describe_plans(plans, exp.configuration) if {"patch_size", "batch_size", "spacing"} <= set(config) \
        else None
    return {"configuration": exp.configuration, "batch_size": batch, "batch_size_from": source,
            "requested_device": exp.device, "plans": planned, "planning": (run.read_planning() or {}).get("reason"),
            "stages": [{"stage": index, "epochs": info.get("epochs"),
                        "iterations_per_epoch": info.get("iterations_per_epoch"),
                        "augmentation_workers": info.get("augmentation_workers"),
                        "imported": bool(info.get("imported_from"))}
                       for index, info in sorted(infos.items())]}


def data(run: RunFolder, exp: Experiment, imported_tasks: set[str] = frozenset()) -> dict[str, dict]:
    """Per task in training order: training, validation and test case counts and the test case IDs. The training
    and validation counts come from tasks.json (the cases each stage drew from) with the run's validation split;
    a folder without tasks.json (format 1) has the test split only, and None for the other counts, as has a task
    whose model was imported (``imported_tasks``: trained elsewhere, on data this run never saw)."""
    from ..nnunet.normalisation import describe
    records = run.read_task_records() or {}
    norms = run.read_normalisation()
    out = {}
    for task, test_cases in run.read_splits().items():
        entry = {"n_train": None, "n_validation": None, "n_test": len(test_cases), "test_cases": list(test_cases),
                 "imported": task in imported_tasks,
                 "normalisation": describe(norms[task]) if task in norms else None}
        if task in records and task not in imported_tasks:
            train, val = validation_split(task_from_record(records[task]), exp.validation_fraction, exp.seed)
            entry.update(n_train=len(train), n_validation=len(val))
        out[task] = entry
    return out


def delivered_stages(schedule: list[Stage], tasks: list[str], n_stages: int) -> dict[str, int]:
    """The stage whose model the run delivers for each task: each task's own specialist for one-model-per-task
    plans (`separate`), else the last stage (the same cells as ``final_per_task``)."""
    if is_one_model_per_task(schedule):
        return {t: next(s.index for s in schedule if t in s.train_tasks) for t in tasks}
    return {t: n_stages - 1 for t in tasks}


def per_label(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean ``metric`` of each (stage, task, label) over the task's test cases (NaN scores left out), in the
    results' order: columns stage, eval_task, label, value."""
    rows = results[results["metric"] == metric]
    table = rows.groupby(["stage", "eval_task", "label"], sort=False)["value"].mean().reset_index()
    return table.sort_values("stage", kind="stable").reset_index(drop=True)


def per_label_final(results: pd.DataFrame, metric: str, delivered: dict[str, int]) -> dict[str, dict[str, float]]:
    """Task -> label -> mean ``metric`` of the delivered model (None where every case was undefined)."""
    table = per_label(results, metric)
    out: dict[str, dict[str, float | None]] = {}
    for task, stage in delivered.items():
        cell = table[(table["stage"] == stage) & (table["eval_task"] == task)]
        out[task] = {str(r.label): None if pd.isna(r.value) else float(r.value) for r in cell.itertuples()}
    return out


def per_case(results: pd.DataFrame, metric: str, delivered: dict[str, int]) -> pd.DataFrame:
    """The delivered model's ``metric`` for every test case and label: rows (task, case), one column per label."""
    parts = []
    for task, stage in delivered.items():
        rows = results[(results["metric"] == metric) & (results["stage"] == stage) & (results["eval_task"] == task)]
        if len(rows):
            wide = rows.pivot_table(index="case", columns="label", values="value", sort=False, dropna=False)
            parts.append(wide.assign(task=task).reset_index())
    if not parts:
        return pd.DataFrame(columns=["task", "case"])
    frame = pd.concat(parts, ignore_index=True)
    labels = [c for c in frame.columns if c not in ("task", "case")]
    return frame[["task", "case", *labels]]


def learned_nothing(results: pd.DataFrame, tasks: list[str], schedule: list[Stage]) -> dict:
    """Stages that learned nothing, and structures never segmented.

    ``stages``: a stage whose trained task's Dice right after training is at or below the untrained model's
    (R[0][task], stage 0): training did not beat chance overlap. ``labels``: a structure whose Dice is 0 in every
    test case at every trained stage (the model never found it). Cells not evaluated are skipped. Empty lists when
    the run scored no Dice."""
    dice = results[results["metric"] == LEARNED_NOTHING_METRIC]
    if not len(dice):
        return {"stages": [], "labels": []}
    cell = dice.groupby(["stage", "eval_task", "case"])["value"].mean().groupby(level=["stage", "eval_task"]).mean()
    stages = []
    for s in schedule:
        for task in s.train_tasks:
            if (s.index, task) in cell.index and (0, task) in cell.index:
                after, before = float(cell[(s.index, task)]), float(cell[(0, task)])
                if after <= before + DICE_TIE:
                    stages.append({"stage": s.index, "task": task, "dice": after, "untrained_dice": before})
    trained = dice[dice["stage"] > 0]
    best = trained.groupby(["eval_task", "label"], sort=False)["value"].max()
    labels = [{"task": str(t), "label": str(lbl)} for (t, lbl), v in best.items() if v == 0.0 and t in tasks]
    return {"stages": stages, "labels": labels}


def warnings(nothing: dict) -> list[str]:
    """The report's and summary.json's one-line warnings for ``learned_nothing``."""
    out = [f"Stage {e['stage']} learned nothing on {e['task']}: its Dice after training, {e['dice']:.3f}, is at or "
           f"below the untrained model's {e['untrained_dice']:.3f} (stage 0). Give it more epochs or iterations, "
           f"or check its data and learning rate." for e in nothing["stages"]]
    by_task: dict[str, list[str]] = {}
    for e in nothing["labels"]:
        by_task.setdefault(e["task"], []).append(e["label"])
    out += [f"{task}: {len(labels)} structure(s) scored Dice 0 in every test case after every stage: "
            f"{', '.join(labels)}. The model never segmented them." for task, labels in by_task.items()]
    return out
