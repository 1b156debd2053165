"""Running a sweep's runs locally: one after the other, in this process (no extra dependency)."""
from __future__ import annotations

from pathlib import Path

from ..console import RunLog
from .gather import headline
from .plan import PlannedRun


def execute_run(experiment: dict, run_dir: str, quiet: bool) -> dict:
    """One run, in this process: an ordinary ``run_experiment`` call (resumes, or returns a finished summary)."""
    from ..experiment import experiment_from_dict
    from ..runner import run_experiment
    return run_experiment(experiment_from_dict(dict(experiment), f"sweep run {run_dir}"), run_dir, quiet=quiet)


def run_locally(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], index: dict, log: RunLog,
                quiet: bool) -> None:
    """Sequential, in this process, with each run's own progress bars (Ctrl-C stops between or inside a run;
    finished runs stay finished, the interrupted one resumes from its last epoch)."""
    for r in pending:
        log(f"[{index[r.path]}/{len(runs)}] {r.label}: running ({' -> '.join(r.order)})")
        summary = execute_run(r.experiment, str(sweep_dir / r.path), quiet)
        log(f"[{index[r.path]}/{len(runs)}] {r.label}: done, {headline(summary)}")
