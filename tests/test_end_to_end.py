"""End-to-end on tiny synthetic data: a real run trains, evaluates every task after every stage and reports.

One sequential run (2 tasks, 2 epochs x 4 iterations) is shared by the tests of this module; the planning cache is
shared with the resume test so nnU-Net plans only once.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.methods import TrainerView, registered_methods
from lifelong_nnunet.methods.sequential import Sequential
from lifelong_nnunet.methods.separate import Separate
from lifelong_nnunet.runner import run_experiment

pytestmark = pytest.mark.slow
TINY = {"epochs": 2, "iterations_per_epoch": 4, "val_iterations": 1}


class InitProbe(Sequential):
    """Records the weights each stage starts from (a test-only plugin; it also proves plugins need no runner edits),
    and the trainer the hook is given: whether it implements TrainerView, and its stage state."""
    name = "test-init-probe"
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainers: dict[int, tuple[bool, object]] = {}

    def before_stage(self, trainer, stage):
        InitProbe.seen[stage.index] = {k: v.detach().cpu().clone() for k, v in trainer.network.state_dict().items()}
        InitProbe.trainers[stage.index] = (isinstance(trainer, TrainerView), trainer.stage_state)


class SeparateInitProbe(Separate):
    name = "test-separate-init-probe"
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def before_stage(self, trainer, stage):
        SeparateInitProbe.seen[stage.index] = {k: v.detach().cpu().clone()
                                               for k, v in trainer.network.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def probes():
    """The probes are known by name only while this module runs (never in `available_methods()` elsewhere)."""
    with registered_methods(InitProbe, SeparateInitProbe):
        yield


@pytest.fixture(scope="session")
def cache_dir(planning_cache) -> Path:
    return planning_cache


def spec(tasks, cache_dir, method="sequential", **extra) -> dict:
    return {"tasks": [str(t) for t in tasks], "method": method, "training": dict(TINY),
            "cache_dir": str(cache_dir), "device": "cpu", **extra}


@pytest.fixture(scope="module")
def sequential_run(probes, synthetic_tasks, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "probe"
    run_experiment(experiment_from_dict(spec(synthetic_tasks, cache_dir, "test-init-probe")), out, quiet=True)
    return out


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["network_weights"]


def test_run_folder_holds_results_matrix_and_report(sequential_run, synthetic_tasks):
    for name in ("experiment.json", "splits.json", "plans.json", "results.csv", "summary.json", "report.md",
                 "run.log", "figures/result_matrix.png", "figures/task_curves.png", "format.json"):
        assert (sequential_run / name).is_file(), name
    results = pd.read_csv(sequential_run / "results.csv")
    assert list(results.columns) == ["stage", "trained_on", "eval_task", "case", "label", "metric", "value"]
    assert sorted(results.stage.unique()) == [0, 1, 2]
    splits = json.loads((sequential_run / "splits.json").read_text())
    # every task is evaluated after every stage, on exactly its test cases, for both labels and both metrics
    for stage in (0, 1, 2):
        for task in splits:
            rows = results[(results.stage == stage) & (results.eval_task == task)]
            assert sorted(rows.case.unique()) == sorted(splits[task])
            assert set(rows.label) == {"structure_a", "structure_b"}
            assert set(rows.metric) == {"dice", "iou", "nsd", "hd95"}
    overlap = results[results.metric != "hd95"]
    assert overlap.value.between(0, 1).all()
    hd95 = results[results.metric == "hd95"].value.dropna()
    assert len(hd95) and (hd95 >= 0).all()  # mm; NaN only where one side is empty
    summary = json.loads((sequential_run / "summary.json").read_text())
    R = np.array(summary["R"])
    assert R.shape == (3, 2)
    assert np.all((R >= 0) & (R <= 1))
    assert summary["final_average"] == pytest.approx(R[2].mean())
    assert summary["bwt"] == pytest.approx(R[2, 0] - R[1, 0])
    assert summary["fwt"] == pytest.approx(R[1, 1] - R[0, 1])
    assert "Result matrix" in (sequential_run / "report.md").read_text()
    # the cost, recorded while the run happened: every stage's training (stages 1, 2) and evaluation (0, 1, 2)
    resources = summary["resources"]
    assert resources["not_recorded"] == [] and resources["devices"][0].startswith("cpu (")
    assert [e["train_seconds"] is not None for e in resources["stages"]] == [False, True, True]
    assert all(e["evaluate_seconds"] > 0 and e["peak_rss_mb"] > 100 for e in resources["stages"])  # torch: > 100 MiB
    assert resources["wall_seconds"] == pytest.approx(sum(e["evaluate_seconds"] + (e["train_seconds"] or 0)
                                                          for e in resources["stages"]))
    for task, counts in summary["data"].items():
        assert counts["test_cases"] == splits[task] and counts["n_validation"] >= 1 and counts["n_train"] >= 1


def test_test_cases_never_reach_training(sequential_run, cache_dir):
    splits = json.loads((sequential_run / "splits.json").read_text())
    linked = {p.name for p in cache_dir.rglob("labelsTr/*.nii.gz")}
    for task, cases in splits.items():
        assert cases, task
        assert not any(f"{c}.nii.gz" in linked for c in cases), "test case visible to planning/training"


def test_each_stage_starts_from_previous_stage_weights(sequential_run):
    stage0, stage1, stage2 = (load_weights(sequential_run / "stages" / f"stage_{i}" / "model.pt") for i in range(3))
    for key in stage0:
        assert torch.equal(InitProbe.seen[1][key], stage0[key]), key
        assert torch.equal(InitProbe.seen[2][key], stage1[key]), key
    changed = [k for k in stage1 if stage1[k].is_floating_point() and not torch.equal(stage1[k], stage2[k])]
    assert changed, "stage 2 did not train"
    assert any("seg_layers" in k for k in changed), "the segmentation head must be carried over and trained"


def test_hooks_get_a_trainer_view_with_the_stage_state(sequential_run, synthetic_tasks):
    names = [t.name for t in synthetic_tasks]
    for index, before in ((1, ()), (2, (names[0],))):
        is_view, state = InitProbe.trainers[index]
        assert is_view
        assert state.stage.index == index and state.stage.train_tasks == (names[index - 1],)
        assert state.tasks_before == before
        assert state.stage_dir == (sequential_run / "stages" / f"stage_{index}").resolve()
        assert state.annotated_classes is None  # domain scenario: every channel annotated


@pytest.fixture(scope="module")
def separate_run(probes, synthetic_tasks, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sep"
    run_experiment(experiment_from_dict(spec(synthetic_tasks, cache_dir, "test-separate-init-probe")), out, quiet=True)
    return out


def test_separate_restarts_every_stage_from_the_untrained_model(separate_run):
    stage0 = load_weights(separate_run / "stages" / "stage_0" / "model.pt")
    for index in (1, 2):
        assert all(torch.equal(SeparateInitProbe.seen[index][k], stage0[k]) for k in stage0)
    summary = json.loads((separate_run / "summary.json").read_text())
    R = np.array(summary["R"])
    assert summary["final_per_task"] == pytest.approx([R[1, 0], R[2, 1]])  # each task's own specialist
    assert summary["bwt"] is None


def test_same_seed_same_start_same_data_gives_identical_weights(sequential_run, separate_run):
    """Stage 1 of `separate` and of `sequential` start from the same weights and see the same task with the same
    seed: with our seeding of nnU-Net's sampling and augmentation they must agree bit for bit."""
    ours = load_weights(sequential_run / "stages" / "stage_1" / "model.pt")
    theirs = load_weights(separate_run / "stages" / "stage_1" / "model.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_finished_run_does_nothing_when_started_again(sequential_run, synthetic_tasks, cache_dir, capsys):
    before = (sequential_run / "results.csv").stat().st_mtime_ns
    run_experiment(experiment_from_dict(spec(synthetic_tasks, cache_dir, "test-init-probe")), sequential_run)
    assert "already complete" in capsys.readouterr().err
    assert (sequential_run / "results.csv").stat().st_mtime_ns == before


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong_nnunet.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_predict_writes_label_maps_with_input_geometry(sequential_run, synthetic_tasks, tmp_path):
    import SimpleITK as sitk
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = sorted((synthetic_tasks[0] / "imagesTr").glob("*.nii.gz"))[:2]
    for p in source:
        shutil.copy(p, inputs / p.name)
    result = cli("predict", str(sequential_run), "-i", str(inputs), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for p in source:
        out = tmp_path / "out" / p.name.replace("_0000", "")
        img, seg = sitk.ReadImage(str(p)), sitk.ReadImage(str(out))
        assert seg.GetSize() == img.GetSize() and seg.GetSpacing() == img.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


def test_export_runs_in_stock_nnunet(sequential_run, synthetic_tasks, tmp_path):
    """Unmodified nnUNetv2_predict_from_modelfolder must run the export and agree with our own predict."""
    import SimpleITK as sitk
    result = cli("export", str(sequential_run), "-o", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "model" / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = sorted((synthetic_tasks[1] / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(source, inputs / source.name)
    stock = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    # Both commands run nnU-Net's own sliding-window predictor on the same weights; with the same environment they
    # also run it with the same number of torch threads (nnU-Net predicts with min(nnUNet_def_n_proc, threads)), so
    # the logits, and the label maps, must agree bit for bit. Without it ours would use every core and stock one
    # thread, and another split of the work may round differently and flip a voxel at a near-tie.
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"})
    done = subprocess.run([str(stock), "-i", str(inputs), "-o", str(tmp_path / "stock"), "-m", str(tmp_path / "model"),
                           "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = cli("predict", str(sequential_run), "-i", str(inputs), "-o", str(tmp_path / "ours"), "--device", "cpu",
               env=env)
    assert ours.returncode == 0, ours.stderr
    name = source.name.replace("_0000", "")
    stock_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "stock" / name)))
    our_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours" / name)))
    assert np.array_equal(stock_seg, our_seg)
