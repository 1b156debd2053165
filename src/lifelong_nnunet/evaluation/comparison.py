"""The comparison report of a sweep (methods x orderings x seeds): one self-contained HTML file plus CSV tables.

Everything is read from stored files (sweep.json, each run's summary.json, results.csv, schedule.json and the
stage models' ``info``), so the report re-renders at any time without retraining, also while a sweep is still
running: a run without summary.json is shown as missing, never an error.

Permuted orderings. Each run stores R with its columns in *its own* training order, so R[i, j] of two
orderings are different tasks. The report therefore uses two views (docs/comparison.md):

- by task name: the heatmap's columns are tasks in the first finished run's order, re-indexed by name; its rows
  are stages by position ("after stage k" = after the k-th trained task, whichever it was). Its last row is
  each task's final score averaged over orderings and seeds (exact); with several orderings the earlier rows
  mix tasks at different points of their life and only read as "how good is this task after k stages".
- by position: the per-task curves follow "the task trained 1st, 2nd, ..." across stages, so learning at its
  own stage and forgetting afterwards line up across orderings.
"""
from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.style
import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import __version__
from ..errors import UserInputError
from ..io_utils import atomic_write, read_json, write_text
from ..runner import is_one_model_per_task, load_schedule, stored_parameter_count
from .continual import result_matrix
from .stats import paired_bootstrap

# (collect() column, table heading, format) in table order; "d" = 3 decimals, "s" = seconds, "n" = a count.
TABLE_COLUMNS = [
    ("final_average", "final average", "d"),
    ("bwt", "BWT", "d"),
    ("fwt", "FWT", "d"),
    ("forgetting", "mean forgetting", "d"),
    ("gap_to_joint", "gap to joint", "d"),
    ("train_seconds", "training time (s)", "s"),
    ("model_parameters", "model size (parameters)", "n"),
]
RUN_COLUMNS = ["method", "ordering", "seed", "order", "path", "status", "final_average", "bwt", "fwt", "forgetting",
               "plasticity", "gap_to_joint", "train_seconds", "peak_rss_mb", "model_parameters", "higher_is_better"]
# Metrics where smaller is better (distances), for summaries that do not store their direction
# (by_metric[...]["higher_is_better"] wins). It flips the verdicts and the sign of the gap to joint.
LOWER_IS_BETTER = {"hd", "hd95", "assd", "asd", "masd"}
JOINT = "joint"
# Below this many pairs even an exact sign-flip test cannot reach p < 0.05, so a named side is marked tentative.
TENTATIVE_BELOW = 6
# What reading a damaged or half-copied run folder raises (bad JSON/CSV/zip, missing key or file).
_DAMAGED = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, pickle.UnpicklingError,
            UserInputError)


@dataclass
class _Run:
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
    """sweep.json with its optional keys filled, or a UserInputError naming the folder."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise UserInputError(f"{path} is missing: {sweep_dir} is not a sweep folder. Give the folder the sweep "
                             f"command wrote (it holds sweep.json and runs/).")
    sweep = read_json(path)
    if not isinstance(sweep.get("runs"), list):
        raise UserInputError(f"{path} has no 'runs' list; it was not written by the sweep runner.")
    return {"spec": sweep.get("spec") or {}, "runs": sweep["runs"], "commands": sweep.get("commands") or [],
            "versions": sweep.get("versions") or {}}


def collect(sweep_dir: str | os.PathLike, metric: str = "dice") -> pd.DataFrame:
    """One row per run listed in sweep.json (finished or not): the continual metrics of ``metric``, gap to the
    joint run of the same ordering and seed, training time and size of the delivered model.

    ``status`` is "ok", "missing" (not finished: no summary.json) or "unreadable" (reason in the report);
    metric columns are NaN unless "ok". ``forgetting`` is the mean forgetting over tasks.
    """
    return _frame(_load_runs(Path(sweep_dir), load_sweep(sweep_dir)["runs"], metric))


def method_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean and sample standard deviation (n-1) of each table column over its finished runs, the
    number of runs listed / finished / missing, and the ordering spread (max - min over orderings of the
    per-ordering mean final average; NaN with a single ordering)."""
    rows = []
    for method, group in runs.groupby("method", sort=False):
        ok = group[group["status"] == "ok"]
        row: dict = {"method": method, "runs_listed": len(group), "runs_finished": len(ok),
                     "runs_missing": len(group) - len(ok)}
        for col, _, _ in TABLE_COLUMNS:
            values = ok[col].astype(float).dropna()
            row[f"{col}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{col}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        per_ordering = ok.groupby("ordering")["final_average"].mean().dropna()
        row["ordering_spread"] = float(per_ordering.max() - per_ordering.min()) if len(per_ordering) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def pairwise_table(runs: pd.DataFrame, metric: str = "dice", column: str = "final_average", n_boot: int = 10000,
                   confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every pair of methods (A listed before B): the paired bootstrap of A - B in ``column`` over the
    (ordering, seed) pairs where both runs finished. "A better" follows the metric's direction."""
    ok = runs[runs["status"] == "ok"]
    by_method = {m: g.groupby(["ordering", "seed"])[column].mean() for m, g in ok.groupby("method")}
    methods = list(dict.fromkeys(runs["method"]))
    higher = _higher_is_better(runs, metric)
    rows = []
    for a, b in itertools.combinations(methods, 2):
        sa, sb = by_method.get(a, pd.Series(dtype=float)), by_method.get(b, pd.Series(dtype=float))
        keys = sorted(set(sa.index) & set(sb.index), key=str)
        result = paired_bootstrap([sa[k] for k in keys], [sb[k] for k in keys], n_boot=n_boot,
                                  confidence=confidence, seed=seed, higher_is_better=higher)
        rows.append({"method_a": a, "method_b": b, **result.as_dict()})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "mean_diff", "ci_low", "ci_high", "n_pairs",
                                       "confidence", "verdict"])


def _higher_is_better(runs: pd.DataFrame, metric: str) -> bool:
    """The metric's direction as the finished runs stored it, else from its name."""
    stored = runs.loc[runs["status"] == "ok", "higher_is_better"].dropna()
    return bool(stored.iloc[0]) if len(stored) else metric not in LOWER_IS_BETTER


def write_comparison_report(sweep_dir: str | os.PathLike, metric: str = "dice",
                            out: str | os.PathLike | None = None) -> Path:
    """Write the sweep's comparison.html (self-contained) and, next to it, comparison.csv (the methods table),
    comparison_runs.csv (one row per run) and comparison_pairs.csv (the pairwise statistics). Returns the HTML
    path. Reads stored results only."""
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    runs = _load_runs(sweep_dir, sweep["runs"], metric)
    frame = _frame(runs)
    table, pairs = method_table(frame), pairwise_table(frame, metric)
    out = Path(out) if out is not None else sweep_dir / "comparison.html"
    for suffix, df in (("", table), ("_runs", frame), ("_pairs", pairs)):
        csv = out.with_name(f"{out.stem}{suffix}.csv")
        atomic_write(csv, lambda tmp, df=df: df.to_csv(tmp, index=False))
    views = _Views(runs, metric)
    figures = {}
    if views.methods:
        figures = {
            "heatmaps": _png(_draw_heatmaps, views),
            "curves": _png(_draw_curves, views),
            "ordering": _png(_draw_ordering, views),
        }
    higher = _higher_is_better(frame, metric)
    write_text(out, _html(sweep_dir, sweep, metric, higher, runs, table, pairs, figures, out.stem))
    return out


def render_summary_png(sweep_dir: str | os.PathLike, out_png: str | os.PathLike, metric: str = "dice") -> Path:
    """The report's main panel in one PNG (methods table, mean-R heatmaps, ordering sensitivity), for docs:
    the HTML itself cannot be screenshotted without a browser."""
    sweep_dir = Path(sweep_dir)
    runs = _load_runs(sweep_dir, load_sweep(sweep_dir)["runs"], metric)
    views = _Views(runs, metric)
    if not views.methods:
        raise UserInputError(f"no run of {sweep_dir} has finished yet: nothing to draw.")
    table = method_table(_frame(runs))
    n_rows_heat = math.ceil(len(views.methods) / 4)
    with matplotlib.style.context("default"):
        table_height = 0.6 + 0.25 * len(table)
        fig = _figure(max(12.0, 3.2 * min(4, len(views.methods))), table_height + 3.2 * n_rows_heat + 3.6)
        top, mid, bottom = fig.subfigures(3, 1, height_ratios=[table_height, 3.2 * n_rows_heat, 3.6])
        _draw_table(top, table)
        _draw_heatmaps(mid, views)
        _draw_ordering(bottom, views)
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return Path(out_png)


# ---- loading ---------------------------------------------------------------------------------------------------

def _load_runs(sweep_dir: Path, entries: list[dict], metric: str) -> list[_Run]:
    runs = []
    for e in entries:
        run = _Run(str(e.get("method", "?")), str(e.get("ordering", "?")), int(e.get("seed", 0)),
                   [str(t) for t in e.get("order") or []], sweep_dir / str(e.get("path", "")))
        if not run.path.is_dir():
            run.reason = "run folder not created yet"
        elif not (run.path / "summary.json").is_file():
            run.reason = "not finished (no summary.json)"
        else:
            try:
                _read_finished(run, metric)
                run.status = "ok"
            except _DAMAGED as error:  # a damaged run must not hide the others; the report names it
                run.status, run.reason = "unreadable", f"{type(error).__name__}: {error}"
        runs.append(run)
    _add_gap_to_joint(runs)
    finished = [r for r in runs if r.status == "ok"]
    if finished and not any(r.values.get("metric_found") for r in finished):
        raise UserInputError(f"metric '{metric}' is not stored in any finished run of {sweep_dir} "
                             f"(results.csv 'metric' column). Use one that is, e.g. 'dice' or 'iou'.")
    return runs


def _read_finished(run: _Run, metric: str) -> None:
    """Metrics from summary.json (its ``by_metric`` entry when present), R re-computed from results.csv only
    when the summary lacks it, train time / peak memory / size from the stage models' stored info."""
    summary = read_json(run.path / "summary.json")
    run.tasks = [str(t) for t in summary["tasks"]]
    source = (summary.get("by_metric") or {}).get(metric)
    if source is None and summary.get("metric", "dice") == metric:
        source = summary
    found = source is not None
    R = source.get("R") if source else None
    if R is None:
        results = pd.read_csv(run.path / "results.csv")
        stored = bool((results["metric"] == metric).any())
        found = found or stored
        if stored:
            R = result_matrix(results, run.tasks, metric).to_numpy(dtype=float)
            if source is None:
                # the run's own definitions, for a metric its summary lacks
                from .summary import summarize
                source = summarize(run.path, metric)
    source = source or {}
    run.R = None if R is None else np.asarray(R, dtype=float)
    final = source.get("final_per_task")
    run.final_per_task = None if final is None else [_num(v) for v in final]
    forgetting = source.get("mean_forgetting", source.get("forgetting"))
    run.values = {
        "metric_found": found,
        "final_average": _num(source.get("final_average")),
        "bwt": _num(source.get("bwt")),
        "fwt": _num(source.get("fwt")),
        "forgetting": _num(forgetting) if not isinstance(forgetting, list) else math.nan,
        "plasticity": _num(source.get("plasticity")),
        "higher_is_better": bool(source.get("higher_is_better", metric not in LOWER_IS_BETTER)),
        **_stage_model_stats(run.path),
    }


def _stage_model_stats(run_dir: Path) -> dict:
    """Sum of the stages' train_seconds, max peak RSS, and the parameters of the delivered model: the last
    stage's network, or the sum of the per-task specialists for a one-model-per-task plan. Parameters count every
    floating-point tensor stored in network_weights (nnU-Net's InstanceNorm keeps no running statistics, so these
    are the learnable weights)."""
    schedule = load_schedule(run_dir)
    seconds, peaks, sizes = 0.0, [], {}
    for stage in schedule:
        path = run_dir / "stages" / f"stage_{stage.index}" / "model.pt"
        if not path.is_file():
            continue
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        info = payload.get("info") or {}
        seconds += float(info.get("train_seconds", 0.0))
        if "peak_rss_mb" in info:
            peaks.append(float(info["peak_rss_mb"]))
        sizes[stage.index] = stored_parameter_count(payload["network_weights"])
    if is_one_model_per_task(schedule):
        complete = all(s.index in sizes for s in schedule)
        size = float(sum(sizes.values())) if complete else math.nan
    else:
        last = max((s.index for s in schedule), default=None)
        size = float(sizes[last]) if last in sizes else math.nan
    return {"train_seconds": seconds, "peak_rss_mb": max(peaks) if peaks else math.nan, "model_parameters": size}


def _add_gap_to_joint(runs: list[_Run]) -> None:
    """final_average minus the joint run's of the same ordering and seed (the other way round for a
    lower-is-better metric, so negative always means worse than joint); NaN without a finished joint run."""
    joint = {(r.ordering, r.seed): r.values["final_average"] for r in runs if r.method == JOINT and r.status == "ok"}
    for r in runs:
        if r.status == "ok":
            ref = joint.get((r.ordering, r.seed), math.nan)
            sign = 1.0 if r.values["higher_is_better"] else -1.0
            r.values["gap_to_joint"] = sign * (r.values["final_average"] - ref)


def _frame(runs: list[_Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"method": r.method, "ordering": r.ordering, "seed": r.seed, "order": " > ".join(r.order),
               "path": str(r.path), "status": r.status}
        row.update({c: r.values.get(c, math.nan) for c in RUN_COLUMNS if c not in row})
        rows.append(row)
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _num(value) -> float:
    return math.nan if value is None else float(value)


# ---- aggregated views for the figures -------------------------------------------------------------------------

class _Views:
    """Per method: the mean R by task name, the mean curves by position, final averages per ordering."""

    def __init__(self, runs: list[_Run], metric: str) -> None:
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
            self.position_names[method] = [_short(t) for t in next(iter(orders))] if len(orders) == 1 else None
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


def _short(task: str) -> str:
    """Dataset011_HippoSiteA -> HippoSiteA; a folder path -> its name."""
    name = Path(task).name or task
    return name.split("_", 1)[-1] if name.startswith("Dataset") else name


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


# ---- figures ---------------------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(draw, views: _Views) -> str:
    """Draw into a new figure with matplotlib's default style (nnU-Net changes the global one) -> base64 PNG."""
    with matplotlib.style.context("default"):
        fig = _figure(1, 1)
        draw(fig, views)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def _draw_heatmaps(fig, views: _Views) -> None:
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
        ax.set_xticks(range(len(views.tasks)), [_short(t) for t in views.tasks], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(R.shape[0]), views.row_labels[method], fontsize=8)
        ax.set_title(f"{method} (n={views.n_runs[method]})", fontsize=10)
    for ax in list(axes.flat)[len(views.methods):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"mean {views.metric}", shrink=0.8)
    fig.suptitle(f"Mean R per method: rows = stage (by position), columns = task (by name); last row = final "
                 f"{views.metric} per task delivered", fontsize=10)


def _draw_curves(fig, views: _Views) -> None:
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


def _draw_ordering(fig, views: _Views) -> None:
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


def _draw_table(fig, table: pd.DataFrame) -> None:
    ax = fig.subplots()
    ax.axis("off")
    header = ["method", "runs"] + [h for _, h, _ in TABLE_COLUMNS]
    cells = [[row["method"], f"{row['runs_finished']}/{row['runs_listed']}"]
             + [_mean_std(row, col, kind, html_out=False) for col, _, kind in TABLE_COLUMNS]
             for _, row in table.iterrows()]
    t = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.scale(1.0, 1.2)
    ax.set_title("Methods: mean ± std over orderings and seeds", fontsize=10)


# ---- HTML ------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}
pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:.85em}
.missing{color:#a40000;font-weight:bold}.sep{font-weight:bold}.ns{color:#666}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.9em}
"""


def _fmt(value: float, kind: str = "d") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "s":
        return f"{value:.0f}"
    if kind == "n":
        return f"{value / 1e6:.3f} M" if abs(value) >= 1e5 else f"{value:,.0f}"
    return f"{value:+.3f}" if kind == "+" else f"{value:.3f}"


def _mean_std(row, col: str, kind: str, html_out: bool = True) -> str:
    mean, std = row[f"{col}_mean"], row[f"{col}_std"]
    if math.isnan(mean):
        return "—"
    if math.isnan(std):  # a single run: no spread to show
        return _fmt(mean, kind)
    pm = " ± " if not html_out else " &plusmn; "
    return f"{_fmt(mean, kind)}{pm}{_fmt(std, kind)}"


def _esc(value) -> str:
    return html.escape(str(value))


def _html_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are trusted HTML (escape values before); the first ``left`` columns are left-aligned."""
    head = "".join(f"<th class='l'>{h}</th>" if i < left else f"<th>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(sweep_dir: Path, sweep: dict, metric: str, higher: bool, runs: list[_Run], table: pd.DataFrame, pairs: pd.DataFrame,
          figures: dict[str, str], stem: str) -> str:
    n_missing = sum(r.status != "ok" for r in runs)
    title = f"Method comparison: {_esc(sweep_dir.name)}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{title}</h1>",
             f"<p>Metric: <b>{_esc(metric)}</b>, {'higher' if higher else 'lower'} is better (mean over the "
             f"foreground labels of a case, then over the test cases). "
             f"{len(runs)} runs listed, {len(runs) - n_missing} finished"
             + (f", <span class='missing'>{n_missing} missing</span>" if n_missing else "")
             + f". Rendered by lifelong_nnunet {_esc(__version__)} from stored results (no retraining).</p>"]

    parts.append("<h2>Sweep</h2><h3>Specification</h3>")
    parts.append(f"<pre>{_esc(json.dumps(sweep['spec'], indent=2, default=str))}</pre>")
    parts.append("<h3>Commands that produced it</h3>")
    commands = sweep["commands"]
    parts.append(f"<pre>{_esc(chr(10).join(str(c) for c in commands))}</pre>" if commands
                 else "<p class='missing'>not recorded in sweep.json</p>")
    parts.append("<h3>Versions</h3>")
    versions = sweep["versions"]
    parts.append(_html_table(["package", "version"], [[_esc(k), "not installed" if v is None else _esc(v)] for k, v in versions.items()])
                 if versions else "<p class='missing'>not recorded in sweep.json</p>")

    parts.append("<h2>Methods</h2>")
    parts.append("<p>Mean &plusmn; sample standard deviation (n&minus;1) over the finished runs (orderings &times; "
                 "seeds); &ldquo;—&rdquo; = undefined for the method (e.g. BWT of joint); a value without &plusmn; comes from one run. "
                 "Gap to joint: final average minus the joint run of the same ordering and "
                 "seed. Ordering spread: max &minus; min over orderings of the mean final average.</p>")
    header = ["method", "runs finished / listed"] + [_esc(h) for _, h, _ in TABLE_COLUMNS] + ["ordering spread"]
    rows = []
    for _, row in table.iterrows():
        runs_cell = f"{row['runs_finished']} / {row['runs_listed']}"
        if row["runs_missing"]:
            runs_cell += f" <span class='missing'>({row['runs_missing']} missing)</span>"
        rows.append([_esc(row["method"]), runs_cell]
                    + [_mean_std(row, col, kind) for col, _, kind in TABLE_COLUMNS]
                    + [_fmt(row["ordering_spread"])])
    parts.append(_html_table(header, rows))
    missing = [r for r in runs if r.status != "ok"]
    if missing:
        parts.append("<h3 class='missing'>Missing runs</h3>")
        parts.append(_html_table(["method", "ordering", "seed", "path", "status"],
                                 [[_esc(r.method), _esc(r.ordering), _esc(r.seed), _esc(r.path),
                                   f"<span class='missing'>{_esc(r.status)}</span>: {_esc(r.reason)}"]
                                  for r in missing], left=5))

    parts.append("<h2>Paired statistics (final average)</h2>")
    parts.append(f"<p>For each pair, A &minus; B over the (ordering, seed) pairs where both finished: mean "
                 f"difference and a {round(100 * (pairs['confidence'].iloc[0] if len(pairs) else 0.95))}% "
                 f"percentile bootstrap interval (10000 resamples, seed 0). A side is named only when the interval "
                 f"excludes 0. With fewer than {TENTATIVE_BELOW} pairs it is marked tentative (docs/comparison.md).</p>")
    prow = []
    for _, p in pairs.iterrows():
        verdict = {"A better": f"{_esc(p['method_a'])} better", "B better": f"{_esc(p['method_b'])} better"}.get(
            p["verdict"], _esc(p["verdict"]))
        cls = "sep" if p["verdict"] in ("A better", "B better") else "ns"
        if cls == "sep" and p["n_pairs"] < TENTATIVE_BELOW:
            verdict += f" <span class='ns'>(tentative: {p['n_pairs']} pairs)</span>"
        ci = "—" if math.isnan(p["ci_low"]) else f"[{_fmt(p['ci_low'], '+')}, {_fmt(p['ci_high'], '+')}]"
        prow.append([_esc(p["method_a"]), _esc(p["method_b"]), str(p["n_pairs"]), _fmt(p["mean_diff"], "+"), ci,
                     f"<span class='{cls}'>{verdict}</span>"])
    parts.append(_html_table(["A", "B", "pairs", "mean difference A &minus; B", "CI", "verdict"], prow, left=2)
                 if prow else "<p>Fewer than two methods: nothing to compare.</p>")

    if figures:
        parts.append("<h2>Result matrix per method</h2>")
        parts.append("<p class='note'>Rows are stages by position (stage k = after the k-th trained task of that "
                     "run), columns are tasks by name in the first ordering. The last row is each task's final "
                     "score, averaged over orderings and seeds (&ldquo;delivered&rdquo; for one-model-per-task "
                     "methods: each task's own specialist, the diagonal). With several orderings the earlier rows mix runs in "
                     "which a task was or was not yet trained; use the curves below for learning and forgetting."
                     "</p>")
        parts.append(f"<img alt='mean result matrix per method' src='data:image/png;base64,{figures['heatmaps']}'>")
        parts.append("<h2>Per-task curves across stages</h2>")
        parts.append("<p class='note'>One line per training position (the task trained 1st, 2nd, ...), mean over "
                     "runs, shaded from the lowest to the highest run. A rise at its own stage is learning, a "
                     "later drop is forgetting. Where all runs of a method share one ordering the legend names the "
                     "tasks.</p>")
        parts.append(f"<img alt='per-task curves' src='data:image/png;base64,{figures['curves']}'>")
        parts.append("<h2>Ordering sensitivity</h2>")
        parts.append("<p class='note'>Final average per ordering (coloured marker: mean over seeds; grey dots: "
                     "single runs). The vertical line and its label give the range over orderings: a method whose "
                     "range is wide depends on the order in which tasks arrive.</p>")
        parts.append(f"<img alt='ordering sensitivity' src='data:image/png;base64,{figures['ordering']}'>")
    else:
        parts.append("<h2>Figures</h2><p class='missing'>No run has finished yet: no figures.</p>")

    parts.append("<h2>All runs</h2><details><summary>one row per run</summary>")
    parts.append(_html_table(
        ["method", "ordering", "seed", "status", "final average", "BWT", "FWT", "mean forgetting", "gap to joint",
         "train s", "parameters"],
        [[_esc(r.method), _esc(r.ordering), _esc(r.seed),
          _esc(r.status) if r.status == "ok" else f"<span class='missing'>{_esc(r.status)}</span>"]
         + [_fmt(r.values.get(c, math.nan), k) for c, _, k in TABLE_COLUMNS] for r in runs], left=4))
    parts.append("</details>")

    parts.append("<h2>How to read this</h2>")
    parts.append(
        "<p>Each run trains one method on one task ordering with one seed; every number in the methods table is "
        "the mean over those runs with its spread. Final average is what the last model achieves on all tasks "
        "(in its direction); BWT below 0 and forgetting above 0 measure what was lost on earlier tasks; FWT is "
        "what earlier tasks already give on a task before it is trained. Joint (all data at once) is the usual "
        "upper bound and the gap to it shows what the continual setting costs; a separate model per task costs "
        "T times the parameters. Compare two methods with the paired statistics, not by eye: pairs share the "
        "ordering and seed, so their difference cancels what the ordering does to both. A pair reads "
        "&ldquo;not separable&rdquo; when the interval contains 0: the sweep cannot tell those methods apart, "
        "whatever their means say. The interval comes from few runs and is optimistic (too narrow) when pairs "
        "are few; the ordering spread shows how much of a method's result is the luck of the order.</p>")
    parts.append(f"<p class='note'>Files next to this report: {_esc(stem)}.csv (methods table), "
                 f"{_esc(stem)}_runs.csv (one row per run), {_esc(stem)}_pairs.csv (pairwise statistics). "
                 f"Definitions: docs/metrics.md and docs/comparison.md.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
