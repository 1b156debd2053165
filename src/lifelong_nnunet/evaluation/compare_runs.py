"""`lifelong-nnunet compare RUN1 RUN2 ...`: a user's own runs side by side, without a sweep.

A user who tried two methods, or one method with two budgets, wants one table; a sweep is for planned grids. Only
runs that learned the same tasks in the same scenario and were scored on the same test cases are set side by side
(the reference checks of `summary.check_comparable`): numbers from other test cases would compare nothing. Every
run is checked before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserInputError
from ..io_utils import write_text
from ..run_folder import ComparisonFolder, RunFolder
from .metrics import metric_spec
from .plots import plot_method_comparison
from .report import comparison_table, render_comparison_markdown
from .summary import check_comparable, summarize

FIX = ("Compare only runs on the same task folders with the same test split (the same seed and test_split "
       "settings), in the same scenario; the order of the tasks may differ.")


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's name in the table: its folder name, or its path below the runs' common folder where two folder
    names are the same (runs/a/seq and runs/b/seq)."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath(paths))
    return [p.relative_to(common).as_posix() for p in paths]


def compare_runs(run_dirs: list[Path], metric: str | None = None) -> dict[str, dict]:
    """The summaries of ``run_dirs`` by name ("<name> (<method>)"), after checking that every run is comparable
    with the first. ``metric``: the headline metric (default: the first run's report_metric); a run that did not
    score it is refused by ``summarize``."""
    if len(run_dirs) < 2:
        raise UserInputError(f"compare needs two or more run folders (got {len(run_dirs)}). Give them all, e.g. "
                             f"`lifelong-nnunet compare runs/seq runs/ewc`.")
    runs = [RunFolder(Path(d).resolve()) for d in run_dirs]
    twice = sorted({str(r.root) for r in runs if runs.count(r) > 1})
    if twice:
        raise UserInputError(f"compare was given {', '.join(twice)} more than once. Give each run folder once.")
    first = runs[0]
    first.require_finished()
    for other in runs[1:]:
        check_comparable(first, other, "The run", FIX)
    metric = metric or first.read_experiment().evaluation.report_metric
    out = {}
    for name, run in zip(run_names([r.root for r in runs]), runs):
        summary = summarize(run.root, metric)
        out[f"{name} ({summary['method']})"] = summary
    return out


def write_comparison(summaries: dict[str, dict], output: Path) -> ComparisonFolder:
    """comparison.md and comparison.png in ``output`` (created), each written atomically."""
    folder = ComparisonFolder(Path(output))
    metric = next((s["metric"] for s in summaries.values() if s.get("metric")), "dice")
    name = metric_spec(metric).display
    plot_method_comparison(summaries, folder.figure, ylabel=f"{name} / {name} difference", title="Runs side by side")
    write_text(folder.report, render_comparison_markdown(summaries, {"Runs side by side": folder.relative(
        folder.figure)}, title="Run comparison", first_column="run"))
    return folder


def terminal_table(summaries: dict[str, dict]):
    """The same table as comparison.md, as a rich table for the terminal."""
    from rich.table import Table
    header, body = comparison_table(summaries, first_column="run")
    metric = next((s["metric"] for s in summaries.values() if s.get("metric")), "dice")
    table = Table(title=f"Runs side by side ({metric})")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    return table
