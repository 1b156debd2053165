"""Turn a run folder's stored results into summary.json, figures and report.md (also used by `report`).

Re-rendering never retrains: it reads results.csv, experiment.json and the stage models' info only.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..errors import UserInputError
from ..io_utils import read_json, write_json, write_text
from ..runner import is_one_model_per_task, load_schedule
from .continual import continual_metrics, reference_gaps, result_matrix, stage_labels
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


def summarize(run_dir: Path, metric: str = "dice") -> dict:
    """The run's result matrix and metrics. ``final_per_task`` is what the run delivers per task: the last
    model for chained methods, each task's own specialist for `separate`."""
    exp, tasks, results = load_run(run_dir)
    R = result_matrix(results, tasks, metric)
    schedule = load_schedule(run_dir)
    chained = all(len(s.train_tasks) == 1 for s in schedule) and all(s.init == "previous" for s in schedule[1:])
    arr = R.to_numpy(dtype=float)
    summary: dict = {"method": exp["method"], "scenario": exp["scenario"], "tasks": tasks, "metric": metric,
                     "R": arr.tolist(), "stage_labels": stage_labels(results)}
    if chained and arr.shape == (len(tasks) + 1, len(tasks)):
        summary.update(continual_metrics(arr))
    else:
        if is_one_model_per_task(schedule):
            final = [float(arr[i + 1, i]) for i in range(len(tasks))]
        else:
            final = [float(v) for v in arr[-1]]
        summary.update({"n_tasks": len(tasks), "final_per_task": final,
                        "final_average": float(sum(final) / len(final)), "plasticity": None, "bwt": None,
                        "fwt": None, "forgetting": None, "mean_forgetting": None})
    infos = [torch.load(p, map_location="cpu", weights_only=True)["info"]
             for p in (run_dir / "stages" / f"stage_{s.index}" / "model.pt" for s in schedule) if p.is_file()]
    summary["train_seconds"] = sum(i.get("train_seconds", 0.0) for i in infos)
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [i[key] for i in infos if key in i]
        summary[key] = max(values) if values else None
    return summary


def write_summary_and_report(run_dir: Path, references: dict[str, Path] | None = None) -> dict:
    """Write summary.json, figures/*.png and report.md. ``references`` may name `separate` and `joint` runs."""
    run_dir = Path(run_dir)
    summary = summarize(run_dir)
    refs = {k: summarize(Path(v)) for k, v in (references or {}).items() if v}
    if refs:
        separate = dict(zip(refs["separate"]["tasks"], refs["separate"]["final_per_task"])) \
            if "separate" in refs else None
        joint = refs["joint"]["final_average"] if "joint" in refs else None
        summary["reference_gaps"] = reference_gaps(dict(zip(summary["tasks"], summary["final_per_task"])),
                                                   separate, joint)
        summary["references"] = {k: str(Path(v).resolve()) for k, v in references.items() if v}
    exp, tasks, results = load_run(run_dir)
    R = result_matrix(results, tasks)
    short = [_short(t) for t in tasks]
    R_show = R.rename(columns=dict(zip(tasks, short)))
    labels = ["after " + "+".join(_short(p) for p in lbl[6:].split("+")) if lbl.startswith("after ") else lbl
              for lbl in summary["stage_labels"]]
    figures = run_dir / "figures"
    plot_result_matrix(R_show, figures / "result_matrix.png", f"{summary['method']}: mean Dice R[stage][task]",
                       row_labels=labels)
    trained = {short[tasks.index(t)]: i for i, lbl in enumerate(summary["stage_labels"]) for t in tasks
               if lbl == f"after {t}"}
    plot_task_curves(R_show, figures / "task_curves.png", labels, trained_stage=trained)
    summary["title"] = f"lifelong-nnunet run: {summary['method']}"
    write_json(run_dir / "summary.json", summary)
    md = render_markdown(summary, R_show, labels, {"Result matrix": "figures/result_matrix.png",
                                                   "Dice per task over stages": "figures/task_curves.png"})
    write_text(run_dir / "report.md", md)
    return summary


def _short(task: str) -> str:
    """Dataset011_HippoSiteA -> HippoSiteA, for plot labels."""
    return task.split("_", 1)[-1] if task.startswith("Dataset") else task
