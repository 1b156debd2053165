"""Reading a model folder that stock nnU-Net v2 wrote: its own ``nnUNetTrainer.save_checkpoint``, loaded with
``weights_only=True`` and exactly the numpy scalar types allowed; everything else refused with a clear error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import Planning
from lifelong_nnunet.nnunet.planning import Workspace, resolve_planning
from lifelong_nnunet.nnunet.stock_model import read_stock_model
from lifelong_nnunet.tasks import load_task, make_test_split

TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def planned_workspace(task_folders, cache: Path) -> tuple[Workspace, list]:
    """The workspace the end-to-end runs plan (same tasks, same default test split, the planner settings a CPU run
    resolves), so planning is shared."""
    tasks = [load_task(f) for f in task_folders]
    for t in tasks:
        t.test_cases = make_test_split(t, 0.25, 1, 0)
    workspace = Workspace(cache, tasks, "3d_fullres", planning=resolve_planning(Planning(), "cpu"))
    workspace.ensure_planned(lambda *_: None)
    return workspace, tasks


def write_stock_model_folder(workspace: Workspace, task, results: Path) -> tuple[Path, dict]:
    """What ``nnUNetv2_train`` leaves behind, written by nnU-Net's own trainer (no training needed for the format):
    plans.json, dataset.json and fold_0/checkpoint_final.pth with numpy scalars in 'logging' and '_best_ema'."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    plans, djson = workspace.plans(task), workspace.dataset_json(task)
    with workspace.env(results=results):
        trainer = nnUNetTrainer(dict(plans, continue_training=False), "3d_fullres", 0, djson, torch.device("cpu"))
        trainer.initialize()
        trainer.logger.log("mean_fg_dice", np.float64(0.61), 0)
        trainer.logger.log("ema_fg_dice", np.float64(0.58), 0)
        trainer._best_ema = np.float64(0.58)
        folder = Path(trainer.output_folder).parent
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(djson))
    return folder, {k: v.clone() for k, v in trainer.network.state_dict().items()}


@pytest.fixture(scope="session")
def stock_folder(synthetic_tasks, planning_cache, tmp_path_factory):
    workspace, tasks = planned_workspace(synthetic_tasks, planning_cache)
    return write_stock_model_folder(workspace, tasks[0], tmp_path_factory.mktemp("nnUNet_results"))


@pytest.fixture
def stock_copy(stock_folder, tmp_path) -> Path:
    return Path(shutil.copytree(stock_folder[0], tmp_path / TRAINER_DIR))


def test_nnunets_own_checkpoint_loads_weights_only_with_numpy_scalars_allowed(stock_folder):
    folder, weights = stock_folder
    with pytest.raises(Exception, match="weights_only|Unsupported global"):  # why the numpy types must be allowed
        torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    model = read_stock_model(folder)
    assert model.configuration == "3d_fullres" and model.trainer_name == "nnUNetTrainer"
    assert model.dataset_name == "Dataset901_SynthSiteA"
    assert model.weights.keys() == weights.keys()
    assert all(torch.equal(model.weights[k], weights[k]) for k in weights)  # a copy of the same tensors: bitwise


def test_a_checkpoint_that_needs_code_to_unpickle_is_refused(stock_copy):
    path = stock_copy / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["extra"] = Path("/some/pickled/object")  # any class outside the allowed set
    torch.save(ckpt, path)
    with pytest.raises(UserInputError, match="weights_only=True") as e:
        read_stock_model(stock_copy)
    assert str(path) in str(e.value) and "never unpickles code" in str(e.value)


@pytest.mark.parametrize("missing", ["plans.json", "dataset.json"])
def test_an_incomplete_folder_names_the_missing_file(stock_copy, missing):
    (stock_copy / missing).unlink()
    with pytest.raises(UserInputError, match=missing):
        read_stock_model(stock_copy)


def test_a_missing_fold_says_which_folds_exist(stock_copy):
    with pytest.raises(UserInputError, match=r"fold 3 \(it has fold_0; choose one with --fold\)"):
        read_stock_model(stock_copy, fold=3)
    shutil.rmtree(stock_copy / "fold_0")
    with pytest.raises(UserInputError, match="no fold_K/checkpoint_final.pth at all"):
        read_stock_model(stock_copy)


def test_a_network_that_is_not_the_plans_architecture_is_refused(stock_copy):
    path = stock_copy / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    key = next(k for k in ckpt["network_weights"] if k.endswith("seg_layers.0.weight"))
    ckpt["network_weights"][key] = torch.zeros(7, *ckpt["network_weights"][key].shape[1:])  # another head
    ckpt["trainer_name"] = "MyCustomTrainer"
    torch.save(ckpt, path)
    with pytest.raises(UserInputError, match="MyCustomTrainer.*not the architecture") as e:
        read_stock_model(stock_copy)
    assert "1 of another shape" in str(e.value)


def test_region_based_models_are_refused(stock_copy):
    djson = json.loads((stock_copy / "dataset.json").read_text())
    djson["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (stock_copy / "dataset.json").write_text(json.dumps(djson))
    with pytest.raises(UserInputError, match="plain integers"):
        read_stock_model(stock_copy)


# ---- run --start-from: the stock model is stage 1 ---------------------------------------------------------------
TINY = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}


@pytest.mark.slow
def test_a_run_starts_from_a_stock_model_and_keeps_learning(stock_folder, synthetic_tasks, planning_cache, tmp_path):
    from lifelong_nnunet.deploy import export_model_folder
    from lifelong_nnunet.experiment import experiment_from_dict
    from lifelong_nnunet.runner import run_experiment
    folder, weights = stock_folder
    out = tmp_path / "from_stock"
    summary = run_experiment(experiment_from_dict({
        "tasks": [str(synthetic_tasks[1])], "method": "lwf", "training": TINY, "device": "cpu",
        "cache_dir": str(planning_cache), "start_from": {"folder": str(folder), "fold": 0}}), out, quiet=True)
    assert summary["tasks"] == ["Dataset901_SynthSiteA", "Dataset902_SynthSiteB"]
    stage1 = torch.load(out / "stages" / "stage_1" / "model.pt", weights_only=True)
    assert all(torch.equal(stage1["network_weights"][k], weights[k]) for k in weights)  # imported, not trained
    assert stage1["info"]["imported_from"].endswith("fold_0/checkpoint_final.pth")
    stage2 = torch.load(out / "stages" / "stage_2" / "model.pt", weights_only=True)["network_weights"]
    assert any(not torch.equal(stage2[k], weights[k]) for k in weights if weights[k].is_floating_point())
    assert json.loads((out / "plans.json").read_text()) == json.loads((folder / "plans.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [h["origin"] for h in history] == ["imported", "run"]
    # the imported task has no test data here: its cells are "not evaluated", never zeros, and left out of the means
    assert [t for _, t in summary["not_evaluated"]] == ["Dataset901_SynthSiteA"] * 3
    assert summary["final_per_task"][0] is None and summary["final_average"] == summary["final_per_task"][1]
    assert "not evaluated (test data absent)" in (out / "report.md").read_text()
    exported = export_model_folder(out, tmp_path / "exported")
    assert read_stock_model(exported).weights.keys() == weights.keys()  # and it can start the next run


def test_start_from_refuses_methods_that_need_the_old_training_data(stock_folder, synthetic_tasks, cli_in_process,
                                                                    tmp_path):
    code, out, err = cli_in_process("run", "--start-from", stock_folder[0], "--tasks", synthetic_tasks[1],
                                    "--method", "ewc", "-o", tmp_path / "run")
    assert code == 2
    message = " ".join((out + err).split())
    assert "'ewc' computes its state from the first task's training data" in message
    assert "lwf" in message and "sequential" in message and "rehearsal" not in message.split("alone:")[1]
    assert not (tmp_path / "run").exists()


def test_start_from_a_folder_without_checkpoint_is_a_clear_error(stock_copy, synthetic_tasks, cli_in_process,
                                                                 tmp_path):
    (stock_copy / "fold_0" / "checkpoint_final.pth").unlink()
    code, out, err = cli_in_process("run", "--start-from", stock_copy, "--tasks", synthetic_tasks[1], "-o",
                                    tmp_path / "run")
    assert code == 2 and "checkpoint_final.pth is missing" in " ".join((out + err).split())
    assert not (tmp_path / "run").exists()
