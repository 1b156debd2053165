"""Every installed method: a run interrupted in the middle of its last stage and resumed ends with exactly the
weights of an uninterrupted run (so the method's state, e.g. importances, teachers or the replay buffer, is
saved and restored); `run` on the first task followed by `extend` with the second gives exactly the stage models and
results of the uninterrupted two-task run; and no method except those that declare it writes image data into the run
folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import json
import shutil

import pandas as pd

from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.lifelong import extend_run
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


@pytest.fixture(scope="module")
def uninterrupted(tasks, cache, tmp_path_factory):
    """The uninterrupted two-task run of a method, made once and shared by the resume and the extend test."""
    runs: dict[str, Path] = {}

    def get(method: str, sequence: list[Path] | None = None) -> Path:
        sequence = sequence or tasks
        key = method + "|" + "|".join(map(str, sequence))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp(f"uninterrupted-{method}") / "run"
            run_experiment(spec(method, sequence, cache), runs[key], quiet=True)
        return runs[key]
    return get


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
def test_interrupted_run_resumes_to_identical_weights(method, tasks, cache, uninterrupted, tmp_path, monkeypatch):
    reference = uninterrupted(method)

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


@pytest.fixture(scope="module")
def class_tasks(tasks, tmp_path_factory) -> list[Path]:
    """Site A, then site B's images annotated as two new structures: a class sequence whose second task adds
    structures (what `extend` asks of a class-scenario task)."""
    new = Path(shutil.copytree(tasks[1], tmp_path_factory.mktemp("class") / "Dataset903_SynthNewStructures"))
    djson = json.loads((new / "dataset.json").read_text())
    djson["labels"] = {"background": 0, **{f"{name}_new": v for name, v in djson["labels"].items() if v}}
    (new / "dataset.json").write_text(json.dumps(djson))
    return [tasks[0], new]


@pytest.fixture(scope="module")
def extend_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extend_cache")


# joint trains every task in one stage, so it cannot grow stage by stage (test_extend.py checks the refusal)
EXTENDABLE = [m for m in METHODS if m != "joint"]


@pytest.mark.parametrize("method", EXTENDABLE)
def test_run_then_extend_equals_the_uninterrupted_run(method, tasks, class_tasks, cache, extend_cache, uninterrupted,
                                                      tmp_path):
    sequence = class_tasks if spec(method, tasks, cache).scenario == "class" else tasks
    batch = uninterrupted(method, sequence)
    grown = tmp_path / "grown"
    run_experiment(spec(method, sequence[:1], cache), grown, quiet=True)
    extend_run(grown, [str(sequence[1])], device="cpu", cache_dir=str(extend_cache), keep_cache=True, quiet=True)

    stages = [0] + [s.index for s in load_schedule(batch)]
    assert [s.index for s in load_schedule(grown)] == stages[1:]
    for i in stages:  # CPU, same seed, same computation: bitwise
        a, b = (torch.load(r / "stages" / f"stage_{i}" / "model.pt", weights_only=True) for r in (batch, grown))
        assert a["network_weights"].keys() == b["network_weights"].keys(), i
        assert all(torch.equal(a["network_weights"][k], b["network_weights"][k]) for k in a["network_weights"]), i
    pd.testing.assert_frame_equal(pd.read_csv(batch / "results.csv"), pd.read_csv(grown / "results.csv"))
    history = json.loads((grown / "history.json").read_text())
    assert [h["origin"] for h in history] == ["run", "extend"][: len(history)]

    # what the grown run folder and the extension's cache hold of the first task: nothing but a declared buffer
    first = sequence[0].name
    arrays = [p for p in grown.rglob("*") if p.name.endswith(IMAGE_SUFFIXES)]
    if create_method(method).keeps_old_data:
        assert arrays and all(p.parent.parent == grown / "replay" for p in arrays), arrays[:3]
    else:
        assert not arrays, f"{method} left image data in its run folder: {arrays[:3]}"
    assert not [p for p in extend_cache.rglob("*") if first in str(p)], "the extension's cache holds the first task"
