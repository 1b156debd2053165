"""A sweep on a local Ray instance: two tiny real runs in parallel (one CPU each), gathered in the sweep folder.

"Local mode" here is a local Ray instance started by ``ray.init(num_cpus=2)`` without an address (Ray's old
``local_mode=True`` is deprecated). Ray is in the `test` extra, so this test runs in CI rather than being skipped.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
import ray

from lifelong_nnunet.sweep import run_sweep

pytestmark = pytest.mark.slow
TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}


def _span(run_dir: Path) -> tuple[dt.datetime, dt.datetime]:
    """First and last time stamp of a run's run.log: when the run worked."""
    lines = (run_dir / "run.log").read_text().splitlines()
    return tuple(dt.datetime.fromisoformat(line.split(" ", 1)[0]) for line in (lines[0], lines[-1]))


def test_ray_runs_two_runs_in_parallel_and_gathers_both(synthetic_tasks, planning_cache, tmp_path):
    out = tmp_path / "sweep"
    spec = {"tasks": [str(p) for p in synthetic_tasks], "methods": ["sequential"], "orderings": "reverse",
            "training": TINY, "device": "cpu", "cache_dir": str(planning_cache)}
    result = run_sweep(spec, out, use_ray=True, ray_num_cpus=2, cpus_per_run=1, quiet=True)
    assert not ray.is_initialized()  # the instance the sweep started is shut down again
    assert result["ran"] == 2

    stored = json.loads((out / "sweep.json").read_text())
    assert [r["ordering"] for r in stored["runs"]] == ["o0-given", "o1-SynthSiteB-SynthSiteA"]
    dirs = [out / r["path"] for r in stored["runs"]]
    for run_dir, run in zip(dirs, stored["runs"]):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert [Path(t).name for t in summary["tasks"]] == run["order"]
        assert 0 <= summary["final_average"] <= 1
        assert "Reusing planned and preprocessed data" in (run_dir / "run.log").read_text()  # planned by the driver
    table = pd.read_csv(out / "runs.csv")  # gathered by the driver
    assert table.finished.all() and len(table) == 2
    assert table.final_average.tolist() == pytest.approx(
        [json.loads((d / "summary.json").read_text())["final_average"] for d in dirs])

    (start_a, end_a), (start_b, end_b) = (_span(d) for d in dirs)
    assert start_a < end_b and start_b < end_a, "the two runs did not overlap in time: not run in parallel"

    again = run_sweep(spec, out, use_ray=True, ray_num_cpus=2, quiet=True)  # finished: no Ray start at all
    assert again["ran"] == 0 and not ray.is_initialized()
