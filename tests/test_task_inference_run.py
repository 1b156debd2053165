"""Task inference in a real (tiny) multihead run: each stage stores its description, every stage is also scored with
the inferred head (summary.json and the report show both), and `predict` without --task writes the per-case file
and warns on an image unlike any site. nnU-Net's 2d configuration, 2 iterations per stage (nothing checked here
depends on how well the heads segment)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lifelong_nnunet.deploy import predict
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.run_folder import PredictionFolder, RunFolder
from lifelong_nnunet.runner import run_experiment

pytestmark = pytest.mark.slow
BUDGET = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "batch_size": 2}


@pytest.fixture(scope="module")
def multihead_run(synthetic_tasks, planning_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ti_run") / "run"
    exp = experiment_from_dict({"tasks": [str(t) for t in synthetic_tasks], "method": "multihead",
                                "configuration": "2d", "training": BUDGET, "cache_dir": str(planning_cache),
                                "device": "cpu"})
    run_experiment(exp, out, quiet=True)
    return out


def test_every_stage_is_described_and_scored_without_the_task(multihead_run, synthetic_tasks):
    run = RunFolder(multihead_run)
    tasks = run.read_tasks()
    described = run.read_task_descriptions([1, 2])
    assert sorted(described) == sorted(tasks)
    for d in described.values():  # fitted on nnU-Net's training part, calibrated on its validation part
        assert d.n_fit >= 1 and d.n_calibration >= 1 and np.isfinite(d.threshold)
    summary = run.read_summary()
    section = summary["task_agnostic"]
    assert section["R_oracle"] == summary["R"]
    assert section["R_inferred"][0] == [None, None]  # stage 0 has no heads to choose from
    assert section["accuracy"][1][1] is None  # task 2 is not trained after stage 1: no right head yet
    final = [a for a in section["final_accuracy_per_task"]]
    assert all(0.0 <= a <= 1.0 for a in final)
    for j, t in enumerate(tasks):
        cell = run.read_task_agnostic_cell(2, t)
        oracle = run.read_cell(2, t)
        right = cell[cell.chosen_task == t]
        # a case given its own head has the oracle's scores (same network, same image)
        merged = right.merge(oracle, on=["case", "label", "metric"], suffixes=("", "_oracle"))
        assert len(merged) == len(right) and (merged.value == merged.value_oracle).all()
        per_case = cell.drop_duplicates("case")
        assert final[j] == pytest.approx((per_case.chosen_task == t).mean())
    assert "## Without the task" in run.report.read_text()


def test_predict_without_task_records_each_choice_and_warns_on_an_unlike_image(multihead_run, synthetic_tasks,
                                                                               tmp_path):
    import SimpleITK as sitk
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = sorted((synthetic_tasks[1] / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(source, inputs / source.name)
    like = sitk.ReadImage(str(source))
    noise = sitk.GetImageFromArray(np.random.default_rng(0).uniform(-1000, 5000, sitk.GetArrayFromImage(like).shape)
                                   .astype(np.float32))
    noise.CopyInformation(like)
    sitk.WriteImage(noise, str(inputs / "noise_0000.nii.gz"))
    warnings = []
    predict(multihead_run, inputs, tmp_path / "out", device="cpu", warn=warnings.append)
    choices = pd.read_csv(PredictionFolder(tmp_path / "out").task_choices).set_index("case")
    tasks = RunFolder(multihead_run).read_tasks()
    assert set(choices.rule) == {"description"} and set(choices.chosen_task) <= set(tasks)
    assert {f"score_{t}" for t in tasks} <= set(choices.columns) and (choices.margin >= 0).all()
    assert bool(choices.loc["noise", "ood"]) and choices.loc["noise", "score"] > choices.loc["noise", "threshold"]
    assert len(warnings) == 1 + int(bool(choices.drop("noise").ood.any())) and "'noise'" in warnings[0]
    # (the entropy rule, --task-choice entropy, is the method's choose_task: tests/test_methods_architecture.py)


def test_an_unknown_task_choice_is_refused_before_anything_is_written(multihead_run, tmp_path):
    from lifelong_nnunet.errors import UserInputError
    with pytest.raises(UserInputError, match="--task-choice 'votes'.*description, entropy"):
        predict(multihead_run, tmp_path, tmp_path / "out", task_choice="votes")
    assert not (tmp_path / "out").exists()
