"""The task-agnostic part of summary.json and the report: R with the inferred head next to R with the oracle head,
and how often task inference chose a case's own task (`stages.task_agnostic` scores the cells)."""
from __future__ import annotations

import pandas as pd

from ..names import short_task_name
from ..run_folder import RunFolder
from .continual import none_if_nan, result_matrix


def task_agnostic_summary(run: RunFolder, tasks: list[str], metric: str, oracle_R: list[list[float]],
                          n_stages: int) -> dict | None:
    """``None`` when the run has no task-agnostic cells (methods without heads, or runs trained before task
    inference). Otherwise, for the headline ``metric``: ``R_inferred`` (None where not scored), ``R_oracle`` (the
    result matrix), ``accuracy[stage][task]`` (fraction of the task's test cases whose inferred head is the task's
    own; None for a task not trained by that stage, whose oracle is the newest head), the final row of each, and
    the number of test cases flagged out-of-distribution at the last stage."""
    cells = [c for i in range(n_stages) for t in tasks if (c := run.read_task_agnostic_cell(i, t)) is not None]
    if not cells:
        return None
    frame = pd.concat(cells)
    R = result_matrix(frame, tasks, metric).reindex(index=range(n_stages))
    per_case = frame.drop_duplicates(["stage", "eval_task", "case"])
    accuracy = [[None] * len(tasks) for _ in range(n_stages)]
    schedule = run.read_schedule()
    for s in range(n_stages):
        known = {t for st in schedule if st.index <= s for t in st.train_tasks}
        for j, t in enumerate(tasks):
            rows = per_case[(per_case.stage == s) & (per_case.eval_task == t)]
            if len(rows) and t in known:
                accuracy[s][j] = float((rows.chosen_task == t).mean())
    last = n_stages - 1
    final_inferred = [none_if_nan(float(v)) for v in R.iloc[last].tolist()]
    scored = [v for v in final_inferred if v is not None]
    final = per_case[per_case.stage == last]
    inferred = [[none_if_nan(float(v)) for v in row] for row in R.to_numpy().tolist()]
    return {"metric": metric, "tasks": list(tasks), "R_inferred": inferred,
            "R_oracle": oracle_R, "accuracy": accuracy, "final_per_task_inferred": final_inferred,
            "final_average_inferred": sum(scored) / len(scored) if len(scored) == len(tasks) else None,
            "final_accuracy_per_task": accuracy[last],
            "ood_cases_final": int(final.ood.astype(str).str.lower().eq("true").sum())}


def task_agnostic_lines(section: dict | None, row_labels: list[str]) -> list[str]:
    """The report's section "Without the task": both matrices' last rows, and the accuracy of the chosen head."""
    if not section:
        return []
    from .report import _fmt, _table
    tasks = [short_task_name(t) for t in section["tasks"]]
    lines = ["", "## Without the task (task-agnostic evaluation)", "",
             "Each test case segmented by the head that task inference chose from the stages' image descriptions "
             "(as `predict` without `--task`), next to the oracle head (its own task's, as `--task`). Right head: "
             "the share of a trained task's test cases given their own head (docs/deploy.md).", ""]
    rows = []
    for i, label in enumerate(row_labels):
        inferred, oracle, acc = section["R_inferred"][i], section["R_oracle"][i], section["accuracy"][i]
        if all(v is None for v in inferred):
            continue
        rows.append([label] + [f"{_fmt(a)} / {_fmt(b)} ({'—' if c is None else f'{c:.0%}'})"
                               for a, b, c in zip(inferred, oracle, acc)])
    lines += _table(["stage"] + [f"{t}: inferred / oracle (right head)" for t in tasks], rows)
    lines += ["", f"Test cases flagged out-of-distribution after the last stage: {section['ood_cases_final']}."]
    return lines
