"""The comparison report of a sweep (methods x orderings x seeds): one self-contained HTML file plus CSV tables.

Everything is read from stored files, so the report re-renders at any time without retraining, also while a sweep
is still running: a run without summary.json is shown as missing, never an error. The parts:

- ``load``: sweep.json's runs with what each run folder holds (missing and damaged runs included);
- ``tables``: the methods table and the paired statistics;
- ``figures``: mean result matrices by task name, per-task curves by position, ordering sensitivity;
- ``html``: the page, from the template report.html.j2.
"""
from __future__ import annotations

import os
from pathlib import Path

from ...io_utils import atomic_write, write_text
from ...run_folder import ComparisonFiles, SweepFolder
from .figures import Views, draw_curves, draw_heatmaps, draw_ordering, png, render_summary_png
from .html import render_html
from .load import collect, load_runs, load_sweep, runs_frame
from .tables import higher_is_better, method_table, pairwise_table

__all__ = ["collect", "load_sweep", "method_table", "pairwise_table", "render_summary_png",
           "write_comparison_report"]


def write_comparison_report(sweep_dir: str | os.PathLike, metric: str = "dice",
                            out: str | os.PathLike | None = None) -> Path:
    """Write the sweep's comparison.html (self-contained) and, next to it, comparison.csv (the methods table),
    comparison_runs.csv (one row per run) and comparison_pairs.csv (the pairwise statistics). Returns the HTML
    path. Reads stored results only."""
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    runs = load_runs(sweep_dir, sweep["runs"], metric)
    frame = runs_frame(runs)
    table, pairs = method_table(frame), pairwise_table(frame, metric)
    files = ComparisonFiles(Path(out)) if out is not None else SweepFolder(sweep_dir).comparison
    for part, df in (("methods", table), ("runs", frame), ("pairs", pairs)):
        atomic_write(files.table(part), lambda tmp, df=df: df.to_csv(tmp, index=False))
    views = Views(runs, metric)
    figures = {}
    if views.methods:
        figures = {"heatmaps": png(draw_heatmaps, views), "curves": png(draw_curves, views),
                   "ordering": png(draw_ordering, views)}
    higher = higher_is_better(frame, metric)
    write_text(files.html, render_html(sweep_dir, sweep, metric, higher, runs, table, pairs, figures, files))
    return files.html
