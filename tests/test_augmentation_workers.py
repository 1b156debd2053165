"""Training with augmentation workers (``nnUNet_n_proc_DA`` > 0) is reproducible: each batch is seeded in its worker
from its place in the stage, and the workers' batches are taken in a fixed order (`SeededBatches`)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import experiment_from_dict
from lifelong_nnunet.nnunet.env import augmentation_workers
from lifelong_nnunet.nnunet.trainer import ContinualTrainer, SeededBatches
from lifelong_nnunet.runner import run_experiment


class RandomDraws:
    """A stand-in for nnU-Net's loader: every batch is draws from the three global generators its process holds."""

    def set_thread_id(self, thread_id):
        pass

    def __next__(self):
        return {"numpy": np.random.rand(4), "torch": torch.rand(4).numpy(), "python": np.array([random.random()])}


def batches(workers: int, n: int, start: int = 0, key=(7, 1, 0)) -> list[np.ndarray]:
    augmenter = MultiThreadedAugmenter(SeededBatches(RandomDraws(), key, 3, start, workers), None, workers,
                                       wait_time=0.002)
    try:
        return [np.concatenate(list(next(augmenter).values())) for _ in range(n)]
    finally:
        augmenter._finish()


def test_seeded_batches_depend_only_on_their_place_in_the_stage():
    two = batches(2, 9)
    assert len({b.tobytes() for b in two}) == 9, "two batches drew the same numbers"
    # bitwise by construction: the same seeds and the same draws in a process of the same kind
    assert all(np.array_equal(a, b) for a, b in zip(two, batches(2, 9))), "two runs differ"
    assert all(np.array_equal(a, b) for a, b in zip(two, batches(1, 9))), "1 worker and 2 workers differ"
    # a stage resumed at epoch 1 of 3 batches each (its loader starts at batch 3) continues the stream; with 2
    # workers, batch 3 now falls to worker 0 instead of worker 1
    assert all(np.array_equal(a, b) for a, b in zip(two[3:], batches(2, 6, start=3))), "the resumed stream differs"
    other_stage = batches(2, 3, key=(7, 2, 0))
    assert not any(np.array_equal(a, b) for a, b in zip(two, other_stage)), "another stage drew the same batches"


def test_worker_count_is_the_users_or_the_devices_default(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    assert augmentation_workers(torch.device("cpu")) == "3"
    monkeypatch.setenv("nnUNet_n_proc_DA", "two")
    with pytest.raises(UserInputError, match="nnUNet_n_proc_DA is 'two'"):
        augmentation_workers(torch.device("cpu"))
    monkeypatch.delenv("nnUNet_n_proc_DA")
    from lifelong_nnunet.nnunet import env
    assert augmentation_workers(torch.device("cpu")) == str(env.CPU_AUGMENTATION_WORKERS)
    monkeypatch.setattr("nnunetv2.utilities.default_n_proc_DA.get_allowed_n_proc_DA", lambda: 11)
    assert augmentation_workers(torch.device("cuda")) == "11"  # nnU-Net's own default on a GPU


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_two_workers_train_bitwise_equal_runs_and_resume(synthetic_tasks, planning_cache, monkeypatch, tmp_path):
    """An uninterrupted run, and a run interrupted after its first epoch and resumed, with 2 workers each: equal
    weights (CPU, same seeds, same computation: bitwise), so two runs agree and a resumed stage continues the
    batches of the uninterrupted one."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    spec = experiment_from_dict({"tasks": [str(synthetic_tasks[0])], "method": "sequential", "configuration": "2d",
                                 "device": "cpu", "cache_dir": str(planning_cache),
                                 "training": {"epochs": 2, "iterations_per_epoch": 3, "val_iterations": 1,
                                              "batch_size": 2}})
    seen = []
    original = ContinualTrainer.on_epoch_end

    def watch(self):
        seen.append((type(self.dataloader_train), self.dataloader_train.num_processes))
        original(self)
    monkeypatch.setattr(ContinualTrainer, "on_epoch_end", watch)
    run_experiment(spec, tmp_path / "reference", quiet=True)
    assert seen and set(seen) == {(MultiThreadedAugmenter, 2)}, seen

    def cut(self):
        original(self)
        if self.current_epoch == 1:
            raise Interrupt
    monkeypatch.setattr(ContinualTrainer, "on_epoch_end", cut)
    with pytest.raises(Interrupt):
        run_experiment(spec, tmp_path / "resumed", quiet=True)
    monkeypatch.setattr(ContinualTrainer, "on_epoch_end", original)
    run_experiment(spec, tmp_path / "resumed", quiet=True)
    assert "resuming from epoch 1" in (tmp_path / "resumed" / "run.log").read_text()

    def weights(run):
        return torch.load(run / "stages" / "stage_1" / "model.pt", map_location="cpu",
                          weights_only=True)["network_weights"]
    a, b = weights(tmp_path / "reference"), weights(tmp_path / "resumed")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"
    # the worker count is part of what makes a run reproducible, so the stage records it
    info = torch.load(tmp_path / "resumed" / "stages" / "stage_1" / "model.pt", weights_only=True)["info"]
    assert info["augmentation_workers"] == 2
