"""Every installed method: a run interrupted in the middle of its last stage and resumed ends with exactly the
weights of an uninterrupted run (so the method's state, e.g. importances, teachers or the replay buffer, is
saved and restored), and no method except those that declare it writes image data into the run folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.methods import available_methods, create_method
from lifelong_nnunet.nnunet.trainer import ContinualTrainer
from lifelong_nnunet.run_folder import load_schedule
from lifelong_nnunet.runner import run_experiment

pytestmark = pytest.mark.slow
METHODS = available_methods()
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz", ".b2nd", ".pkl", ".mha", ".nrrd", ".png.npy")
BUDGET = {"epochs": 2, "iterations_per_epoch": 3, "val_iterations": 1}
# What resume must restore does not depend on these sizes, and the defaults would dominate the module's time (EWC's
# and MAS's 20 batches of per-sample gradients after every stage cost more than the stage's training). RW updates
# every 2nd step so that its running Fisher and path integral are non-trivial when the run is cut (its default of
# 10 steps falls after the cut), and resuming with a wrong step count shifts its updates.
METHOD_PARAMS = {"ewc": {"fisher_batches": 2}, "mas": {"importance_batches": 2}, "rw": {"update_interval": 2},
                 "frozen_encoder_decoders": {"val_batches": 2, "widths": [0.25], "convs": [1]}}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tasks(synthetic_tasks) -> list[Path]:
    return synthetic_tasks


@pytest.fixture(scope="module")
def cache(planning_cache) -> Path:
    return planning_cache


def spec(method, tasks, cache):
    # class-only methods run the same two sites as a class sequence (task 2 re-annotates task 1's structures)
    scenario = "domain" if "domain" in create_method(method).scenarios else "class"
    return experiment_from_dict({"tasks": [str(t) for t in tasks], "method": method,
                                 "method_params": METHOD_PARAMS.get(method, {}),
                                 "training": BUDGET, "cache_dir": str(cache), "device": "cpu", "scenario": scenario})


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = load_schedule(run)[-1].index
    return torch.load(run / "stages" / f"stage_{last}" / "model.pt", map_location="cpu",
                      weights_only=True)["network_weights"]


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_run_resumes_to_identical_weights(method, tasks, cache, tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    run_experiment(spec(method, tasks, cache), reference, quiet=True)

    last_stage = create_method(method).schedule([t.name for t in tasks])[-1].index
    original = ContinualTrainer.on_epoch_end

    def interrupt_after_first_epoch_of_last_stage(self):
        original(self)  # the epoch's checkpoint is written first
        if self.stage.index == last_stage and self.current_epoch == 1:
            raise Interrupt

    resumed = tmp_path / "interrupted"
    monkeypatch.setattr(ContinualTrainer, "on_epoch_end", interrupt_after_first_epoch_of_last_stage)
    with pytest.raises(Interrupt):
        run_experiment(spec(method, tasks, cache), resumed, quiet=True)
    monkeypatch.setattr(ContinualTrainer, "on_epoch_end", original)
    assert not (resumed / "results.csv").exists()
    run_experiment(spec(method, tasks, cache), resumed, quiet=True)
    assert "resuming from epoch 1" in (resumed / "run.log").read_text()

    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume changed the result"

    if not create_method(method).keeps_old_data:
        images = [p for p in resumed.rglob("*") if p.name.endswith(IMAGE_SUFFIXES)]
        assert not images, f"{method} wrote image data into its run folder: {images[:3]}"
