"""PNG figures of a run (result-matrix heatmap, per-task curves) and of a method comparison.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot global state, no display
needed) and written atomically so a report never links a half-written image.
"""
from __future__ import annotations

import functools
import math
import os

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from lifelong_nnunet.io_utils import atomic_write

from .metrics import metric_spec


def _default_style(plot):
    """Draw with matplotlib's defaults: nnU-Net's progress plots change global style (seaborn font_scale 2.5)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.style.context("default"):
            return plot(*args, **kwargs)
    return wrapper


@_default_style
def plot_result_matrix(
    R: pd.DataFrame,
    path: str | os.PathLike,
    title: str,
    row_labels: list[str] | None = None,
    value_label: str = "mean foreground Dice",
    vmax: float | None = 1.0,
    higher_is_better: bool = True,
) -> Figure:
    """Heatmap of R (rows = stages, columns = tasks); each cell shows its value, NaN (not evaluated) cells are
    grey. The scale is fixed to 0..``vmax`` so runs compare by eye (``vmax=None``: the largest value, for a
    metric in mm); for a lower-is-better metric the colour map is reversed, so bright always means good. Returns the
    figure (its layout can be inspected)."""
    values = R.to_numpy(dtype=float)
    labels = row_labels if row_labels is not None else _default_row_labels(R)
    n_rows, n_cols = values.shape
    if vmax is None:
        vmax = float(np.nanmax(values)) if np.isfinite(values).any() and np.nanmax(values) > 0 else 1.0
    fig = new_figure(max(4.0, 1.3 * n_cols + 3.0), max(2.5, 0.5 * n_rows + 1.5))
    ax = fig.add_subplot()
    cmap: Colormap = matplotlib.colormaps["viridis" if higher_is_better else "viridis_r"]
    cmap = cmap.with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            bright = (v / vmax > 0.6) if higher_is_better else (v / vmax < 0.4)  # viridis is bright at its top
            text, color = ("—", "black") if math.isnan(v) else (f"{v:.3f}", "black" if bright else "white")
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(n_cols), [str(c) for c in R.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), labels)
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=value_label)
    _save(fig, path)
    return fig


@_default_style
def plot_task_curves(
    R: pd.DataFrame,
    path: str | os.PathLike,
    row_labels: list[str] | None = None,
    trained_stage: dict[str, int] | None = None,
    title: str = "Dice per task over the training sequence",
    ylabel: str = "mean foreground Dice",
    ylim: tuple[float, float] | None = (0.0, 1.02),
) -> None:
    """One line per task across stages; a dotted vertical line in the task's colour marks the stage that
    trained it, so rises (learning) and later drops (forgetting) read directly. ``ylim=None`` scales the axis
    to the data (a metric in mm)."""
    labels = row_labels if row_labels is not None else _default_row_labels(R)
    x = np.arange(len(R.index))
    fig = new_figure(max(5.0, 1.1 * len(x) + 2.0), 3.8)
    ax = fig.add_subplot()
    for task in R.columns:
        (line,) = ax.plot(x, R[task].to_numpy(dtype=float), marker="o", label=str(task))
        if trained_stage and trained_stage.get(task) in R.index:
            ax.axvline(R.index.get_loc(trained_stage[task]), color=line.get_color(), linestyle=":", alpha=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(bottom=0.0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


@_default_style
def plot_method_comparison(summaries: dict[str, dict], path: str | os.PathLike,
                           ylabel: str = "Dice / Dice difference", title: str = "Method comparison") -> None:
    """Grouped bars per method: final average, BWT and each task's final Dice (or the metric ``ylabel`` names).

    ``summaries`` maps a method name to its summary (keys ``tasks``, ``final_average``, ``bwt``,
    ``final_per_task`` as produced with ``continual_metrics``); undefined values get no bar.
    """
    tasks: list[str] = []
    for summary in summaries.values():
        tasks += [t for t in summary.get("tasks", []) if t not in tasks]
    groups = ["final average", "BWT"] + [f"final: {t}" for t in tasks]
    methods = list(summaries)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    fig = new_figure(max(5.0, 1.2 * len(groups) + 2.0), 4.0)
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        s = summaries[method]
        per_task = dict(zip(s.get("tasks", []), s.get("final_per_task") or []))
        heights = [s.get("final_average"), s.get("bwt")] + [per_task.get(t) for t in tasks]
        ax.bar(
            x + (k - (len(methods) - 1) / 2) * width,
            [math.nan if h is None else h for h in heights],
            width,
            label=method,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


@_default_style
def plot_tradeoff(scores: list[dict], chosen: str | None, path: str | os.PathLike, method: str,
                  metric: str = "dice") -> Figure:
    """A tune's stability-plasticity trade-off: left, mean forgetting against plasticity (the new task's score
    right after training it), one point per setting with its label, the chosen one starred and the sequential
    reference crossed; right, each setting's final average validation score (error bars: sd over seeds).
    ``scores``: `tuning.score_settings`'s entries. Settings with an undefined value are left out of a panel."""
    fig = new_figure(11.0, 4.5)
    left, right = fig.subplots(1, 2)
    for e in scores:
        x, y = e.get("mean_forgetting"), e.get("plasticity")
        if x is None or y is None:
            continue
        style = (dict(marker="*", s=220, color="tab:red", zorder=3) if e["label"] == chosen else
                 dict(marker="X", s=90, color="black", zorder=2) if e["reference"] else
                 dict(marker="o", s=50, color="tab:blue", zorder=2))
        left.scatter([x], [y], **style)
        left.errorbar([x], [y], xerr=e.get("mean_forgetting_sd") or 0, yerr=e.get("plasticity_sd") or 0,
                      fmt="none", ecolor="grey", elinewidth=0.8, zorder=1)
        left.annotate(e["label"], (x, y), textcoords="offset points", xytext=(6, -12 if e["reference"] else 4),
                      fontsize=8)  # the reference below: a setting equal to it (a zero weight) must stay readable
    metric = metric_spec(metric).display
    left.set_xlabel(f"mean forgetting ({metric}; lower is more stable)")
    left.set_ylabel(f"plasticity ({metric} on each new task)")
    left.set_title(f"{method}: stability against plasticity, on validation cases")
    left.grid(alpha=0.3)
    labels = [e["label"] for e in scores]
    heights = [math.nan if e.get("final_average") is None else e["final_average"] for e in scores]
    errors = [e.get("final_average_sd") or 0.0 for e in scores] if any(e.get("final_average_sd") for e in scores) \
        else None
    colors = ["tab:red" if lab == chosen else "black" if e["reference"] else "tab:blue"
              for lab, e in zip(labels, scores)]
    right.bar(np.arange(len(labels)), heights, yerr=errors, color=colors, capsize=3)
    right.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    right.set_ylabel(f"final average {metric} (validation)")
    right.set_title("the score the choice is made on (red: chosen, black: sequential)")
    right.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return fig


def _default_row_labels(R: pd.DataFrame) -> list[str]:
    return ["before training" if s == 0 else f"after stage {s}" for s in R.index]


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot state, no display), laid out by constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def fit_titles(fig: Figure) -> Figure:
    """Break every title (axes titles, and the suptitles of the figure and its subfigures) at spaces so that it lies
    inside the figure; returns ``fig``.

    Matplotlib neither shrinks nor wraps a title to its figure (constrained layout makes room above a title, never
    beside it), so a centred title wider than the figure is cut at both edges. The widths are the laid-out ones:
    the figure is laid out first, and once more after wrapping (taller titles move the axes, never their centres
    sideways by much). A title centred at ``x`` may be ``2 * min(x - left, right - x)`` wide."""
    for _ in range(2):
        fig.draw_without_rendering()
        renderer, box = fig.canvas.get_renderer(), fig.bbox
        for text, centre in _titles(fig):
            room = 0.96 * 2 * min(centre - box.x0, box.x1 - centre)
            text.set_text(_wrapped(text.get_text(), text, room, renderer))
    return fig


def _titles(fig: Figure):
    """(title, the x of its centre in pixels) for every non-empty title of ``fig``, its subfigures and axes."""
    figures, queue = [], [fig]
    while queue:
        figures.append(queue.pop())
        queue += figures[-1].subfigs
    for f in figures:
        if f._suptitle is not None and f._suptitle.get_text():  # matplotlib has no public handle on the suptitle
            yield f._suptitle, f.bbox.x0 + f._suptitle.get_position()[0] * f.bbox.width
    for ax in fig.get_axes():
        if ax.get_visible() and ax.title.get_text():
            yield ax.title, ax.bbox.x0 + ax.bbox.width / 2


def _wrapped(text: str, artist, width: float, renderer) -> str:
    """``text`` (its line breaks dropped) in greedy lines of at most ``width`` pixels in ``artist``'s font."""
    font = artist.get_fontproperties()

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= width

    lines: list[str] = []
    for word in text.replace("\n", " ").split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    fit_titles(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
