"""Turn a run folder's stored results into summary.json, figures and report.md (also used by `report`).

Re-rendering never retrains: it reads results.csv, experiment.json and the stage models' info only.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import UserInputError
from ..experiment import Experiment
from ..names import short_task_name
from ..run_folder import RunFolder, is_one_model_per_task
from .continual import (
    continual_metrics,
    none_if_nan,
    reference_gaps,
    result_matrix,
    stage_labels,
    undefined_counts,
)
from . import run_facts as facts
from .metrics import METRICS, metric_spec
from .plots import plot_result_matrix, plot_task_curves
from .report import render_details_markdown, render_markdown
from .task_agnostic import task_agnostic_summary


def load_run(run_dir: Path) -> tuple[Experiment, list[str], pd.DataFrame]:
    """A finished run's experiment, its tasks in training order and its results."""
    run = RunFolder(Path(run_dir))
    run.require_finished()
    return run.read_experiment(), run.read_tasks(), run.read_results()


# The per-metric keys of a summary, as ``continual_metrics`` returns them; summary.json's top level holds them for
# the headline metric (the keys other code reads), ``by_metric`` for every metric the run scored.
CONTINUAL_KEYS = ("n_tasks", "final_per_task", "final_average", "plasticity", "bwt", "fwt", "forgetting",
                  "mean_forgetting")


def stored_metrics(results: pd.DataFrame) -> list[str]:
    """The metrics a run's results.csv holds, known ones in ``METRICS`` order."""
    present = set(results["metric"].dropna().astype(str))
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def summarize(run_dir: Path, metric: str | None = None) -> dict:
    """The run's result matrix and metrics. ``final_per_task`` is what the run delivers per task: the last
    model for chained methods, each task's own specialist for `separate`.

    The top-level keys describe ``metric`` (default: the spec's report_metric) exactly as before metrics other
    than Dice existed; ``by_metric`` holds the same keys for every metric in results.csv, plus its direction and
    how many scores were undefined (NaN) and left out."""
    run = RunFolder(Path(run_dir))
    exp, tasks, results = load_run(run.root)
    metrics = stored_metrics(results)
    metric = metric or exp.evaluation.report_metric
    if metric not in metrics:
        raise UserInputError(f"{run.results} holds no '{metric}' scores (it has: {', '.join(metrics)}). "
                             f"Pick one of those; a metric left out of evaluation.metrics needs a new run.")
    schedule = run.read_schedule()
    chained = all(len(s.train_tasks) == 1 for s in schedule) and all(s.init == "previous" for s in schedule[1:])
    evaluated = evaluated_cells(results, tasks)
    by_metric = {m: _metric_summary(results, tasks, m, schedule, chained, evaluated) for m in metrics}
    head = by_metric[metric]
    summary: dict = {"method": exp.method, "scenario": exp.scenario, "tasks": tasks, "metric": metric,
                     "scored_on": exp.score_on, "R": head["R"], "stage_labels": stage_labels(results),
                     "not_evaluated": [[int(i), tasks[j]] for i, j in zip(*(~evaluated).nonzero())]}
    summary.update({k: head[k] for k in CONTINUAL_KEYS})
    by_stage = {index: model["info"] for index, model in run.trained_models(schedule).items()}
    infos = list(by_stage.values())
    # optional info keys: stage 0 trained nothing, and peak GPU memory exists on CUDA only
    summary["train_seconds"] = sum(i.get("train_seconds", 0.0) for i in infos)
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [i[key] for i in infos if key in i]
        summary[key] = max(values) if values else None
    summary["notes"] = list(dict.fromkeys(n for i in infos for n in i.get("notes", [])))  # each once, in order
    summary["by_metric"] = by_metric
    summary["task_agnostic"] = task_agnostic_summary(run, tasks, metric, head["R"], len(head["R"]))
    summary["history"] = run.read_history()
    summary.update(run_description(run, exp, schedule, by_stage, results, tasks, metric))
    return summary


def run_description(run: RunFolder, exp: Experiment, schedule: list, infos: dict[int, dict],
                    results: pd.DataFrame, tasks: list[str], metric: str) -> dict:
    """The summary keys that say what the run was and cost (module `run_facts`): ``budget``, ``data``,
    ``resources``, ``per_label_final`` (the delivered model's ``metric`` per label), ``learned_nothing`` and its
    ``warnings``."""
    n_stages = int(results["stage"].max()) + 1 if len(results) else 0
    nothing = facts.learned_nothing(results, tasks, schedule)
    imported = facts.imported_stages(infos)
    imported_tasks = {t for i in imported for t in infos[i].get("trained_on", [])}
    return {"budget": facts.budget(run, exp, infos), "data": facts.data(run, exp, imported_tasks),
            "resources": facts.resources(run, schedule, imported),
            "per_label_final": facts.per_label_final(results, metric,
                                                     facts.delivered_stages(schedule, tasks, n_stages)),
            "learned_nothing": nothing, "warnings": facts.warnings(nothing)}


def evaluated_cells(results: pd.DataFrame, tasks: list[str]):
    """Which cells R[stage][task] were scored at all (a task whose test data were gone at a stage was not)."""
    n_stages = int(results["stage"].max()) + 1 if len(results) else 0
    counts = results.groupby(["stage", "eval_task"]).size().unstack("eval_task")
    return counts.reindex(index=range(n_stages), columns=list(tasks)).notna().to_numpy()


def _metric_summary(results: pd.DataFrame, tasks: list[str], metric: str, schedule: list, chained: bool,
                    evaluated) -> dict:
    """R and its continual metrics for one metric, oriented by its direction (see ``continual_metrics``); cells
    not evaluated are left out of the means and counted."""
    arr = result_matrix(results, tasks, metric).to_numpy(dtype=float)
    spec = metric_spec(metric)
    higher = spec.higher_is_better
    if chained and arr.shape == (len(tasks) + 1, len(tasks)):
        values = continual_metrics(arr, higher_is_better=higher, evaluated=evaluated)
    else:
        cells = [(i + 1, i) for i in range(len(tasks))] if is_one_model_per_task(schedule) else \
            [(arr.shape[0] - 1, j) for j in range(len(tasks))]
        final = [float(arr[i, j]) if evaluated[i, j] else None for i, j in cells]
        scored = [v for v in final if v is not None]
        values = {"n_tasks": len(tasks), "final_per_task": [None if v is None else none_if_nan(v) for v in final],
                  "final_average": none_if_nan(sum(scored) / len(scored)) if scored else None, "plasticity": None,
                  "bwt": None, "fwt": None, "forgetting": None, "mean_forgetting": None,
                  "n_not_evaluated": int((~evaluated).sum())}
    undefined = undefined_counts(results, tasks, metric).to_numpy()
    return {"R": arr.tolist(), "higher_is_better": higher, "unit": spec.unit, **values,
            "n_undefined": int(undefined.sum()), "undefined": undefined.tolist()}


def check_reference(run: RunFolder, ref: RunFolder, role: str) -> None:
    """A reference (`separate`, `joint`) is only a reference when it learned the same tasks in the same scenario and
    was scored on the same test cases; anything else would give a gap that means nothing. A UserInputError says
    which of the three differs."""
    check_comparable(run, ref, f"The {role} reference",
                     f"Give as --{role} a finished run on the same task folders (same test split: the same seed and "
                     f"split).")


def check_comparable(run: RunFolder, other: RunFolder, other_is: str, fix: str) -> None:
    """Refuse to set ``other`` against ``run`` unless both learned the same tasks (in any order) in the same
    scenario and were scored on the same test cases. ``other_is`` begins the message ("The joint reference"),
    ``fix`` ends it."""
    other.require_finished()
    mine, theirs = run.read_splits(), other.read_splits()
    if sorted(mine) != sorted(theirs):
        raise UserInputError(f"{other_is} {other.root} learned {', '.join(theirs)}, but the run {run.root} "
                             f"learned {', '.join(mine)}. {fix}")
    scenarios = run.read_experiment().scenario, other.read_experiment().scenario
    if scenarios[0] != scenarios[1]:
        raise UserInputError(f"{other_is} {other.root} is a {scenarios[1]}-scenario run, the run {run.root} "
                             f"a {scenarios[0]}-scenario one. {fix}")
    for task, cases in mine.items():
        if sorted(cases) != sorted(theirs[task]):
            raise UserInputError(f"{other_is} {other.root} tested {task} on other cases than the run "
                                 f"{run.root} ({other.splits} against {run.splits}). {fix}")


def write_summary_and_report(run_dir: Path, references: dict[str, Path] | None = None,
                             metric: str | None = None) -> dict:
    """Write summary.json, figures/*.png and report.md. ``references`` may name `separate` and `joint` runs;
    ``metric`` picks the headline metric (default: the spec's report_metric, else Dice)."""
    run = RunFolder(Path(run_dir))
    summary = summarize(run.root, metric)
    metric = summary["metric"]
    for role, ref in (references or {}).items():
        if ref:
            check_reference(run, RunFolder(Path(ref)), role)
    refs = {k: summarize(Path(v)) for k, v in (references or {}).items() if v}
    if refs:
        for m, entry in summary["by_metric"].items():
            entry["reference_gaps"] = _gaps(summary["tasks"], entry, refs, m)
        summary["reference_gaps"] = summary["by_metric"][metric]["reference_gaps"]
        summary["references"] = {k: str(Path(v).resolve()) for k, v in references.items() if v}
    _, tasks, results = load_run(run.root)
    R = result_matrix(results, tasks, metric)
    short = [short_task_name(t) for t in tasks]
    R_show = R.rename(columns=dict(zip(tasks, short)))
    labels = ["after " + "+".join(short_task_name(p) for p in lbl[6:].split("+")) if lbl.startswith("after ")
              else lbl for lbl in summary["stage_labels"]]
    spec = metric_spec(metric)
    name, higher = spec.display, spec.higher_is_better
    axis = f"mean foreground {name}" + ("" if spec.bounded else f" ({spec.unit})")
    axis += "" if higher else ", lower = better"
    plot_result_matrix(R_show, run.result_matrix_figure, f"{summary['method']}: mean {name} R[stage][task]",
                       row_labels=labels, value_label=axis, vmax=1.0 if spec.bounded else None,
                       higher_is_better=higher)
    trained = {short[tasks.index(t)]: i for i, lbl in enumerate(summary["stage_labels"]) for t in tasks
               if lbl == f"after {t}"}
    plot_task_curves(R_show, run.task_curves_figure, labels, trained_stage=trained,
                     title=f"{name} per task over the training sequence", ylabel=axis,
                     ylim=(0.0, 1.02) if spec.bounded else None)
    summary["title"] = f"lifelong-nnunet run: {summary['method']}"
    run.write_summary(summary)
    write_details(run, summary, results, labels)
    run.write_report(render_markdown(summary, R_show, labels, {
        "Result matrix": run.relative(run.result_matrix_figure),
        f"{name} per task over stages": run.relative(run.task_curves_figure)},
        details=run.relative(run.details_report)))
    return summary


def write_details(run: RunFolder, summary: dict, results: pd.DataFrame, row_labels: list[str]) -> None:
    """report_details.md: the headline metric per structure after every stage, and per test case for the model the
    run delivers (the tables a user otherwise digs out of results.csv)."""
    metric, tasks = summary["metric"], summary["tasks"]
    table = facts.per_label(results, metric)
    by_stage = table.pivot_table(index=["eval_task", "label"], columns="stage", values="value", sort=False,
                                 dropna=False)
    by_stage = by_stage.reindex(columns=range(len(row_labels)))
    by_stage.columns = row_labels
    by_stage = by_stage.reset_index().rename(columns={"eval_task": "task", "label": "structure"})
    delivered = facts.delivered_stages(run.read_schedule(), tasks, len(row_labels))
    by_case = facts.per_case(results, metric, delivered)
    run.write_details_report(render_details_markdown(summary["title"], metric_spec(metric).display, by_stage,
                                                     by_case))


def _gaps(tasks: list[str], entry: dict, refs: dict[str, dict], metric: str) -> dict:
    """``reference_gaps`` of one metric; a reference run that did not score ``metric`` gives None gaps."""
    separate = (refs.get("separate") or {}).get("by_metric", {}).get(metric)
    joint = (refs.get("joint") or {}).get("by_metric", {}).get(metric)
    return reference_gaps(dict(zip(tasks, entry["final_per_task"])),
                          dict(zip(refs["separate"]["tasks"], separate["final_per_task"])) if separate else None,
                          joint["final_average"] if joint else None, entry["higher_is_better"])
