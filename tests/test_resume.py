"""A run killed with SIGKILL in the middle of a stage resumes from its last checkpoint and completes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def start(spec: Path, out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lifelong_nnunet.cli", "run", str(spec), "-o", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_kill_mid_stage_then_resume(synthetic_tasks, planning_cache, tmp_path):
    """The session's planning cache: planning is not what is killed here, and a kill mid-stage never touches it."""
    spec = tmp_path / "experiment.yaml"
    spec.write_text(yaml.safe_dump({
        "tasks": [str(t) for t in synthetic_tasks], "method": "sequential", "device": "cpu",
        "cache_dir": str(planning_cache),
        "training": {"epochs": 3, "iterations_per_epoch": 3, "val_iterations": 1}}))
    out = tmp_path / "run"
    proc = start(spec, out, "-q")
    stage2 = out / "stages" / "stage_2"
    deadline = time.time() + 400
    while time.time() < deadline and not list(stage2.rglob("checkpoint_latest.pth")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert list(stage2.rglob("checkpoint_latest.pth")), "stage 2 never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the run and its data-augmentation workers
    proc.wait()
    assert not (out / "results.csv").exists() and not (stage2 / "model.pt").exists()
    stage1_model = out / "stages" / "stage_1" / "model.pt"
    stage1_mtime = stage1_model.stat().st_mtime_ns

    again = start(spec, out, "-q")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    log = (out / "run.log").read_text()
    assert "Stage 1 (Dataset901_SynthSiteA) already done" in log
    assert "Stage 2: resuming from epoch" in log
    assert stage1_model.stat().st_mtime_ns == stage1_mtime, "a finished stage was retrained"
    assert (out / "results.csv").is_file() and (out / "summary.json").is_file()
    assert not list(out.rglob("*.tmp")), "temporary files left behind"

    third = start(spec, out)
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and "already complete" in output
