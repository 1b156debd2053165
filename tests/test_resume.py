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

from lifelong_nnunet.run_folder import RunFolder

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
    run = RunFolder(out)

    def trained_a_while() -> bool:  # a checkpoint to resume from, and this session's time recorded
        return bool(list(stage2.rglob("checkpoint_latest.pth"))) and bool(run.read_sessions(2))
    while time.time() < deadline and not trained_a_while():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert trained_a_while(), "stage 2 never wrote a checkpoint"
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
    # the killed session's training time counts too: the stage's time is both sessions' added up
    trained = [s["seconds"] for s in run.read_sessions(2) if s["phase"] == "train"]
    assert len(trained) == 2
    assert run.load_model(2)["info"]["train_seconds"] == pytest.approx(sum(trained))

    third = start(spec, out)
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and "already complete" in output


def test_data_rebuilt_in_place_is_refused_before_anything_is_written(raw_sites, planning_cache, tmp_path):
    """A user rebuilt a task's files in place and repeated the command: the run must not resume on other data
    (nor re-plan and overwrite its plans); one paragraph names the task, and the folder is left as it was."""
    import hashlib

    import nibabel as nib
    import numpy as np

    from lifelong_nnunet.errors import UserInputError
    from lifelong_nnunet.experiment import experiment_from_dict
    from lifelong_nnunet.runner import run_experiment

    def spec():
        return experiment_from_dict({"tasks": [str(raw_sites[0])], "method": "sequential", "device": "cpu",
                                     "configuration": "2d", "cache_dir": str(tmp_path / "cache"),
                                     "training": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1,
                                                  "batch_size": 2}})

    out = tmp_path / "run"
    run_experiment(spec(), out, quiet=True)
    image = sorted((raw_sites[0] / "imagesTr").iterdir())[0]
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 1.5, img.affine), image)  # same shape
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserInputError, match=rf"files of {raw_sites[0].name} .* changed since the run"):
        run_experiment(spec(), out, quiet=True)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == before
