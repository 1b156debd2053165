"""Markdown reports: one run, or several runs side by side. Pure functions; the caller writes the file.

A summary is a flat dict: ``method``, ``tasks`` (in training order), optional ``title`` and ``scenario``,
the keys of ``continual_metrics`` (``final_average``, ``final_per_task``, ``plasticity``, ``bwt``, ``fwt``,
``forgetting``, ``mean_forgetting``) for the headline ``metric`` (Dice when absent), optionally
``by_metric`` (the same keys per scored metric) and ``reference_gaps`` (from ``reference_gaps``).
"""
from __future__ import annotations

import math

import pandas as pd

from .metrics import metric_spec
from .task_agnostic import task_agnostic_lines

UNDEFINED = "—"
NOT_EVALUATED = "not evaluated (test data absent)"

# (summary key, heading, one-line meaning with {m} for the metric's name), in the order the tables show them.
CONTINUAL_METRICS = [
    ("final_average", "Final average", "mean {m} over all tasks after the last stage"),
    ("bwt", "BWT", "backward transfer: mean change in {m} on earlier tasks since learned (negative = forgetting)"),
    ("fwt", "FWT", "forward transfer: {m} on a task just before training it, minus the untrained model's"),
    ("mean_forgetting", "Mean forgetting", "mean drop from each earlier task's best {m} to its final {m}"),
    ("plasticity", "Plasticity", "mean {m} on each task right after training on it"),
]
# Meanings for a lower-is-better metric (HD95), whose differences are sign-flipped (docs/metrics.md).
LOWER_IS_BETTER_MEANINGS = {
    "bwt": "backward transfer: mean {m} an earlier task had right after it was learned minus its final {m} "
           "(lower is better; negative = forgetting)",
    "fwt": "forward transfer: the untrained model's {m} minus {m} on a task just before training it "
           "(lower is better; positive = earlier tasks helped)",
    "mean_forgetting": "mean rise from each earlier task's best (lowest) {m} to its final {m} (positive = worse)",
}

def render_markdown(summary: dict, R: pd.DataFrame, row_labels: list[str], images: dict[str, str]) -> str:
    """Report of one run: the result matrix of the headline metric (``summary["metric"]``), its continual
    metrics, every other scored metric in one table (``summary["by_metric"]``), reference gaps, and the
    figures (``images`` maps a caption to a path relative to the report)."""
    tasks = list(summary.get("tasks") or R.columns)
    metric = summary.get("metric", "dice")
    spec = metric_spec(metric)
    name, unit = spec.display, f" ({spec.unit})" if spec.unit else ""
    head = (summary.get("by_metric") or {}).get(metric, {})
    lines = [f"# {summary.get('title') or 'Continual run: ' + str(summary.get('method', '?'))}", ""]
    lines += [f"- **Method:** {summary.get('method', UNDEFINED)}"]
    if summary.get("scenario"):
        lines += [f"- **Scenario:** {summary['scenario']}"]
    lines += [f"- **Tasks (training order):** {', '.join(tasks)}"]
    lines += [f"- **Headline metric:** {name}{unit}", ""]

    lines += ["## Result matrix", "",
              f"Mean foreground {name}{unit} on each task's test split (columns) after each stage (rows).", ""]
    missing = {(int(i), str(t)) for i, t in summary.get("not_evaluated") or []}
    names = list(summary.get("tasks") or R.columns)
    lines += _table(
        ["stage"] + [str(c) for c in R.columns],
        [[label] + [NOT_EVALUATED if (i, names[j] if j < len(names) else "") in missing else _fmt(v)
                    for j, v in enumerate(row)]
         for i, (label, row) in enumerate(zip(row_labels, R.to_numpy(dtype=float).tolist()))],
    )
    if missing:
        lines += ["", f"{len(missing)} cell(s) *{NOT_EVALUATED}*: the task's held-out test cases were gone when that "
                  f"stage was evaluated. They are left out of every mean below (never read as zero)."]
    if head.get("n_undefined"):
        note = (f"{head['n_undefined']} (case, label) {name} score(s) are undefined (the label is in only one of "
                f"prediction and reference) and left out of the means above. Per cell:")
        lines += ["", note, ""]
        lines += _table(["stage"] + [str(c) for c in R.columns],
                        [[label] + [str(n) for n in row] for label, row in zip(row_labels, head["undefined"])])

    lines += ["", "## Continual metrics", ""]
    lines += _table(["metric", "value", "meaning"],
                    [[heading, _fmt(summary.get(key)), meaning]
                     for key, heading, meaning in _meanings(metric, head.get("higher_is_better", True))])
    forgetting = summary.get("forgetting")
    if forgetting:
        definition = (f"best {name} after learning it minus final {name}" if head.get("higher_is_better", True)
                      else f"final {name} minus the best (lowest) {name} since learning it; positive = worse")
        lines += ["", f"Forgetting per task ({definition}):", ""]
        lines += _table([str(t) for t in tasks[: len(forgetting)]], [[_fmt(f) for f in forgetting]])

    by_metric = summary.get("by_metric") or {}
    if len(by_metric) > 1:
        note = (f"Every scored metric (the headline is {name}). For each one, negative BWT/FWT and positive "
                "forgetting mean worse: for HD95, where lower is better, the differences are sign-flipped "
                "(docs/metrics.md). Undefined: (case, label) scores left out of the means.")
        lines += ["", "## All metrics", "", note, ""]
        keys = [k for k, _, _ in CONTINUAL_METRICS]
        lines += _table(
            ["metric"] + [h for _, h, _ in CONTINUAL_METRICS] + [f"final {c}" for c in R.columns] + ["undefined"],
            [[metric_spec(m).label] + [_fmt(entry.get(k)) for k in keys]
             + [_fmt(v) for v in (entry.get("final_per_task") or [None] * len(tasks))]
             + [str(entry.get("n_undefined", 0))]
             for m, entry in by_metric.items()],
        )

    gaps = summary.get("reference_gaps")
    if gaps:
        lines += ["", "## Against references", "", "Negative = below the reference"
                  + (" (sign-flipped: lower is better)." if not head.get("higher_is_better", True) else "."), ""]
        rows = [[f"{task} vs. separate", _fmt(g)] for task, g in (gaps.get("vs_separate") or {}).items()]
        rows += [["mean vs. separate", _fmt(gaps.get("mean_vs_separate"))]]
        rows += [["final average vs. joint (upper bound)", _fmt(gaps.get("vs_joint"))]]
        lines += _table(["comparison", f"{name} gap"], rows)

    lines += task_agnostic_lines(summary.get("task_agnostic"), row_labels)  # methods with heads (own section)
    if summary.get("notes"):  # what a method could not do as configured (`Method.notes`)
        lines += ["", "## Notes", "", *[f"- {n}" for n in summary["notes"]]]
    lines += _history(summary.get("history") or [])
    lines += _images(images)
    return "\n".join(lines) + "\n"


def _history(history: list[dict]) -> list[str]:
    """How the model grew: one row per stage with where it came from, the data it saw and its budget."""
    if not history:
        return []
    lines = ["", "## History", "", "Each stage of the model: trained in `run`, added by `extend`, or imported "
             "(`--start-from`). The fingerprint is a hash of the dataset's files, so changed data show.", ""]
    rows = []
    for h in history:
        data = "; ".join(f"{d['name']} ({d['n_train']} train, {d['n_test']} test)" for d in h.get("datasets", []))
        budget = h.get("budget") or {}
        versions = h.get("versions") or {}
        rows.append([str(h["stage"]), h.get("origin", "?"), data or UNDEFINED,
                     ", ".join(d.get("fingerprint", "") for d in h.get("datasets", [])) or UNDEFINED,
                     f"{budget.get('epochs', '?')} x {budget.get('iterations_per_epoch', '?')}" if budget else
                     UNDEFINED, h.get("finished", UNDEFINED),
                     ", ".join(f"{k} {v}" for k, v in versions.items()) or UNDEFINED])
    return lines + _table(["stage", "origin", "data", "fingerprint", "epochs x iterations", "finished", "versions"],
                          rows)


def render_comparison_markdown(rows: dict[str, dict], images: dict[str, str]) -> str:
    """Method x metric table over several runs (e.g. sequential, joint, separate), with per-task final scores
    of the runs' headline metric (``metric`` of the summaries, Dice when absent)."""
    tasks: list[str] = []
    for summary in rows.values():
        tasks += [t for t in summary.get("tasks", []) if t not in tasks]
    metric = next((s["metric"] for s in rows.values() if s.get("metric")), "dice")
    meanings = _meanings(metric, metric_spec(metric).higher_is_better)
    header = ["method"] + [heading for _, heading, _ in meanings] + [f"final {t}" for t in tasks]
    body = []
    for name, summary in rows.items():
        per_task = dict(zip(summary.get("tasks", []), summary.get("final_per_task") or []))
        body.append(
            [name]
            + [_fmt(summary.get(key)) for key, _, _ in meanings]
            + [_fmt(per_task.get(t)) for t in tasks]
        )
    lines = ["# Method comparison", ""] + _table(header, body)
    lines += ["", "Metrics:", ""] + [f"- **{heading}**: {meaning}." for _, heading, meaning in meanings]
    lines += _images(images)
    return "\n".join(lines) + "\n"


def _meanings(metric: str, higher_is_better: bool) -> list[tuple[str, str, str]]:
    """CONTINUAL_METRICS with the metric's name filled in, and the sign-flipped meanings where lower is better."""
    m = metric_spec(metric).display
    flipped = {} if higher_is_better else LOWER_IS_BETTER_MEANINGS
    return [(key, heading, flipped.get(key, meaning).format(m=m)) for key, heading, meaning in CONTINUAL_METRICS]


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
