"""Every installed method: `run` on the first task, then `extend` with the second, interrupted in the middle of the
new stage and resumed, ends with exactly the stage models and results of the uninterrupted two-task run. So the
method's state (importances, teachers, the replay buffer, RW's running sums) is saved with each stage and restored
both by `extend` and by the resume inside a stage, and nothing of the first task but a declared replay buffer is
left in the run folder or the extension's cache. `joint`, which cannot grow stage by stage, resumes an interrupted
`run` instead. ewc, mas and rw run the class scenario here (their importances must grow with the head), and so does
plop (its pseudo-labels go through the real trainer's loss); every other method that has the domain scenario runs
it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.lifelong import extend_run
from lifelong_nnunet.methods import available_methods, create_method
from lifelong_nnunet.nnunet.trainer import ContinualTrainer
from lifelong_nnunet.run_folder import load_schedule
from lifelong_nnunet.runner import run_experiment

pytestmark = pytest.mark.slow
METHODS = available_methods()
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz", ".b2nd", ".pkl", ".mha", ".nrrd", ".png.npy")
BUDGET = {"epochs": 2, "iterations_per_epoch": 3, "val_iterations": 1, "batch_size": 2}
# nnU-Net's 2d configuration of the same volumes: what is saved and restored does not depend on it, and a 2d stage
# trains in half the time of a 3d one here (measured: 8 s against 16 s for a two-task run after planning)
CONFIGURATION = "2d"
# What resume must restore does not depend on these sizes, and the defaults would dominate the module's time (EWC's
# and MAS's 20 batches of per-sample gradients after every stage cost more than the stage's training). RW updates
# every 2nd step so that its running Fisher and path integral are non-trivial when the run is cut (its default of
# 10 steps falls after the cut), and resuming with a wrong step count shifts its updates.
METHOD_PARAMS = {"ewc": {"fisher_batches": 2}, "mas": {"importance_batches": 2}, "rw": {"update_interval": 2},
                 "frozen_encoder_decoders": {"val_batches": 2, "widths": [0.25], "convs": [1]}}
# plus the class-only methods; plop runs the class scenario so that its pseudo-labels and nnU-Net's loss with an ignore
# label (`ContinualTrainer.loss_ignoring`) run in the real trainer somewhere in the suite
CLASS_SCENARIO = ("ewc", "mas", "rw", "plop")
# joint trains every task in one stage, so it cannot grow stage by stage (test_extend.py checks the refusal)
EXTENDABLE = [m for m in METHODS if m != "joint"]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tasks(synthetic_tasks) -> list[Path]:
    return synthetic_tasks


@pytest.fixture(scope="module")
def cache(planning_cache) -> Path:
    return planning_cache


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


def scenario_of(method: str) -> str:
    scenarios = create_method(method).scenarios
    return "class" if method in CLASS_SCENARIO or "domain" not in scenarios else "domain"


def spec(method, tasks, cache):
    return experiment_from_dict({"tasks": [str(t) for t in tasks], "method": method, "configuration": CONFIGURATION,
                                 "method_params": METHOD_PARAMS.get(method, {}), "training": BUDGET,
                                 "cache_dir": str(cache), "device": "cpu", "scenario": scenario_of(method)})


def stage_weights(run: Path, index: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "stages" / f"stage_{index}" / "model.pt", map_location="cpu",
                      weights_only=True)["network_weights"]


def assert_same_weights(a: dict, b: dict, what) -> None:  # CPU, same seed, same computation: bitwise
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[0]} by up to "
                        f"{float((a[differ[0]].float() - b[differ[0]].float()).abs().max()):.3g}")


@pytest.fixture
def interrupt_last_stage(monkeypatch):
    """Make the next training of stage ``index`` raise `Interrupt` after its first epoch (whose checkpoint is
    written first); returns a function that arms it, and one that disarms it."""
    original = ContinualTrainer.on_epoch_end

    def arm(index: int) -> None:
        def cut(self):
            original(self)
            if self.stage.index == index and self.current_epoch == 1:
                raise Interrupt
        monkeypatch.setattr(ContinualTrainer, "on_epoch_end", cut)

    def disarm() -> None:
        monkeypatch.setattr(ContinualTrainer, "on_epoch_end", original)
    return arm, disarm


@pytest.mark.parametrize("method", EXTENDABLE)
def test_run_then_interrupted_extend_equals_the_uninterrupted_run(method, tasks, class_tasks, cache, extend_cache,
                                                                   interrupt_last_stage, tmp_path):
    sequence = class_tasks if scenario_of(method) == "class" else tasks
    batch = tmp_path / "batch"
    run_experiment(spec(method, sequence, cache), batch, quiet=True)
    stages = [0] + [s.index for s in load_schedule(batch)]

    grown = tmp_path / "grown"
    run_experiment(spec(method, sequence[:1], cache), grown, quiet=True)
    arm, disarm = interrupt_last_stage
    arm(stages[-1])
    with pytest.raises(Interrupt):
        extend_run(grown, [str(sequence[1])], device="cpu", cache_dir=str(extend_cache), keep_cache=True, quiet=True)
    disarm()
    assert not (grown / "stages" / f"stage_{stages[-1]}" / "model.pt").exists()
    extend_run(grown, [str(sequence[1])], device="cpu", cache_dir=str(extend_cache), keep_cache=True, quiet=True)
    assert "resuming from epoch 1" in (grown / "run.log").read_text()

    assert [s.index for s in load_schedule(grown)] == stages[1:]
    for i in stages:
        assert_same_weights(stage_weights(batch, i), stage_weights(grown, i), f"stage {i}")
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


def test_interrupted_joint_run_resumes_to_identical_weights(tasks, cache, interrupt_last_stage, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "interrupted"
    run_experiment(spec("joint", tasks, cache), reference, quiet=True)
    last = load_schedule(reference)[-1].index
    arm, disarm = interrupt_last_stage
    arm(last)
    with pytest.raises(Interrupt):
        run_experiment(spec("joint", tasks, cache), resumed, quiet=True)
    disarm()
    assert not (resumed / "results.csv").exists()
    run_experiment(spec("joint", tasks, cache), resumed, quiet=True)
    assert "resuming from epoch 1" in (resumed / "run.log").read_text()
    assert_same_weights(stage_weights(reference, last), stage_weights(resumed, last), "joint")
    if not create_method("joint").keeps_old_data:
        images = [p for p in resumed.rglob("*") if p.name.endswith(IMAGE_SUFFIXES)]
        assert not images, f"joint wrote image data into its run folder: {images[:3]}"
