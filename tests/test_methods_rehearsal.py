"""Rehearsal: a bounded, seeded memory of earlier tasks' case IDs, mixed into batches with its share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.methods import Stage, create_method
from lifelong_nnunet.nnunet.trainer import MultiSourceDataset
from lifelong_nnunet.stages import StageSources
from lifelong_nnunet.tasks import Case, Task


def task_cases(i: int, n: int = 12) -> list[str]:
    return [f"t{i}_case_{k:03d}" for k in range(n)]


def run_stages(method, n_tasks: int, n_cases: int = 12) -> list[dict[str, list[str]]]:
    """The buffers the runner would get for stages 2..n_tasks (stage k sees tasks 1..k-1 as earlier)."""
    earlier, buffers = {}, []
    for k in range(1, n_tasks + 1):
        if earlier:
            buffers.append(method.replay_buffer(Stage(k, (f"task{k}",)), dict(earlier)))
        earlier[f"task{k}"] = task_cases(k, n_cases)
    return buffers


def test_rehearsal_is_discovered_and_declares_it_keeps_old_data():
    method = create_method("rehearsal")
    assert method.keeps_old_data
    assert method.config == {"cases_per_task": 2, "max_cases": 20, "share": 0.3, "seed": 0}
    assert method.replay_share(Stage(2, ("b",))) == 0.3


@pytest.mark.parametrize("params", [{"cases_per_task": 3, "max_cases": 7}, {"cases_per_task": 0.5, "max_cases": 10},
                                    {"cases_per_task": 5, "max_cases": 4}, {"cases_per_task": 1, "max_cases": 1}])
def test_buffer_never_exceeds_max_cases(params):
    method = create_method("rehearsal", params)
    buffers = run_stages(method, n_tasks=15)
    for buf in buffers:
        assert sum(len(v) for v in buf.values()) <= params["max_cases"]
    assert sum(len(v) for v in method.buffer.values()) <= params["max_cases"]
    final = buffers[-1]
    sizes = [len(v) for v in final.values()]
    assert max(sizes) - min(sizes) <= 1  # shares even out (the oldest tasks may have dropped out)
    # a case once dropped never comes back, and a task's kept cases are a prefix of its first sample
    first = {}
    for buf in buffers:
        for task, cases in buf.items():
            first.setdefault(task, cases)
            assert cases == first[task][:len(cases)]


def test_buffer_fills_up_to_the_bound_evenly():
    method = create_method("rehearsal", {"cases_per_task": 4, "max_cases": 10})
    buffers = run_stages(method, n_tasks=5)
    assert [sum(map(len, b.values())) for b in buffers] == [4, 8, 10, 10]
    assert sorted(len(v) for v in buffers[-1].values()) == [2, 2, 3, 3]
    assert [len(v) for v in buffers[1].values()] == [4, 4]


def test_fraction_of_cases_per_task():
    method = create_method("rehearsal", {"cases_per_task": 0.25, "max_cases": None})
    buf = run_stages(method, n_tasks=3, n_cases=10)[-1]
    assert [len(v) for v in buf.values()] == [3, 3]  # ceil(0.25 * 10)


def test_same_seed_same_buffer_and_other_seed_other_buffer():
    a = run_stages(create_method("rehearsal", {"seed": 7, "cases_per_task": 3}), n_tasks=6, n_cases=30)
    b = run_stages(create_method("rehearsal", {"seed": 7, "cases_per_task": 3}), n_tasks=6, n_cases=30)
    c = run_stages(create_method("rehearsal", {"seed": 8, "cases_per_task": 3}), n_tasks=6, n_cases=30)
    assert a == b
    assert a != c


def test_sample_of_a_task_is_kept_for_later_stages():
    method = create_method("rehearsal", {"cases_per_task": 2, "max_cases": None})
    buffers = run_stages(method, n_tasks=4)
    assert buffers[0]["task1"] == buffers[1]["task1"] == buffers[2]["task1"]


def test_buffer_only_holds_the_given_earlier_training_cases():
    method = create_method("rehearsal", {"cases_per_task": 5, "max_cases": 100})
    earlier = {"task1": task_cases(1, 8), "task2": task_cases(2, 3)}
    buf = method.replay_buffer(Stage(3, ("task3",)), earlier)
    assert set(buf) == set(earlier)
    for task, cases in buf.items():
        assert cases and set(cases) <= set(earlier[task]) and len(set(cases)) == len(cases)
    assert len(buf["task2"]) == 3  # never more than the task has


def test_state_round_trip_restores_the_buffer_exactly(tmp_path):
    method = create_method("rehearsal", {"cases_per_task": 3, "max_cases": 8, "seed": 3})
    run_stages(method, n_tasks=4)
    path = tmp_path / "state.pt"
    torch.save({"method_state": method.state_dict()}, path)
    restored = create_method("rehearsal", {"cases_per_task": 3, "max_cases": 8, "seed": 3})
    restored.load_state_dict(torch.load(path, weights_only=True)["method_state"])
    assert restored.buffer == method.buffer and list(restored.buffer) == list(method.buffer)
    earlier = {f"task{k}": task_cases(k) for k in range(1, 6)}
    assert restored.replay_buffer(Stage(6, ("task6",)), dict(earlier)) == \
        method.replay_buffer(Stage(6, ("task6",)), dict(earlier))


@pytest.mark.parametrize("params", [{"share": 1.0}, {"share": -0.1}, {"cases_per_task": 0}, {"cases_per_task": 1.5},
                                    {"max_cases": 0}, {"seed": "x"}, {"buffer_size": 3}])
def test_bad_parameters_are_user_errors(params):
    with pytest.raises(UserInputError):
        create_method("rehearsal", params)


class FakeDataset(nnUNetBaseDataset):
    """nnUNetBaseDataset's constructor (folder, identifiers); cases are never on disk."""

    def load_case(self, identifier):
        return identifier, None, None, {"folder": self.source_folder}

    @staticmethod
    def save_case(*args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def get_identifiers(folder):
        raise NotImplementedError


def stage_sources(tmp_path: Path, method, tasks: dict[str, list[str]]) -> StageSources:
    """The runner's stage sources over tasks whose cases exist only as IDs (nothing is read from disk)."""
    task_objs = [Task(tmp_path / "raw" / name, {"labels": {"background": 0, "a": 1}},
                      {c: Case(c, (), tmp_path / "raw" / name / f"{c}.nii.gz") for c in cases})
                 for name, cases in tasks.items()]
    return StageSources(task_objs, method, method.schedule(list(tasks)), lambda t: tmp_path / "pre" / t.name,
                        lambda name: tmp_path / "replay" / name, validation_fraction=0.2, seed=0)


@pytest.mark.parametrize("share", [0.3, 0.5, 0.1])
def test_batches_draw_the_replay_share(tmp_path, share):
    method = create_method("rehearsal", {"cases_per_task": 3, "max_cases": 5, "share": share})
    tasks = {"Dataset001_A": task_cases(1, 10), "Dataset002_B": task_cases(2, 7), "Dataset003_C": task_cases(3, 13)}
    sources_of = stage_sources(tmp_path, method, tasks)
    stage = method.schedule(list(tasks))[2]
    sources = sources_of(stage)
    replay = [s for s in sources if s.task not in stage.train_tasks]
    assert {s.task for s in replay} == {"Dataset001_A", "Dataset002_B"}
    assert sum(len(s.train_keys) for s in replay) == 5
    for s in replay:  # replayed from the run folder's copies, never from the cache
        assert set(s.train_keys) <= set(tasks[s.task]) and not s.val_keys and s.folder == tmp_path / "replay" / s.task
    dataset = MultiSourceDataset({s.task: (FakeDataset, s.folder, s.train_keys) for s in sources},
                                 {s.task: s.weight for s in sources})
    rng = np.random.default_rng(0)
    draws = rng.choice(len(dataset.identifiers), 20000, replace=True)  # nnU-Net's loader: uniform, with replacement
    replay_tasks = {s.task for s in replay}
    fraction = np.mean([dataset.identifiers[i].split("/", 1)[0] in replay_tasks for i in draws])
    assert abs(fraction - share) <= 0.02
    case = dataset.load_case(dataset.identifiers[int(draws[0])])
    assert case[0] in tasks[dataset.identifiers[int(draws[0])].split("/", 1)[0]]


def test_no_replay_in_the_first_stage(tmp_path):
    method = create_method("rehearsal")
    tasks = {"Dataset001_A": task_cases(1, 6), "Dataset002_B": task_cases(2, 6)}
    sources_of = stage_sources(tmp_path, method, tasks)
    assert [s.task for s in sources_of(method.schedule(list(tasks))[0])] == ["Dataset001_A"]
    assert not method.buffer
