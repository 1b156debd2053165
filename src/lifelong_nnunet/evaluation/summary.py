"""Turn a run folder's stored results into summary.json, figures and report.md (also used by `report`).

Re-rendering never retrains: it reads results.csv, experiment.json and the stage models' info only.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from ..errors import UserInputError
from ..io_utils import read_json, write_json, write_text
from ..runner import is_one_model_per_task, load_schedule
from .continual import (
    continual_metrics,
    reference_gaps,
    result_matrix,
    stage_labels,
    undefined_counts,
)
from .metrics import DISPLAY_NAMES, HIGHER_IS_BETTER, METRICS, UNITS
from .plots import plot_result_matrix, plot_task_curves
from .report import render_markdown


def load_run(run_dir: Path) -> tuple[dict, list[str], pd.DataFrame]:
    run_dir = Path(run_dir)
    for name in ("experiment.json", "splits.json", "results.csv"):
        if not (run_dir / name).is_file():
            raise UserInputError(f"{run_dir / name} is missing: {run_dir} is not a finished lifelong-nnunet run. "
                                 f"Run 'lifelong-nnunet run' into it first (a killed run resumes with the same "
                                 f"command).")
    exp = read_json(run_dir / "experiment.json")
    tasks = list(read_json(run_dir / "splits.json"))
    return exp, tasks, pd.read_csv(run_dir / "results.csv")


# The per-metric keys of a summary, as ``continual_metrics`` returns them; summary.json's top level holds them for
# the headline metric (the keys other code reads), ``by_metric`` for every metric the run scored.
CONTINUAL_KEYS = ("n_tasks", "final_per_task", "final_average", "plasticity", "bwt", "fwt", "forgetting",
                  "mean_forgetting")


def stored_metrics(results: pd.DataFrame) -> list[str]:
    """The metrics a run's results.csv holds, known ones in ``METRICS`` order."""
    present = set(results["metric"].dropna().astype(str))
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def report_metric_of(exp: dict) -> str:
    """The spec's headline metric; "dice" for runs written before evaluation.report_metric existed (or left at
    its default, which the run identity omits)."""
    return (exp.get("evaluation") or {}).get("report_metric", "dice")


def summarize(run_dir: Path, metric: str | None = None) -> dict:
    """The run's result matrix and metrics. ``final_per_task`` is what the run delivers per task: the last
    model for chained methods, each task's own specialist for `separate`.

    The top-level keys describe ``metric`` (default: the spec's report_metric) exactly as before metrics other
    than Dice existed; ``by_metric`` holds the same keys for every metric in results.csv, plus its direction and
    how many scores were undefined (NaN) and left out."""
    run_dir = Path(run_dir)
    exp, tasks, results = load_run(run_dir)
    metrics = stored_metrics(results)
    metric = metric or report_metric_of(exp)
    if metric not in metrics:
        raise UserInputError(f"{run_dir / 'results.csv'} holds no '{metric}' scores (it has: {', '.join(metrics)}). "
                             f"Pick one of those; a metric left out of evaluation.metrics needs a new run.")
    schedule = load_schedule(run_dir)
    chained = all(len(s.train_tasks) == 1 for s in schedule) and all(s.init == "previous" for s in schedule[1:])
    evaluated = evaluated_cells(results, tasks)
    by_metric = {m: _metric_summary(results, tasks, m, schedule, chained, evaluated) for m in metrics}
    head = by_metric[metric]
    summary: dict = {"method": exp["method"], "scenario": exp["scenario"], "tasks": tasks, "metric": metric,
                     "R": head["R"], "stage_labels": stage_labels(results),
                     "not_evaluated": [[int(i), tasks[j]] for i, j in zip(*(~evaluated).nonzero())]}
    summary.update({k: head[k] for k in CONTINUAL_KEYS})
    infos = [torch.load(p, map_location="cpu", weights_only=True)["info"]
             for p in (run_dir / "stages" / f"stage_{s.index}" / "model.pt" for s in schedule) if p.is_file()]
    summary["train_seconds"] = sum(i.get("train_seconds", 0.0) for i in infos)
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [i[key] for i in infos if key in i]
        summary[key] = max(values) if values else None
    summary["by_metric"] = by_metric
    history = run_dir / "history.json"
    summary["history"] = read_json(history) if history.is_file() else []
    return summary


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
    higher = HIGHER_IS_BETTER.get(metric, True)
    if chained and arr.shape == (len(tasks) + 1, len(tasks)):
        values = continual_metrics(arr, higher_is_better=higher, evaluated=evaluated)
    else:
        cells = [(i + 1, i) for i in range(len(tasks))] if is_one_model_per_task(schedule) else \
            [(arr.shape[0] - 1, j) for j in range(len(tasks))]
        final = [float(arr[i, j]) if evaluated[i, j] else None for i, j in cells]
        scored = [v for v in final if v is not None]
        values = {"n_tasks": len(tasks), "final_per_task": [None if v is None else _num(v) for v in final],
                  "final_average": _num(sum(scored) / len(scored)) if scored else None, "plasticity": None,
                  "bwt": None, "fwt": None, "forgetting": None, "mean_forgetting": None,
                  "n_not_evaluated": int((~evaluated).sum())}
    undefined = undefined_counts(results, tasks, metric).to_numpy()
    return {"R": arr.tolist(), "higher_is_better": higher, "unit": UNITS.get(metric, ""), **values,
            "n_undefined": int(undefined.sum()), "undefined": undefined.tolist()}


def write_summary_and_report(run_dir: Path, references: dict[str, Path] | None = None,
                             metric: str | None = None) -> dict:
    """Write summary.json, figures/*.png and report.md. ``references`` may name `separate` and `joint` runs;
    ``metric`` picks the headline metric (default: the spec's report_metric, else Dice)."""
    run_dir = Path(run_dir)
    summary = summarize(run_dir, metric)
    metric = summary["metric"]
    refs = {k: summarize(Path(v)) for k, v in (references or {}).items() if v}
    if refs:
        for m, entry in summary["by_metric"].items():
            entry["reference_gaps"] = _gaps(summary["tasks"], entry, refs, m)
        summary["reference_gaps"] = summary["by_metric"][metric]["reference_gaps"]
        summary["references"] = {k: str(Path(v).resolve()) for k, v in references.items() if v}
    _, tasks, results = load_run(run_dir)
    R = result_matrix(results, tasks, metric)
    short = [_short(t) for t in tasks]
    R_show = R.rename(columns=dict(zip(tasks, short)))
    labels = ["after " + "+".join(_short(p) for p in lbl[6:].split("+")) if lbl.startswith("after ") else lbl
              for lbl in summary["stage_labels"]]
    name, higher = DISPLAY_NAMES.get(metric, metric), HIGHER_IS_BETTER.get(metric, True)
    bounded = not UNITS.get(metric)  # Dice, IoU, NSD lie in 0..1: a fixed scale compares runs by eye
    axis = f"mean foreground {name}" + ("" if bounded else f" ({UNITS[metric]})")
    axis += "" if higher else ", lower = better"
    figures = run_dir / "figures"
    plot_result_matrix(R_show, figures / "result_matrix.png", f"{summary['method']}: mean {name} R[stage][task]",
                       row_labels=labels, value_label=axis, vmax=1.0 if bounded else None, higher_is_better=higher)
    trained = {short[tasks.index(t)]: i for i, lbl in enumerate(summary["stage_labels"]) for t in tasks
               if lbl == f"after {t}"}
    plot_task_curves(R_show, figures / "task_curves.png", labels, trained_stage=trained,
                     title=f"{name} per task over the training sequence", ylabel=axis,
                     ylim=(0.0, 1.02) if bounded else None)
    summary["title"] = f"lifelong-nnunet run: {summary['method']}"
    write_json(run_dir / "summary.json", summary)
    md = render_markdown(summary, R_show, labels, {"Result matrix": "figures/result_matrix.png",
                                                   f"{name} per task over stages": "figures/task_curves.png"})
    write_text(run_dir / "report.md", md)
    return summary


def _gaps(tasks: list[str], entry: dict, refs: dict[str, dict], metric: str) -> dict:
    """``reference_gaps`` of one metric; a reference run that did not score ``metric`` gives None gaps."""
    separate = (refs.get("separate") or {}).get("by_metric", {}).get(metric)
    joint = (refs.get("joint") or {}).get("by_metric", {}).get(metric)
    return reference_gaps(dict(zip(tasks, entry["final_per_task"])),
                          dict(zip(refs["separate"]["tasks"], separate["final_per_task"])) if separate else None,
                          joint["final_average"] if joint else None, entry["higher_is_better"])


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _short(task: str) -> str:
    """Dataset011_HippoSiteA -> HippoSiteA, for plot labels."""
    return task.split("_", 1)[-1] if task.startswith("Dataset") else task
