"""The comparison report as one self-contained HTML page: report.html.j2 holds the page, this module the values.

Everything handed to the template is text (numbers already formatted), escaped by the template engine, so a method
or path name can never inject markup.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd

from ... import __version__
from ...run_folder import ComparisonFiles, SweepFolder
from .load import SweepRun
from .tables import TABLE_COLUMNS, TENTATIVE_BELOW, UNDEFINED, fmt, mean_std_parts

TEMPLATE = "report.html.j2"


def render_html(sweep_dir: Path, sweep: dict, metric: str, higher: bool, runs: list[SweepRun], table: pd.DataFrame,
                pairs: pd.DataFrame, figures: dict[str, str], files: ComparisonFiles) -> str:
    """The page: ``figures`` maps heatmaps/curves/ordering to base64 PNGs (empty when no run has finished)."""
    return _template().render(
        name=sweep_dir.name, metric=metric, higher=higher, version=__version__,
        n_runs=len(runs), n_missing=sum(r.status != "ok" for r in runs),
        spec=json.dumps(sweep["spec"], indent=2, default=str), commands=[str(c) for c in sweep["commands"]],
        versions=[(k, "not installed" if v is None else v) for k, v in sweep["versions"].items()],
        sweep_file=SweepFolder(sweep_dir).sweep_file.name,
        columns=[heading for _, heading, _ in TABLE_COLUMNS],
        methods=[{"method": row["method"], "finished": row["runs_finished"], "listed": row["runs_listed"],
                  "missing": row["runs_missing"], "spread": fmt(row["ordering_spread"]),
                  "cells": [mean_std_parts(row, col, kind) for col, _, kind in TABLE_COLUMNS]}
                 for _, row in table.iterrows()],
        missing=[r for r in runs if r.status != "ok"],
        confidence=round(100 * (pairs["confidence"].iloc[0] if len(pairs) else 0.95)),
        tentative_below=TENTATIVE_BELOW, pairs=[_pair(p) for _, p in pairs.iterrows()],
        figures=figures,
        runs=[{"method": r.method, "ordering": r.ordering, "seed": r.seed, "status": r.status, "ok": r.status == "ok",
               "cells": [fmt(r.values.get(c, math.nan), k) for c, _, k in TABLE_COLUMNS]} for r in runs],
        files={part: files.table(part).name for part in ("methods", "runs", "pairs")},
    )


def _pair(p: pd.Series) -> dict:
    """One row of the paired statistics: the verdict names the better method; few pairs make it tentative."""
    separated = p["verdict"] in ("A better", "B better")
    verdict = {"A better": f"{p['method_a']} better", "B better": f"{p['method_b']} better"}.get(p["verdict"],
                                                                                               p["verdict"])
    ci = UNDEFINED if math.isnan(p["ci_low"]) else f"[{fmt(p['ci_low'], '+')}, {fmt(p['ci_high'], '+')}]"
    return {"a": p["method_a"], "b": p["method_b"], "n_pairs": p["n_pairs"], "mean_diff": fmt(p["mean_diff"], "+"),
            "ci": ci, "verdict": verdict, "separated": separated,
            "tentative": separated and p["n_pairs"] < TENTATIVE_BELOW}


def _template() -> jinja2.Template:
    text = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.from_string(text)
