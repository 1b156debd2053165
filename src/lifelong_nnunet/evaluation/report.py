"""Markdown reports: one run, or several runs side by side. Pure functions; the caller writes the file.

A summary is a flat dict: ``method``, ``tasks`` (in training order), optional ``title`` and ``scenario``,
the keys of ``continual_metrics`` (``final_average``, ``final_per_task``, ``plasticity``, ``bwt``, ``fwt``,
``forgetting``, ``mean_forgetting``) for the headline ``metric`` (Dice when absent), optionally
``by_metric`` (the same keys per scored metric) and ``reference_gaps`` (from ``reference_gaps``), and optionally
what the run was and cost (``warnings``, ``budget``, ``resources``, ``data``, ``per_label_final``: see
``run_facts``). Every optional part is left out of the report when absent, so hand-made summaries still render.
"""
from __future__ import annotations

import math

import pandas as pd

from .metrics import metric_spec
from .task_agnostic import task_agnostic_lines

UNDEFINED = "—"
NOT_EVALUATED = "not evaluated (test data absent)"
NOT_RECORDED = "not recorded"  # a cost measured only by runs since resources.json exists

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

def render_markdown(summary: dict, R: pd.DataFrame, row_labels: list[str], images: dict[str, str],
                    details: str | None = None) -> str:
    """Report of one run: warnings, what the run was and cost, its data, the result matrix of the headline metric
    (``summary["metric"]``), its continual metrics, the final model per label (``details``: the link to the page of
    per-label and per-case tables), every other scored metric in one table (``summary["by_metric"]``), reference
    gaps, and the figures (``images`` maps a caption to a path relative to the report)."""
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
    lines += [f"- **Headline metric:** {name}{unit}"]
    if summary.get("scored_on") == "validation":
        lines += ["- **Scored on:** validation cases carved from each task's training split (a tuning run, "
                  "`score_on: validation`). The test cases were left out of this run entirely: in the tables below, "
                  "\"test\" means these validation cases."]
    lines += [""]
    lines += _warnings(summary.get("warnings") or [])
    lines += _run_section(summary)
    lines += _data_section(summary.get("data") or {})

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
    lines += _stage_zero_note(row_labels)
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

    lines += _per_label_section(summary.get("per_label_final") or {}, name, details)

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


def _warnings(warnings: list[str]) -> list[str]:
    """Stages that learned nothing and structures never segmented, where a reader sees them first."""
    lines: list[str] = []
    for w in warnings:
        lines += [f"> **Warning:** {w}", ">"]
    return lines[:-1] + [""] if lines else []


def _seconds(value: float | None) -> str:
    if value is None:
        return NOT_RECORDED
    if value >= 3600:
        return f"{value:.0f} s ({value / 3600:.1f} h)"
    return f"{value:.0f} s ({value / 60:.1f} min)" if value >= 120 else f"{value:.0f} s"


def _mib(value: float | None) -> str:
    return NOT_RECORDED if value is None else f"{value:.0f} MiB"


def _run_section(summary: dict) -> list[str]:
    """The budget, the device, the wall time and the peak memory, overall and per stage (summary.json's
    ``budget`` and ``resources``, from `run_facts`). Parts of the run without a record say so."""
    budget, res = summary.get("budget"), summary.get("resources")
    if not budget and not res:
        return []
    lines = ["## Run", ""]
    if budget:
        per_stage = ", ".join(f"stage {b['stage']}: " + ("imported (trained elsewhere)" if b.get("imported") else
                                                         f"{b.get('epochs') or '?'} x "
                                                         f"{b.get('iterations_per_epoch') or '?'}")
                              for b in budget["stages"])
        batch = NOT_RECORDED if budget.get("batch_size") is None else str(budget["batch_size"])
        if budget.get("batch_size_from") == "nnU-Net plans":
            batch += " (nnU-Net's plan)"
        lines += [f"- **Budget:** nnU-Net {budget['configuration']}, batch size {batch}; epochs x "
                  f"iterations per epoch: {per_stage or UNDEFINED}"]
        if budget.get("plans"):
            why = f" ({budget['planning']})" if budget.get("planning") else ""
            lines += [f"- **Plans:** {budget['plans']}{why}"]
        workers = sorted({b["augmentation_workers"] for b in budget["stages"] if b.get("augmentation_workers")
                          is not None})
        if workers:  # results are bitwise reproducible for a seed and a worker count (docs/cli.md)
            lines += [f"- **Augmentation workers:** {', '.join(map(str, workers))} (nnUNet_n_proc_DA; 0: in the "
                      f"training process)"]
    res = res or {}
    devices = ", ".join(res.get("devices") or []) or NOT_RECORDED
    requested = f" (requested: {budget['requested_device']})" if budget else ""
    lines += [f"- **Device:** {devices}{requested}"]
    stages = res.get("stages") or []
    train = [e["train_seconds"] for e in stages if e.get("train_seconds") is not None]
    evaluate = [e["evaluate_seconds"] for e in stages if e.get("evaluate_seconds") is not None]
    wall = _seconds(res.get("wall_seconds"))
    if res.get("wall_seconds") is not None:
        wall += f" (training {_seconds(sum(train))}, evaluation {_seconds(sum(evaluate))}"
        wall += f"; {NOT_RECORDED}, so not in the total: {', '.join(res['not_recorded'])})" \
            if res.get("not_recorded") else ")"
    lines += [f"- **Wall time:** {wall}"]
    memory = NOT_RECORDED if res.get("peak_rss_mb") is None else f"{_mib(res['peak_rss_mb'])} resident"
    if res.get("peak_gpu_mb") is not None:
        memory += f", {_mib(res['peak_gpu_mb'])} on the GPU (torch's peak allocation)"
    lines += [f"- **Peak memory:** {memory}", ""]
    if any(e.get("sessions") for e in stages):
        lines += ["Per stage, summed over the sessions that trained or evaluated it (a killed and resumed stage has "
                  "several). Peak resident memory is the process's peak so far (it never falls).", ""]
        lines += _table(["stage", "sessions", "training", "evaluation", "peak resident", "peak GPU"],
                        [[str(e["stage"]), str(e.get("sessions", 0)),
                          "none (untrained)" if e["stage"] == 0 else "imported" if e.get("imported") else
                          _seconds(e.get("train_seconds")),
                          _seconds(e.get("evaluate_seconds")), _mib(e.get("peak_rss_mb")),
                          UNDEFINED if e.get("peak_gpu_mb") is None else _mib(e["peak_gpu_mb"])] for e in stages])
        lines += [""]
    return lines


def _data_section(data: dict[str, dict]) -> list[str]:
    """Case counts per task and the test case IDs (summary.json's ``data``)."""
    if not data:
        return []
    lines = ["## Data", "", "Training and validation cases are the task's own (validation: nnU-Net's per-epoch "
             "check, drawn from the training cases); the test cases are held out and scored after every stage.", ""]
    def count(d: dict, key: str) -> str:
        return "trained elsewhere" if d.get("imported") else NOT_RECORDED if d.get(key) is None else str(d[key])
    normalised = any(d.get("normalisation") for d in data.values())
    lines += _table(["task", "training", "validation", "test", *(["normalisation"] if normalised else []),
                     "test cases"],
                    [[task, count(d, "n_train"), count(d, "n_validation"), str(d.get("n_test", 0)),
                      *([d.get("normalisation") or "the plans' (not recorded)"] if normalised else []),
                      ", ".join(d.get("test_cases") or []) or UNDEFINED] for task, d in data.items()])
    if normalised:
        lines += ["", "Each task's images are normalised as nnU-Net would normalise them for that task alone (its "
                  "channel names' scheme, its own intensity statistics), on the one architecture every stage shares."]
    return lines + [""]


def _stage_zero_note(row_labels: list[str]) -> list[str]:
    """Why the first row is not a result: users read an untrained network's chance overlap as an achievement."""
    if not row_labels or row_labels[0] != "before training":
        return []
    return ["", "The row *before training* is the untrained model (stage 0: nnU-Net's randomly initialised "
            "network), the baseline every stage is measured against, not a result. Its overlap is chance: a large "
            "structure overlaps a random prediction substantially (an untrained network can score Dice 0.3 on a "
            "spine), a small one hardly at all. FWT subtracts this row, and a stage whose trained task scores at "
            "or below it learned nothing (see docs/metrics.md)."]


def _per_label_section(per_label: dict[str, dict[str, float | None]], name: str, details: str | None) -> list[str]:
    """The delivered model's score per structure: in a class run, which structures it segments at all."""
    if not per_label:
        return []
    lines = ["", "## Per structure (final model)", "",
             f"Mean {name} of each structure on each task's test cases, with the model the run delivers for the task."
             + (f" Every stage per structure, and every test case: [{details}]({details})." if details else ""), ""]
    return lines + _table(["task", "structure", name],
                          [[task, label, _fmt(v)] for task, labels in per_label.items() for label, v in labels.items()])


def render_details_markdown(title: str, name: str, by_stage: pd.DataFrame, by_case: pd.DataFrame) -> str:
    """The page of per-label and per-case tables that a report links: ``by_stage`` has columns task, structure and
    one per stage label; ``by_case`` columns task, case and one per structure (the delivered model's scores)."""
    lines = [f"# {title}: per structure and per case", "",
             f"## {name} per structure after each stage", "",
             f"Mean {name} over the task's test cases (undefined scores left out); {UNDEFINED}: not scored.", ""]
    lines += _table([str(c) for c in by_stage.columns],
                    [[str(r[0]), str(r[1]), *[_fmt(v) for v in r[2:]]] for r in by_stage.itertuples(index=False)])
    lines += ["", f"## {name} per test case (final model)", "",
              f"The model the run delivers for each task; {UNDEFINED}: the structure is not one of the task's, or "
              f"its score is undefined.", ""]
    lines += _table([str(c) for c in by_case.columns],
                    [[str(r[0]), str(r[1]), *[_fmt(v) for v in r[2:]]] for r in by_case.itertuples(index=False)])
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


def comparison_table(rows: dict[str, dict], first_column: str = "method") -> tuple[list[str], list[list[str]]]:
    """Header and cells of the runs-side-by-side table: the continual metrics of the runs' headline metric
    (``metric`` of the summaries, Dice when absent), each task's final score, and the recorded wall time (training
    plus evaluation; "not recorded" for runs from before it was, or marked partial). Shared by the markdown and
    the terminal view, so the two never disagree."""
    tasks: list[str] = []
    for summary in rows.values():
        tasks += [t for t in summary.get("tasks", []) if t not in tasks]
    metric = next((s["metric"] for s in rows.values() if s.get("metric")), "dice")
    meanings = _meanings(metric, metric_spec(metric).higher_is_better)
    header = [first_column] + [heading for _, heading, _ in meanings] + [f"final {t}" for t in tasks] + ["wall time"]
    body = []
    for name, summary in rows.items():
        per_task = dict(zip(summary.get("tasks", []), summary.get("final_per_task") or []))
        resources = summary.get("resources") or {}
        wall = _seconds(resources.get("wall_seconds"))
        if resources.get("wall_seconds") is not None and resources.get("not_recorded"):
            wall += " (partly not recorded)"
        body.append(
            [name]
            + [_fmt(summary.get(key)) for key, _, _ in meanings]
            + [_fmt(per_task.get(t)) for t in tasks]
            + [wall]
        )
    return header, body


def render_comparison_markdown(rows: dict[str, dict], images: dict[str, str], title: str = "Method comparison",
                               first_column: str = "method") -> str:
    """Method x metric table over several runs (e.g. sequential, joint, separate): ``comparison_table`` and what
    its metrics mean."""
    metric = next((s["metric"] for s in rows.values() if s.get("metric")), "dice")
    meanings = _meanings(metric, metric_spec(metric).higher_is_better)
    header, body = comparison_table(rows, first_column)
    lines = [f"# {title}", ""] + _table(header, body)
    lines += ["", "Metrics:", ""] + [f"- **{heading}**: {meaning}." for _, heading, meaning in meanings]
    lines += ["- **wall time**: training plus evaluation, every recorded session added up."]
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
