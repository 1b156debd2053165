"""Planning for the machine at hand: nnU-Net's planner memory target chosen for a CPU (its GPU-sized default gives a
native-resolution dataset minutes per iteration there), set by the spec or the flags, recorded, and kept on resume."""
from __future__ import annotations

import pytest

from lifelong_nnunet.errors import UserInputError
from lifelong_nnunet.experiment import Planning, experiment_from_dict
from lifelong_nnunet.nnunet.planning import (CPU_MEMORY_TARGET_GB, NNUNET_DEFAULTS, NNUNET_MEMORY_TARGET_GB,
                                             PlanningChoice, describe_plans, resolve_planning, workspace_key)


def test_auto_is_nnunets_default_on_a_gpu_and_the_cpu_target_on_a_cpu_and_a_given_target_wins():
    assert CPU_MEMORY_TARGET_GB < NNUNET_MEMORY_TARGET_GB
    cpu, gpu = resolve_planning(Planning(), "cpu"), resolve_planning(Planning(), "cuda")
    assert cpu.memory_target_gb == CPU_MEMORY_TARGET_GB and "planned for a CPU" in cpu.reason
    assert gpu.memory_target_gb == NNUNET_MEMORY_TARGET_GB and "for a GPU" in gpu.reason
    given = resolve_planning(Planning(memory_target_gb=4, target_spacing=[1.5, 1, 1]), "cpu")
    assert (given.memory_target_gb, given.target_spacing) == (4.0, (1.5, 1.0, 1.0))
    assert "as the spec says" in given.reason and "1.5x1x1 mm" in given.reason
    assert PlanningChoice.from_dict(given.to_dict()) == given  # what planning.json stores reads back the same


def test_the_planner_settings_are_part_of_the_cache_key(raw_sites):
    from lifelong_nnunet.tasks import load_task
    tasks = [load_task(p) for p in raw_sites]
    for t in tasks:
        t.test_cases = sorted(t.cases)[:1]
    keys = {workspace_key(tasks, "3d_fullres", planning=c) for c in
            [NNUNET_DEFAULTS, PlanningChoice(2.0, None, ""), PlanningChoice(2.0, (1.5, 1.5, 1.5), "")]}
    assert len(keys) == 3
    assert workspace_key(tasks, "3d_fullres", planning=PlanningChoice(2.0, None, "why")) == \
        workspace_key(tasks, "3d_fullres", planning=PlanningChoice(2.0, None, "other words"))  # the reason is no input


@pytest.mark.parametrize("planning, message", [
    ({"memory_target_gb": "lots"}, "memory_target_gb must be 'auto' or a number"),
    ({"memory_target_gb": 0}, "memory_target_gb must be 'auto' or a number"),
    ({"target_spacing": [1, 1]}, "three spacings in mm"),
    ({"target_spacing": [1, 1, -1]}, "three spacings in mm"),
    ({"memory_targt_gb": 2}, "unknown key"),
])
def test_bad_planning_settings_are_refused_with_the_fix(planning, message):
    with pytest.raises(UserInputError, match=message):
        experiment_from_dict({"tasks": ["/data/Dataset001_A"], "planning": planning})


def test_a_target_spacing_needs_3d_fullres_as_in_nnunet():
    with pytest.raises(UserInputError, match="3d_fullres configuration only"):
        experiment_from_dict({"tasks": ["/data/Dataset001_A"], "configuration": "2d",
                              "planning": {"target_spacing": [1, 1, 1]}})


def test_cli_flags_set_the_planning_and_a_bad_value_exits_2(cli_in_process, tmp_path):
    code, _, err = cli_in_process("run", "--tasks", str(tmp_path / "none"), "-o", str(tmp_path / "run"),
                                  "--memory-target-gb", "four")
    assert code == 2 and "--memory-target-gb 'four' is not a number" in err
    code, _, err = cli_in_process("run", "--tasks", str(tmp_path / "none"), "-o", str(tmp_path / "run"),
                                  "--configuration", "2d", "--target-spacing", "1,1,1")
    assert code == 2 and "3d_fullres configuration only" in err
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_plans_as_it_did_and_an_older_run_with_nnunets_defaults(tmp_path):
    from lifelong_nnunet.run_folder import RunFolder
    from lifelong_nnunet.runner import planning_for
    exp = experiment_from_dict({"tasks": ["/data/Dataset001_A"], "device": "cpu"})
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    assert planning_for(run, exp).memory_target_gb == CPU_MEMORY_TARGET_GB  # new run on a CPU
    run.write_plans({"configurations": {}})
    assert planning_for(run, exp) == NNUNET_DEFAULTS  # planned before planning.json existed
    recorded = PlanningChoice(3.0, None, "planned on another machine")
    run.write_planning(recorded.to_dict())
    assert planning_for(run, exp) == recorded  # resumed anywhere: as it was planned


def test_the_plans_are_described_in_one_line():
    plans = {"configurations": {"3d_fullres": {"patch_size": [40, 80, 80], "batch_size": 2,
                                               "spacing": [0.8, 0.8, 0.8]}}}
    assert describe_plans(plans, "3d_fullres") == "patch 40x80x80, batch 2, spacing 0.8x0.8x0.8 mm"


def test_a_budget_that_would_take_hours_is_warned_about_once_after_the_first_epoch(monkeypatch):
    from lifelong_nnunet.stages import training
    clock = [1000.0]
    monkeypatch.setattr(training.time, "time", lambda: clock[0])
    slow = training.IterationSpeed(total=100 * 250)
    for _ in range(250):
        clock[0] += 2.0  # 2 s per iteration: the 99 epochs left take 13.8 h
        slow.tick()
    assert slow.seconds_per_iteration == pytest.approx(2.0)
    warning = slow.slow_budget_warning(stage=1, left_iterations=99 * 250)
    assert warning and "13.8 h" in warning and "2.0 s per iteration" in warning and "docs/cli.md" in warning
    assert slow.slow_budget_warning(stage=1, left_iterations=98 * 250) is None  # said once
    quick = training.IterationSpeed(total=5 * 20)
    for _ in range(20):
        clock[0] += 2.0
        quick.tick()
    assert quick.slow_budget_warning(stage=1, left_iterations=4 * 20) is None  # 160 s left: nothing to say


def test_a_small_dataset_plans_with_nnunets_pools_as_one_thread_of_the_planning_process(tmp_path, monkeypatch):
    """nnU-Net's pools (spawned for the fingerprint and preprocessing, forked for file listing) run the work in the
    planning process itself for small data, and are nnU-Net's own again afterwards and for large data."""
    import multiprocessing
    import os

    from nnunetv2.utilities import utils

    from lifelong_nnunet.nnunet import planning
    images = tmp_path / "raw" / "Dataset001_A" / "imagesTr"
    images.mkdir(parents=True)
    (images / "a_0000.nii.gz").write_bytes(b"x" * 1000)
    (images.parent / "dataset.json").write_text("{}")  # not training data: not counted
    assert planning.training_bytes(tmp_path / "raw") == 1000
    real_context, real_pool = multiprocessing.get_context, utils.Pool
    with planning._pools_for(tmp_path / "raw"):
        for pool in (multiprocessing.get_context("spawn").Pool(2), utils.Pool(processes=12)):
            with pool:
                assert pool.starmap(os.getpid, [(), ()]) == [os.getpid()] * 2 and len(pool._pool) == 1
    assert (multiprocessing.get_context, utils.Pool) == (real_context, real_pool)
    monkeypatch.setattr(planning, "IN_PROCESS_PLANNING_BYTES", 999)
    with planning._pools_for(tmp_path / "raw"):
        assert (multiprocessing.get_context, utils.Pool) == (real_context, real_pool)


def test_a_run_waits_for_another_planning_the_same_workspace_then_reuses_it(raw_sites, tmp_path):
    """Two runs sharing a cache start at once: the second waits on the workspace's lock and then reuses the first's
    planning, instead of removing the folder being written (which crashed it with a traceback)."""
    import threading

    from filelock import FileLock

    from lifelong_nnunet.nnunet.planning import Workspace, clear_cache
    from lifelong_nnunet.tasks import load_task
    tasks = [load_task(p) for p in raw_sites]
    workspace = Workspace(tmp_path / "cache", tasks, "2d")
    workspace.root.parent.mkdir(parents=True)
    messages: list[str] = []
    other = FileLock(workspace.lock_file)
    other.acquire()  # "another run" is planning
    waiting = threading.Thread(target=workspace.ensure_planned, args=(messages.append,))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and messages and messages[0].startswith("Waiting for another run")
    workspace.root.mkdir()
    (workspace.root / "kept.txt").write_text("the other run's work")
    workspace.done_marker.write_text("{}")  # ... which finishes
    other.release()
    waiting.join(timeout=30)
    assert not waiting.is_alive() and messages[-1].startswith("Reusing planned")
    assert (workspace.root / "kept.txt").is_file()  # nothing of the other run's planning was removed
    assert clear_cache(tmp_path / "cache")[0] == 1 and not any((tmp_path / "cache").iterdir())  # nor a lock left
