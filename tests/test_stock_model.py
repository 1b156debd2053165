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
from lifelong_nnunet.nnunet.planning import Workspace
from lifelong_nnunet.nnunet.stock_model import read_stock_model
from lifelong_nnunet.tasks import load_task, make_test_split

TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def planned_workspace(task_folders, cache: Path) -> tuple[Workspace, list]:
    """The workspace the end-to-end runs plan (same tasks, same default test split), so planning is shared."""
    tasks = [load_task(f) for f in task_folders]
    for t in tasks:
        t.test_cases = make_test_split(t, 0.25, 1, 0)
    workspace = Workspace(cache, tasks, "3d_fullres")
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
