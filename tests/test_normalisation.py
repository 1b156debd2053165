"""Each task is normalised as nnU-Net would normalise it alone, on the run's shared architecture: a CT task followed
by an MR task must not clip the MR images to the CT window (which saturated 80% of a real MR task's voxels)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.nnunet.planning import CPU_MEMORY_TARGET_GB
from lifelong_nnunet.nnunet.normalisation import describe, same_normalisation, task_normalisation, with_normalisation

CONFIGURATION = "2d"  # what is normalised does not depend on it, and 2d plans and trains fastest here


def _rewrite(folder: Path, channel: str, scale: float, offset: float) -> Path:
    """Give a synthetic site another modality: its channel name, and intensities on another scale."""
    djson = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**djson, "channel_names": {"0": channel}}, indent=2))
    for f in sorted((folder / "imagesTr").iterdir()):
        img = nib.load(f)
        data = np.asarray(img.dataobj, dtype=np.float32) * scale + offset
        nib.save(nib.Nifti1Image(data, img.affine), f)
    return folder


@pytest.fixture
def ct_then_mr(raw_sites) -> list[Path]:
    """Site A as CT (Hounsfield-like units around -620..100), site B as MR (arbitrary units 600..2700): every MR
    voxel lies above the CT task's window."""
    return [_rewrite(raw_sites[0], "CT", 800.0, -620.0), _rewrite(raw_sites[1], "MRI", 3000.0, 0.0)]


def _normalise(image: np.ndarray, plans: dict) -> np.ndarray:
    """One channel normalised as nnU-Net's preprocessing does with ``plans``."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (CTNormalization,
                                                                                   ZScoreNormalization)
    cm = plans["configurations"][CONFIGURATION]
    scheme = {"CTNormalization": CTNormalization, "ZScoreNormalization": ZScoreNormalization}[
        cm["normalization_schemes"][0]]
    norm = scheme(use_mask_for_norm=cm["use_mask_for_norm"][0],
                  intensityproperties=plans["foreground_intensity_properties_per_channel"]["0"])
    return norm.run(image.copy(), np.zeros_like(image))


def _saturated(x: np.ndarray) -> float:
    """Fraction of voxels at the array's most frequent value (clipping puts everything outside the window there)."""
    _, counts = np.unique(x, return_counts=True)
    return counts.max() / x.size


@pytest.mark.slow
def test_a_ct_task_then_an_mr_task_each_get_their_own_normalisation(ct_then_mr, tmp_path, monkeypatch):
    """Planned and run end to end (1 iteration per stage): the MR task is z-scored on the CT task's architecture,
    its preprocessed arrays are not saturated (under the CT task's window they would be), the run records each
    task's normalisation and warns that the channels differ, and evaluation predicts each task with its own."""
    from lifelong_nnunet.experiment import experiment_from_dict
    from lifelong_nnunet.nnunet import predictor
    from lifelong_nnunet.runner import run_experiment
    from lifelong_nnunet.tasks import load_task
    used = []
    real_init = predictor.Segmenter.__init__

    def recording_init(self, network, plans, configuration, *args, **kw):
        used.append(plans["configurations"][configuration]["normalization_schemes"][0])
        real_init(self, network, plans, configuration, *args, **kw)

    monkeypatch.setattr(predictor.Segmenter, "__init__", recording_init)
    spec = {"tasks": [str(p) for p in ct_then_mr], "method": "sequential", "configuration": CONFIGURATION,
            "device": "cpu", "cache_dir": str(tmp_path / "cache"), "test_split": {"fraction": 0.34, "min_cases": 2},
            "training": {"epochs": 1, "iterations_per_epoch": 1, "val_iterations": 1, "batch_size": 2}}
    run_experiment(experiment_from_dict(spec), tmp_path / "run", quiet=True)

    stored = json.loads((tmp_path / "run" / "normalisation.json").read_text())
    ct, mr = (stored[Path(p).name] for p in ct_then_mr)
    assert ct["normalization_schemes"] == ["CTNormalization"] and ct["channel_names"] == {"0": "CT"}
    assert mr["normalization_schemes"] == ["ZScoreNormalization"] and mr["channel_names"] == {"0": "MRI"}
    run_plans = json.loads((tmp_path / "run" / "plans.json").read_text())
    assert task_normalisation(run_plans, CONFIGURATION)["normalization_schemes"] == ["CTNormalization"]
    # every stage (0, 1, 2) evaluates both tasks, each with its own normalisation, in task order
    assert used == ["CTNormalization", "ZScoreNormalization"] * 3
    log = (tmp_path / "run" / "run.log").read_text()
    assert "input channels differ" in log and "ZScoreNormalization" in log and "CTNormalization" in log
    # the plan for this machine is explained in one line and recorded (a resume plans the same way)
    assert "Plans: patch " in log and "planned for a CPU" in log
    assert json.loads((tmp_path / "run" / "planning.json").read_text())["memory_target_gb"] == CPU_MEMORY_TARGET_GB
    report = (tmp_path / "run" / "report.md").read_text()  # and the report says both
    assert "- **Plans:** patch " in report and "planned for a CPU" in report
    assert "MRI: ZScoreNormalization" in report and "CT: CTNormalization, window [" in report

    # the preprocessed MR arrays really are z-scored, not clipped to the CT window
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    workspace = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    mr_task = load_task(ct_then_mr[1])
    folder = workspace / "nnUNet_preprocessed" / mr_task.name / f"nnUNetPlans_{CONFIGURATION}"
    dataset = infer_dataset_class(str(folder))(str(folder))
    data = dataset.load_case(dataset.identifiers[0])[0][:]
    assert _saturated(data) < 0.05 and abs(float(data.mean())) < 0.5 and 0.5 < float(data.std()) < 2
    raw = np.asarray(nib.load(mr_task.cases[dataset.identifiers[0]].images[0]).dataobj, dtype=np.float32)
    assert _saturated(_normalise(raw, run_plans)) > 0.99  # what the CT task's window did to it


def _plans(schemes: list[str], window: tuple[float, float] = (-620.0, 92.0)) -> dict:
    props = {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": window[0], "percentile_99_5": window[1]}}
    return {"foreground_intensity_properties_per_channel": props,
            "configurations": {CONFIGURATION: {"normalization_schemes": schemes, "use_mask_for_norm": [False],
                                               "patch_size": [16, 16]}}}


def test_normalisations_compare_by_scheme_and_by_statistics_only_where_the_scheme_uses_them():
    ct, ct_bone = (task_normalisation(_plans(["CTNormalization"], w), CONFIGURATION)
                   for w in [(-620, 92), (-200, 1500)])
    mr, mr_other = (task_normalisation(_plans(["ZScoreNormalization"], w), CONFIGURATION) for w in [(0, 1), (5, 9)])
    assert not same_normalisation(ct, ct_bone)  # another CT window maps the same HU elsewhere
    assert same_normalisation(mr, mr_other)  # z-score is per image: the dataset's statistics play no part
    assert not same_normalisation(ct, mr)
    assert "window [-620, 92]" in describe(ct) and describe(mr) == "channel 0: ZScoreNormalization"
    architecture = _plans(["CTNormalization"])
    moved = with_normalisation(architecture, CONFIGURATION, mr)
    assert task_normalisation(moved, CONFIGURATION)["normalization_schemes"] == ["ZScoreNormalization"]
    assert moved["configurations"][CONFIGURATION]["patch_size"] == [16, 16]  # the architecture is untouched
    assert architecture["configurations"][CONFIGURATION]["normalization_schemes"] == ["CTNormalization"]


def _run_folder(tmp_path, normalisation: dict):
    from lifelong_nnunet.experiment import Experiment
    from lifelong_nnunet.run_folder import RunFolder
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.write_experiment(Experiment(tasks=["/data/Dataset001_CT", "/data/Dataset002_MR"],
                                    configuration=CONFIGURATION))
    run.write_plans(_plans(["CTNormalization"]))
    run.write_normalisation(normalisation)
    return run


def test_predict_and_export_use_the_named_tasks_normalisation_and_refuse_to_guess(tmp_path):
    from lifelong_nnunet.deploy import plans_for_images
    ct = task_normalisation(_plans(["CTNormalization"]), CONFIGURATION, {"0": "CT"})
    mr = task_normalisation(_plans(["ZScoreNormalization"]), CONFIGURATION, {"0": "MRI"})
    run = _run_folder(tmp_path, {"Dataset001_CT": ct, "Dataset002_MR": mr})
    seen = ["Dataset001_CT", "Dataset002_MR"]

    def scheme(plans):
        return plans["configurations"][CONFIGURATION]["normalization_schemes"]

    assert scheme(plans_for_images(run.root, "Dataset002_MR", seen)) == ["ZScoreNormalization"]
    assert scheme(plans_for_images(run.root, "Dataset001_CT", seen)) == ["CTNormalization"]
    with pytest.raises(UserInputError, match="--task") as err:
        plans_for_images(run.root, None, seen)
    assert "MRI: ZScoreNormalization" in str(err.value) and "CT: CTNormalization" in str(err.value)
    assert scheme(plans_for_images(run.root, None, seen[:1])) == ["CTNormalization"]  # one task: nothing to guess
    # a task without a record (trained before normalisation.json existed) was normalised with plans.json's (CT):
    # an MR task added later differs from it, so the image's task must still be named
    run.write_normalisation({"Dataset002_MR": mr})
    with pytest.raises(UserInputError, match="--task"):
        plans_for_images(run.root, None, seen)


def test_a_task_trained_under_another_normalisation_is_refused(tmp_path):
    """A run whose stored normalisation of a task is not what the task's data give now (data rebuilt, or a run
    started when every task got the first task's normalisation) stops before anything is written."""
    from lifelong_nnunet.console import RunLog
    from lifelong_nnunet.runner import record_normalisation
    ct = task_normalisation(_plans(["CTNormalization"]), CONFIGURATION, {"0": "CT"})
    run = _run_folder(tmp_path, {"Dataset002_MR": ct})
    task = type("T", (), {"name": "Dataset002_MR", "short_name": "MR", "dataset_json": {"channel_names": {"0": "MRI"}}})
    workspace = type("W", (), {"tasks": [task], "plans": lambda self, t: _plans(["ZScoreNormalization"])})()
    before = run.normalisation.read_bytes()
    with pytest.raises(UserInputError, match="normalised differently"):
        record_normalisation(run, workspace, [task], CONFIGURATION, RunLog(None, quiet=True))
    assert run.normalisation.read_bytes() == before
