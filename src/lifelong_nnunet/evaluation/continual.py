"""The result matrix R[stage][task] and the continual-learning metrics computed from it.

Formulas and sources are in docs/metrics.md. Every returned number is a python float or None (undefined),
never NaN, so summaries can go straight to JSON.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd


def result_matrix(results: pd.DataFrame, tasks: list[str], metric: str = "dice") -> pd.DataFrame:
    """R[stage][task]: mean over the task's test cases of each case's mean over its foreground labels.

    Averaging per case first weighs every case equally whatever its number of labels. NaN scores (HD95 of a
    label present on one side only) are left out of both means; ``undefined_counts`` says how many. The index
    runs over every stage 0..S (a stage or task without results is a NaN cell, not a missing row) so that row i
    of ``R.to_numpy()`` is stage i, as ``continual_metrics`` expects.
    """
    rows = results[results["metric"] == metric]
    per_case = rows.groupby(["stage", "eval_task", "case"])["value"].mean()
    per_task = per_case.groupby(level=["stage", "eval_task"]).mean().unstack("eval_task")
    n_stages = int(results["stage"].max()) + 1 if len(results) else 0
    R = per_task.reindex(index=range(n_stages), columns=list(tasks)).astype(float)
    R.index.name, R.columns.name = "stage", None
    return R


def stage_labels(results: pd.DataFrame) -> list[str]:
    """Row labels matching ``result_matrix``'s index: "before training" for stage 0, "after <trained_on>" after."""
    trained = results.drop_duplicates("stage").set_index("stage")["trained_on"]
    n_stages = int(results["stage"].max()) + 1 if len(results) else 0
    return [
        "before training" if s == 0 else f"after {trained[s]}" if s in trained.index else f"stage {s}"
        for s in range(n_stages)
    ]


def continual_metrics(R: np.ndarray, higher_is_better: bool = True, evaluated: np.ndarray | None = None) -> dict:
    """Continual metrics of a sequential schedule; R has shape (T+1, T), row 0 before training.

    With a(i, j) = R[i][j-1] (stage i, task j, both 1-based as in the papers):
    final_average = mean_j a(T, j); plasticity = mean_j a(j, j);
    bwt = mean_{j<T} a(T, j) - a(j, j); fwt = mean_{j>1} a(j-1, j) - a(0, j);
    forgetting_j = max_{j<=i<T} a(i, j) - a(T, j) for j < T. The max starts at stage j (when task j was
    learned): Chaudhry et al. take all stages 1..T-1, but before stage j the task was never trained, so those
    stages only matter when transfer beat learning, which would count as forgetting something never learned.

    For a lower-is-better metric (HD95) the differences are taken on -R: forgetting_j = a(T, j) -
    min_{j<=i<T} a(i, j), bwt = mean a(j, j) - a(T, j), fwt = mean a(0, j) - a(j-1, j). So for every metric a
    positive forgetting means "got worse" and a negative BWT/FWT means "worse than the reference score";
    final_average, plasticity and final_per_task stay plain means of R, in the metric's own unit.

    ``evaluated`` (same shape, bool) marks the cells that were scored at all. A cell that was not (its task's test
    data were gone when the stage was evaluated, as in lifelong use) is left out: every term that needs it is
    dropped from its mean, and ``n_not_evaluated`` says how many cells were missing. Among evaluated cells an
    undefined score (NaN) still makes its aggregate None, rather than a mean over the remaining tasks that would
    silently change the definition; bwt, fwt and forgetting are None when T == 1.
    """
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1 or R.shape[1] < 1:
        raise ValueError(f"result matrix must have shape (T+1, T) with T >= 1, got {R.shape}")
    ok = np.ones(R.shape, dtype=bool) if evaluated is None else np.asarray(evaluated, dtype=bool)
    if ok.shape != R.shape:
        raise ValueError(f"evaluated mask has shape {ok.shape}, the result matrix {R.shape}")
    T = R.shape[1]
    oriented = R if higher_is_better else -R  # "better" is "larger" in oriented, whatever the metric

    def a(i: int, j: int) -> float:
        return R[i, j - 1]

    def o(i: int, j: int) -> float:
        return oriented[i, j - 1]

    def seen(*cells: tuple[int, int]) -> bool:
        return all(ok[i, j - 1] for i, j in cells)

    def forgetting_of(j: int) -> float | None:
        before = [o(i, j) for i in range(j, T) if seen((i, j))]
        return none_if_nan(np.max(before) - o(T, j)) if before and seen((T, j)) else None

    forgetting = [forgetting_of(j) for j in range(1, T)] if T > 1 else None
    forgotten_terms = [math.nan if f is None else f for j, f in zip(range(1, T), forgetting or [])
                       if seen((T, j)) and any(seen((i, j)) for i in range(j, T))]
    return {
        "n_tasks": T,
        "final_per_task": [none_if_nan(a(T, j)) if seen((T, j)) else None for j in range(1, T + 1)],
        "final_average": _mean(a(T, j) for j in range(1, T + 1) if seen((T, j))),
        "plasticity": _mean(a(j, j) for j in range(1, T + 1) if seen((j, j))),
        "bwt": _mean(o(T, j) - o(j, j) for j in range(1, T) if seen((T, j), (j, j))) if T > 1 else None,
        "fwt": _mean(o(j - 1, j) - o(0, j) for j in range(2, T + 1) if seen((j - 1, j), (0, j))) if T > 1 else None,
        "forgetting": forgetting,
        "mean_forgetting": _mean(forgotten_terms) if forgetting else None,
        "n_not_evaluated": int((~ok).sum()),
    }


def reference_gaps(
    R_final: dict[str, float], separate: dict[str, float] | None, joint_final_average: float | None,
    higher_is_better: bool = True,
) -> dict:
    """Distance of the final model to its references: per task vs. the model trained on that task alone
    (``separate``), and the final average vs. ``joint`` training on all tasks at once (the upper bound).

    Negative gaps mean the continual model is worse than the reference, for every metric: with a
    lower-is-better metric (HD95) the gap is reference minus run. None where a reference (or the task's
    final score) is missing; the mean gap is None unless every task has one.
    """
    sign = 1.0 if higher_is_better else -1.0
    per_task = {
        task: none_if_nan(sign * (nan_if_none(value) - nan_if_none(separate.get(task))))
        if separate is not None else None
        for task, value in R_final.items()
    }
    final_average = _mean(nan_if_none(v) for v in R_final.values())
    return {
        "vs_separate": per_task,
        "mean_vs_separate": _mean(math.nan if g is None else g for g in per_task.values()),
        "final_average": final_average,
        "vs_joint": (
            none_if_nan(sign * (final_average - joint_final_average))
            if final_average is not None and none_if_nan(joint_final_average) is not None
            else None
        ),
    }


def undefined_counts(results: pd.DataFrame, tasks: list[str], metric: str) -> pd.DataFrame:
    """U[stage][task]: how many (case, label) scores of ``metric`` are NaN (HD95 when only one side of a
    label is empty). ``result_matrix`` leaves them out of its means, so a report must say how many."""
    rows = results[results["metric"] == metric]
    n_stages = int(results["stage"].max()) + 1 if len(results) else 0
    counts = rows["value"].isna().groupby([rows["stage"], rows["eval_task"]]).sum().unstack("eval_task")
    U = counts.reindex(index=range(n_stages), columns=list(tasks)).fillna(0).astype(int)
    U.index.name, U.columns.name = "stage", None
    return U


def none_if_nan(value: float | None) -> float | None:
    """A python float, or None for an undefined value (None or NaN): what JSON summaries hold."""
    return None if value is None or math.isnan(value) else float(value)


def nan_if_none(value: float | None) -> float:
    """A python float, NaN for an undefined value (None): what arithmetic and pandas columns need."""
    return math.nan if value is None else float(value)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return none_if_nan(float(np.mean(values))) if values else None
