"""Markdown reports: one run, or several runs side by side. Pure functions; the caller writes the file.

A summary is a flat dict: ``method``, ``tasks`` (in training order), optional ``title`` and ``scenario``,
the keys of ``continual_metrics`` (``final_average``, ``final_per_task``, ``plasticity``, ``bwt``, ``fwt``,
``forgetting``, ``mean_forgetting``) and optionally ``reference_gaps`` (from ``reference_gaps``).
"""
from __future__ import annotations

import math

import pandas as pd

UNDEFINED = "—"

# (summary key, heading, one-line meaning), in the order the tables show them.
CONTINUAL_METRICS = [
    ("final_average", "Final average", "mean Dice over all tasks after the last stage"),
    ("bwt", "BWT", "backward transfer: mean change on earlier tasks since they were learned (negative = forgetting)"),
    ("fwt", "FWT", "forward transfer: Dice on a task just before training it, minus the untrained model's"),
    ("mean_forgetting", "Mean forgetting", "mean drop from each earlier task's best Dice to its final Dice"),
    ("plasticity", "Plasticity", "mean Dice on each task right after training on it"),
]


def render_markdown(summary: dict, R: pd.DataFrame, row_labels: list[str], images: dict[str, str]) -> str:
    """Report of one run: the result matrix, its continual metrics, reference gaps, and the figures
    (``images`` maps a caption to a path relative to the report)."""
    tasks = list(summary.get("tasks") or R.columns)
    lines = [f"# {summary.get('title') or 'Continual run: ' + str(summary.get('method', '?'))}", ""]
    lines += [f"- **Method:** {summary.get('method', UNDEFINED)}"]
    if summary.get("scenario"):
        lines += [f"- **Scenario:** {summary['scenario']}"]
    lines += [f"- **Tasks (training order):** {', '.join(tasks)}", ""]

    lines += ["## Result matrix", "", "Mean foreground Dice on each task's test split (columns) after each stage (rows).", ""]
    lines += _table(
        ["stage"] + [str(c) for c in R.columns],
        [[label] + [_fmt(v) for v in row] for label, row in zip(row_labels, R.to_numpy(dtype=float).tolist())],
    )

    lines += ["", "## Continual metrics", ""]
    lines += _table(
        ["metric", "value", "meaning"],
        [[heading, _fmt(summary.get(key)), meaning] for key, heading, meaning in CONTINUAL_METRICS],
    )
    forgetting = summary.get("forgetting")
    if forgetting:
        lines += ["", "Forgetting per task (best Dice after learning it minus final Dice):", ""]
        lines += _table([str(t) for t in tasks[: len(forgetting)]], [[_fmt(f) for f in forgetting]])

    gaps = summary.get("reference_gaps")
    if gaps:
        lines += ["", "## Against references", "", "Negative = below the reference.", ""]
        rows = [[f"{task} vs. separate", _fmt(g)] for task, g in (gaps.get("vs_separate") or {}).items()]
        rows += [["mean vs. separate", _fmt(gaps.get("mean_vs_separate"))]]
        rows += [["final average vs. joint (upper bound)", _fmt(gaps.get("vs_joint"))]]
        lines += _table(["comparison", "Dice gap"], rows)

    lines += _images(images)
    return "\n".join(lines) + "\n"


def render_comparison_markdown(rows: dict[str, dict], images: dict[str, str]) -> str:
    """Method x metric table over several runs (e.g. sequential, joint, separate), with per-task final Dice."""
    tasks: list[str] = []
    for summary in rows.values():
        tasks += [t for t in summary.get("tasks", []) if t not in tasks]
    header = ["method"] + [heading for _, heading, _ in CONTINUAL_METRICS] + [f"final {t}" for t in tasks]
    body = []
    for name, summary in rows.items():
        per_task = dict(zip(summary.get("tasks", []), summary.get("final_per_task") or []))
        body.append(
            [name]
            + [_fmt(summary.get(key)) for key, _, _ in CONTINUAL_METRICS]
            + [_fmt(per_task.get(t)) for t in tasks]
        )
    lines = ["# Method comparison", ""] + _table(header, body)
    lines += ["", "Metrics:", ""] + [f"- **{heading}**: {meaning}." for _, heading, meaning in CONTINUAL_METRICS]
    lines += _images(images)
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNDEFINED
    return f"{float(value):.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _images(images: dict[str, str]) -> list[str]:
    if not images:
        return []
    lines = ["", "## Figures"]
    for caption, path in images.items():
        lines += ["", f"![{caption}]({path})"]
    return lines
