"""Gathering a sweep: one row per run with its headline metrics (runs.csv), and the cross-run comparison report."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..evaluation.metrics import metric_spec
from ..run_folder import SweepFolder
from .plan import PlannedRun

# summary.json keys that runs.csv carries, next to the run's place in the plan
HEADLINE_KEYS = ("final_average", "bwt", "fwt", "mean_forgetting", "train_seconds")


def headline(summary: dict | None) -> str:
    """``final avg Dice 0.412`` (or the run's own headline metric)."""
    summary = summary or {}
    name = metric_spec(str(summary.get("metric", "dice"))).display
    value = summary.get("final_average")
    return f"final avg {name} {value:.3f}" if isinstance(value, (int, float)) else f"final avg {name} n/a"


def gather(sweep_dir: Path, runs: list[PlannedRun], write: bool = True) -> list[dict]:
    """One row per run with its headline metrics (from each run's summary.json), also written to runs.csv once a
    run has finished. A run without summary.json gives a row with ``finished`` False and empty metrics."""
    folder = SweepFolder(sweep_dir)
    rows = []
    for r in runs:
        run = folder.run(r.path)
        s = run.read_summary() if run.summary.is_file() else {}
        rows.append({**{k: v for k, v in r.to_json().items() if k != "order"}, "order": " > ".join(r.order),
                     "finished": bool(s), **{k: s.get(k) for k in HEADLINE_KEYS}})
    if write and any(row["finished"] for row in rows):
        folder.write_runs_table(rows)
    return rows


def write_comparison(sweep_dir: Path, log: Callable[[str], None]) -> None:
    """The cross-run comparison report, when this installation has it (lifelong_nnunet.evaluation.comparison)."""
    try:
        from ..evaluation.comparison import write_comparison_report
    except ImportError as e:
        log(f"No comparison report written: lifelong_nnunet.evaluation.comparison is not available ({e}). The runs "
            f"and {SweepFolder(sweep_dir).runs_table.name} are complete.")
        return
    log(f"Comparison report: {write_comparison_report(sweep_dir)}")
