"""A sweep's runs as the comparison sees them: sweep.json's entries, each with what its run folder holds.

Everything is read from stored files (each run's summary.json, results.csv, schedule.json and the stage models'
``info``), so the report re-renders at any time, also while the sweep is still running: a run without summary.json is
missing, and a damaged one is flagged unreadable with its reason; neither stops the others from being reported.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import UserInputError
from ...run_folder import RunFolder, RunFolderError, SweepFolder, is_one_model_per_task, stored_parameter_count
from ..continual import nan_if_none, result_matrix
from ..metrics import metric_spec

RUN_COLUMNS = ["method", "ordering", "seed", "order", "path", "status", "final_average", "bwt", "fwt", "forgetting",
               "plasticity", "gap_to_joint", "train_seconds", "peak_rss_mb", "model_parameters", "higher_is_better"]
JOINT = "joint"
# What reading a damaged or half-copied run folder raises: an I/O error (a missing file too), a record that does not
# parse or comes from a newer version (RunFolderError), a key that a complete record has (KeyError).
DAMAGED = (OSError, RunFolderError, KeyError)


@dataclass
class SweepRun:
    """One entry of sweep.json, with what its folder holds. ``R`` has the run's own task order as columns."""
    method: str
    ordering: str
    seed: int
    order: list[str]
    path: Path
    status: str = "missing"
    reason: str = ""
    tasks: list[str] = field(default_factory=list)
    R: np.ndarray | None = None
    final_per_task: list[float] | None = None  # what the run delivers per task, in its own order
    values: dict = field(default_factory=dict)


def load_sweep(sweep_dir: str | os.PathLike) -> dict:
    """sweep.json (spec, runs, commands, versions), or a UserInputError naming the folder."""
    return SweepFolder(Path(sweep_dir)).read_sweep()


def collect(sweep_dir: str | os.PathLike, metric: str = "dice") -> pd.DataFrame:
    """One row per run listed in sweep.json (finished or not): the continual metrics of ``metric``, gap to the
    joint run of the same ordering and seed, training time and size of the delivered model.

    ``status`` is "ok", "missing" (not finished: no summary.json) or "unreadable" (reason in the report);
    metric columns are NaN unless "ok". ``forgetting`` is the mean forgetting over tasks.
    """
    return runs_frame(load_runs(Path(sweep_dir), load_sweep(sweep_dir)["runs"], metric))


def load_runs(sweep_dir: Path, entries: list[dict], metric: str) -> list[SweepRun]:
    runs = []
    for e in entries:
        run = SweepRun(str(e.get("method", "?")), str(e.get("ordering", "?")), int(e.get("seed", 0)),
                       [str(t) for t in e.get("order") or []], sweep_dir / str(e.get("path", "")))
        folder = RunFolder(run.path)
        if not run.path.is_dir():
            run.reason = "run folder not created yet"
        elif not folder.summary.is_file():
            run.reason = f"not finished (no {folder.summary.name})"
        else:
            try:
                _read_finished(run, metric)
                run.status = "ok"
            except DAMAGED as error:  # a damaged run must not hide the others; the report names it
                run.status, run.reason = "unreadable", f"{type(error).__name__}: {error}"
        runs.append(run)
    _add_gap_to_joint(runs)
    finished = [r for r in runs if r.status == "ok"]
    if finished and not any(r.values.get("metric_found") for r in finished):
        raise UserInputError(f"metric '{metric}' is not stored in any finished run of {sweep_dir} (the 'metric' "
                             f"column of their results). Use one that is, e.g. 'dice' or 'iou'.")
    return runs


def _read_finished(run: SweepRun, metric: str) -> None:
    """Metrics from summary.json's ``by_metric`` entry, R re-computed from results.csv only when the summary lacks
    it, train time / peak memory / size from the stage models' stored info."""
    folder = RunFolder(run.path)
    summary = folder.read_summary()
    run.tasks = [str(t) for t in summary["tasks"]]
    source = summary["by_metric"].get(metric)
    found = source is not None
    R = source["R"] if source else None
    if R is None:
        results = folder.read_results()
        stored = bool((results["metric"] == metric).any())
        found = found or stored
        if stored:
            R = result_matrix(results, run.tasks, metric).to_numpy(dtype=float)
            if source is None:
                # the run's own definitions, for a metric its summary lacks
                from ..summary import summarize
                source = summarize(run.path, metric)["by_metric"][metric]
    if source is None:  # the metric is nowhere in this run: it counts as finished, its values are undefined
        source = {**dict.fromkeys(("final_per_task", "final_average", "bwt", "fwt", "plasticity", "mean_forgetting")),
                  "higher_is_better": metric_spec(metric).higher_is_better}
    run.R = None if R is None else np.asarray(R, dtype=float)
    final = source["final_per_task"]
    run.final_per_task = None if final is None else [nan_if_none(v) for v in final]
    run.values = {
        "metric_found": found,
        **{key: nan_if_none(source[key]) for key in ("final_average", "bwt", "fwt", "plasticity")},
        "forgetting": nan_if_none(source["mean_forgetting"]),
        "higher_is_better": bool(source["higher_is_better"]),
        **_stage_model_stats(folder),
    }


def _stage_model_stats(folder: RunFolder) -> dict:
    """Sum of the stages' train_seconds, max peak RSS, and the parameters of the delivered model: the last
    stage's network, or the sum of the per-task specialists for a one-model-per-task plan. Parameters count every
    floating-point tensor stored in network_weights (nnU-Net's InstanceNorm keeps no running statistics, so these
    are the learnable weights)."""
    schedule = folder.read_schedule()
    models = folder.trained_models(schedule, mmap=True)
    infos = [m["info"] for m in models.values()]  # optional keys: stage 0 trained nothing
    seconds = sum(float(i.get("train_seconds", 0.0)) for i in infos)
    peaks = [float(i["peak_rss_mb"]) for i in infos if "peak_rss_mb" in i]
    sizes = {index: stored_parameter_count(m["network_weights"]) for index, m in models.items()}
    if is_one_model_per_task(schedule):
        complete = all(s.index in sizes for s in schedule)
        size = float(sum(sizes.values())) if complete else math.nan
    else:
        last = max((s.index for s in schedule), default=None)
        size = float(sizes[last]) if last in sizes else math.nan
    return {"train_seconds": seconds, "peak_rss_mb": max(peaks) if peaks else math.nan, "model_parameters": size}


def _add_gap_to_joint(runs: list[SweepRun]) -> None:
    """final_average minus the joint run's of the same ordering and seed (the other way round for a
    lower-is-better metric, so negative always means worse than joint); NaN without a finished joint run."""
    joint = {(r.ordering, r.seed): r.values["final_average"] for r in runs if r.method == JOINT and r.status == "ok"}
    for r in runs:
        if r.status == "ok":
            ref = joint.get((r.ordering, r.seed), math.nan)
            sign = 1.0 if r.values["higher_is_better"] else -1.0
            r.values["gap_to_joint"] = sign * (r.values["final_average"] - ref)


def runs_frame(runs: list[SweepRun]) -> pd.DataFrame:
    """One row per run (RUN_COLUMNS): what comparison_runs.csv holds."""
    rows = []
    for r in runs:
        row = {"method": r.method, "ordering": r.ordering, "seed": r.seed, "order": " > ".join(r.order),
               "path": str(r.path), "status": r.status}
        row.update({c: r.values.get(c, math.nan) for c in RUN_COLUMNS if c not in row})
        rows.append(row)
    return pd.DataFrame(rows, columns=RUN_COLUMNS)
