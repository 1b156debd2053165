"""The comparison's tables: per method (mean and spread over its runs) and per pair of methods (paired bootstrap),
and how their cells are written."""
from __future__ import annotations

import itertools
import math

import pandas as pd

from ..metrics import metric_spec
from ..stats import paired_bootstrap

# (runs_frame column, table heading, format) in table order; "d" = 3 decimals, "s" = seconds, "n" = a count.
TABLE_COLUMNS = [
    ("final_average", "final average", "d"),
    ("bwt", "BWT", "d"),
    ("fwt", "FWT", "d"),
    ("forgetting", "mean forgetting", "d"),
    ("gap_to_joint", "gap to joint", "d"),
    ("train_seconds", "training time (s)", "s"),
    ("model_parameters", "model size (parameters)", "n"),
]
# Below this many pairs even an exact sign-flip test cannot reach p < 0.05, so a named side is marked tentative.
TENTATIVE_BELOW = 6
UNDEFINED = "—"


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
    higher = higher_is_better(runs, metric)
    rows = []
    for a, b in itertools.combinations(methods, 2):
        sa, sb = by_method.get(a, pd.Series(dtype=float)), by_method.get(b, pd.Series(dtype=float))
        keys = sorted(set(sa.index) & set(sb.index), key=str)
        result = paired_bootstrap([sa[k] for k in keys], [sb[k] for k in keys], n_boot=n_boot,
                                  confidence=confidence, seed=seed, higher_is_better=higher)
        rows.append({"method_a": a, "method_b": b, **result.as_dict()})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "mean_diff", "ci_low", "ci_high", "n_pairs",
                                       "confidence", "verdict"])


def higher_is_better(runs: pd.DataFrame, metric: str) -> bool:
    """The metric's direction as the finished runs stored it, else from its name."""
    stored = runs.loc[runs["status"] == "ok", "higher_is_better"].dropna()
    return bool(stored.iloc[0]) if len(stored) else metric_spec(metric).higher_is_better


def fmt(value: float | None, kind: str = "d") -> str:
    """A table cell: "d" 3 decimals, "+" signed 3 decimals, "s" whole seconds, "n" a count (millions when large)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNDEFINED
    if kind == "s":
        return f"{value:.0f}"
    if kind == "n":
        return f"{value / 1e6:.3f} M" if abs(value) >= 1e5 else f"{value:,.0f}"
    return f"{value:+.3f}" if kind == "+" else f"{value:.3f}"


def mean_std_parts(row, col: str, kind: str) -> tuple[str, str | None]:
    """The mean of ``col`` in a method_table row and its spread (None for a single run: no spread to show)."""
    mean, std = row[f"{col}_mean"], row[f"{col}_std"]
    if math.isnan(mean):
        return UNDEFINED, None
    return fmt(mean, kind), None if math.isnan(std) else fmt(std, kind)


def mean_std(row, col: str, kind: str) -> str:
    """``0.400 ± 0.082`` (or the mean alone), for tables drawn outside HTML."""
    mean, std = mean_std_parts(row, col, kind)
    return mean if std is None else f"{mean} ± {std}"
