"""The comparison's figures: per method the mean result matrix by task name, the per-task curves by training
position, the ordering sensitivity, and the methods table as an image.

Permuted orderings. Each run stores R with its columns in *its own* training order, so R[i, j] of two orderings are
different tasks. The figures therefore use two views (docs/comparison.md):

- by task name: the heatmap's columns are tasks in the first finished run's order, re-indexed by name; its rows
  are stages by position ("after stage k" = after the k-th trained task, whichever it was). Its last row is
  each task's final score averaged over orderings and seeds (exact); with several orderings the earlier rows
  mix tasks at different points of their life and only read as "how good is this task after k stages".
- by position: the per-task curves follow "the task trained 1st, 2nd, ..." across stages, so learning at its
  own stage and forgetting afterwards line up across orderings.
"""
from __future__ import annotations

import base64
import io
import itertools
import math
import os
from pathlib import Path

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import UserInputError
from ...io_utils import atomic_write
from ...names import short_task_name
from ..plots import fit_titles, new_figure
from .load import SweepRun, load_runs, load_sweep, runs_frame
from .tables import TABLE_COLUMNS, mean_std, method_table


def render_summary_png(sweep_dir: str | os.PathLike, out_png: str | os.PathLike, metric: str = "dice") -> Path:
    """The report's main panel in one PNG (methods table, mean-R heatmaps, ordering sensitivity), for docs:
    the HTML itself cannot be screenshotted without a browser."""
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir, load_sweep(sweep_dir)["runs"], metric)
    views = Views(runs, metric)
    if not views.methods:
        raise UserInputError(f"no run of {sweep_dir} has finished yet: nothing to draw.")
    table = method_table(runs_frame(runs))
    n_rows_heat = math.ceil(len(views.methods) / 4)
    with matplotlib.style.context("default"):
        table_height = 0.6 + 0.25 * len(table)
        fig = new_figure(max(12.0, 3.2 * min(4, len(views.methods))), table_height + 3.2 * n_rows_heat + 3.6)
        top, mid, bottom = fig.subfigures(3, 1, height_ratios=[table_height, 3.2 * n_rows_heat, 3.6])
        draw_table(top, table)
        draw_heatmaps(mid, views)
        draw_ordering(bottom, views)
        fit_titles(fig)
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return Path(out_png)


class Views:
    """Per method: the mean R by task name, the mean curves by position, final averages per ordering."""

    def __init__(self, runs: list[SweepRun], metric: str) -> None:
        self.metric = metric
        ok = [r for r in runs if r.status == "ok" and r.R is not None and r.R.ndim == 2]
        self.methods = list(dict.fromkeys(r.method for r in ok))
        self.orderings = list(dict.fromkeys(r.ordering for r in runs))
        self.tasks: list[str] = []  # the first finished run's training order, then any task it lacks
        for r in ok:
            self.tasks += [t for t in r.tasks if t not in self.tasks]
        self.by_name, self.by_position, self.position_names, self.finals, self.n_runs = {}, {}, {}, {}, {}
        self.row_labels: dict[str, list[str]] = {}
        for method in self.methods:
            mine = [r for r in ok if r.method == method]
            n_stages = max(r.R.shape[0] for r in mine)
            named = np.stack([_pad(_reindex(r.R, r.tasks, self.tasks), n_stages) for r in mine])
            positional = np.stack([_pad(r.R, n_stages, len(self.tasks)) for r in mine])
            self.by_name[method] = _nanmean(named)
            self.row_labels[method] = ["before" if i == 0 else f"stage {i}" for i in range(n_stages)]
            delivered = [_reindex(np.array([r.final_per_task]), r.tasks, self.tasks)[0] for r in mine
                         if r.final_per_task is not None and len(r.final_per_task) == len(r.tasks)]
            if delivered:  # one-model-per-task plans deliver each task's specialist, not the last stage's model
                delivered_mean = _nanmean(np.stack(delivered))
                if not np.allclose(delivered_mean, self.by_name[method][-1], equal_nan=True):
                    self.by_name[method] = np.vstack([self.by_name[method], delivered_mean])
                    self.row_labels[method].append("delivered")
            self.by_position[method] = (_nanmean(positional), _nanreduce(np.min, positional),
                                        _nanreduce(np.max, positional))
            orders = {tuple(r.tasks) for r in mine}
            self.position_names[method] = [short_task_name(t) for t in next(iter(orders))] if len(orders) == 1 else None
            self.finals[method] = {o: [r.values["final_average"] for r in mine if r.ordering == o]
                                   for o in self.orderings}
            self.n_runs[method] = len(mine)
        finite = np.concatenate([m[np.isfinite(m)] for m in self.by_name.values()]) if self.by_name else np.array([])
        self.vmin, self.vmax = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) \
            else (float(finite.min()), float(finite.max()))


def _reindex(R: np.ndarray, tasks: list[str], canonical: list[str]) -> np.ndarray:
    """Columns of a run's R (its own order) rearranged into the canonical task order, by name."""
    col = {t: i for i, t in enumerate(tasks)}
    out = np.full((R.shape[0], len(canonical)), np.nan)
    for j, t in enumerate(canonical):
        if t in col and col[t] < R.shape[1]:
            out[:, j] = R[:, col[t]]
    return out


def _pad(R: np.ndarray, rows: int, cols: int | None = None) -> np.ndarray:
    cols = R.shape[1] if cols is None else cols
    out = np.full((rows, cols), np.nan)
    out[: R.shape[0], : min(cols, R.shape[1])] = R[:, :cols]
    return out


def _nanmean(stack: np.ndarray) -> np.ndarray:
    """Mean over runs ignoring NaN cells; all-NaN cells stay NaN (without numpy's warning)."""
    valid = ~np.isnan(stack)
    count = valid.sum(axis=0)
    total = np.where(valid, stack, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanreduce(reduce, stack: np.ndarray) -> np.ndarray:
    """min/max over runs ignoring NaN cells; all-NaN cells stay NaN."""
    valid = ~np.isnan(stack)
    fill = np.inf if reduce is np.min else -np.inf
    return np.where(valid.any(axis=0), reduce(np.where(valid, stack, fill), axis=0), np.nan)


# ---- figures ---------------------------------------------------------------------------------------------------

def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def render(draw, views: Views) -> Figure:
    """``draw(fig, views)`` into a new figure with matplotlib's default style (nnU-Net changes the global one), its
    titles fitted inside it (`plots.fit_titles`)."""
    with matplotlib.style.context("default"):
        fig = new_figure(1, 1)
        draw(fig, views)
        return fit_titles(fig)


def png(draw, views: Views) -> str:
    """`render` -> base64 PNG."""
    fig = render(draw, views)
    buffer = io.BytesIO()
    with matplotlib.style.context("default"):
        fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def draw_heatmaps(fig, views: Views) -> None:
    n_rows, n_cols = _grid(len(views.methods))
    if isinstance(fig, Figure):
        fig.set_size_inches(max(6.0, 3.3 * n_cols + 1.0), 0.6 + 0.45 * len(views.tasks) + 2.6 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = None
    for ax, method in zip(axes.flat, views.methods):
        R = views.by_name[method]
        image = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=views.vmin, vmax=views.vmax, aspect="auto")
        mid = (views.vmin + views.vmax) / 2
        for i, j in itertools.product(range(R.shape[0]), range(R.shape[1])):
            v = R[i, j]
            ax.text(j, i, "—" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if math.isnan(v) or v > mid else "white")
        ax.set_xticks(range(len(views.tasks)), [short_task_name(t) for t in views.tasks], rotation=30, ha="right",
                      fontsize=8)
        ax.set_yticks(range(R.shape[0]), views.row_labels[method], fontsize=8)
        ax.set_title(f"{method} (n={views.n_runs[method]})", fontsize=10)
    for ax in list(axes.flat)[len(views.methods):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"mean {views.metric}", shrink=0.8)
    fig.suptitle(f"Mean R per method: rows = stage (by position), columns = task (by name); last row = final "
                 f"{views.metric} per task delivered", fontsize=10)


def draw_curves(fig, views: Views) -> None:
    n_rows, n_cols = _grid(len(views.methods))
    if isinstance(fig, Figure):
        fig.set_size_inches(max(6.0, 3.4 * n_cols + 1.0), 0.6 + 2.8 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, views.methods):
        mean, low, high = views.by_position[method]
        x = np.arange(mean.shape[0])
        names = views.position_names[method]
        for j in range(mean.shape[1]):
            if np.all(np.isnan(mean[:, j])):
                continue
            label = f"{j + 1}: {names[j]}" if names and j < len(names) else f"trained {_ordinal(j + 1)}"
            (line,) = ax.plot(x, mean[:, j], marker="o", markersize=3, label=label)
            ax.fill_between(x, low[:, j], high[:, j], color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xticks(x, ["before" if i == 0 else str(i) for i in x], fontsize=8)
        ax.set_xlabel("stage", fontsize=8)
        if views.vmin == 0.0 and views.vmax == 1.0:
            ax.set_ylim(0.0, 1.02)
        ax.set_title(f"{method} (n={views.n_runs[method]})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[:, 0]:
        ax.set_ylabel(views.metric)
    for ax in list(axes.flat)[len(views.methods):]:
        ax.set_visible(False)
    fig.suptitle("Per-task curves by position (task trained 1st, 2nd, ...): mean over runs, band = min to max",
                 fontsize=10)


def draw_ordering(fig, views: Views) -> None:
    if isinstance(fig, Figure):
        fig.set_size_inches(max(6.0, 0.9 * len(views.methods) + 3.0), 4.0)
    ax = fig.subplots()
    markers = "osD^vP*Xh<>"
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.6
    n_ord = max(1, len(views.orderings))
    labelled: set[str] = set()
    for m, method in enumerate(views.methods):
        means = []
        for k, ordering in enumerate(views.orderings):
            values = [v for v in views.finals[method][ordering] if not math.isnan(v)]
            if not values:
                continue
            x = m + (k - (n_ord - 1) / 2) * width / n_ord
            ax.scatter([x] * len(values), values, s=10, color="grey", alpha=0.6, zorder=2)
            means.append(float(np.mean(values)))
            ax.scatter([x], [means[-1]], s=45, marker=markers[k % len(markers)], color=colors[k % len(colors)],
                       zorder=3, label=None if ordering in labelled else ordering)
            labelled.add(ordering)
        if len(means) > 1:
            ax.vlines(m, min(means), max(means), color="black", linewidth=1.2, alpha=0.5, zorder=1)
            ax.annotate(f"range {max(means) - min(means):.3f}", (m, max(means)), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xticks(range(len(views.methods)), views.methods, rotation=30, ha="right")
    ax.set_ylabel(f"final average {views.metric}")
    ax.set_title("Ordering sensitivity: mean final average per ordering (markers), single seeds (grey), "
                 "range over orderings", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if views.orderings:
        ax.legend(title="ordering", fontsize=8, loc="best")


def draw_table(fig, table: pd.DataFrame) -> None:
    ax = fig.subplots()
    ax.axis("off")
    header = ["method", "runs"] + [h for _, h, _ in TABLE_COLUMNS]
    cells = [[row["method"], f"{row['runs_finished']}/{row['runs_listed']}"]
             + [mean_std(row, col, kind) for col, _, kind in TABLE_COLUMNS]
             for _, row in table.iterrows()]
    t = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.scale(1.0, 1.2)
    ax.set_title("Methods: mean ± std over orderings and seeds", fontsize=10)
