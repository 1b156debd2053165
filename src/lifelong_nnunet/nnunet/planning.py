"""Shared planning: nnU-Net plans one task once (the first, or the experiment's ``plan_with``), and every task is
preprocessed with that architecture and its own intensity normalisation.

One architecture (patch size, network topology, spacing) then serves the whole sequence, while each task's images are
normalised the way nnU-Net would normalise them for that task alone (its channel names' scheme, its own intensity
statistics; see ``normalisation``): a shared architecture must not mean a CT window applied to MR images. Planning sees
only the training cases: the run's workspace holds an nnU-Net raw view with links to the non-test cases, so test
images never influence the fingerprint. Workspaces live in a cache outside the run folder (preprocessed arrays are
image data; see docs) and are keyed by their inputs: the *set* of tasks with their training cases, the planning
task and the configuration. The order of the tasks is not part of the key, so every ordering of one sweep (with
the same ``plan_with``) reuses one planning, and runs on the same tasks and splits reuse it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..console import silenced_stdout
from ..errors import UserInputError
from ..experiment import task_id_of
from ..io_utils import write_json
from ..tasks import Task
from .env import nnunet_env
from .normalisation import task_normalisation, with_normalisation

PLANS_NAME = "nnUNetPlans"
# Part of every workspace key: a workspace preprocessed by an older rule (every task with the first task's
# normalisation) is never reused for the current one.
PREPROCESSING_RULE = "architecture shared, normalisation per task"


# nnU-Net's planner default, sized for a GPU
NNUNET_MEMORY_TARGET_GB = 8.0
# `planning.memory_target_gb: auto` on a CPU. Measured in benchmarks/cpu_planning.py (results/cpu_planning.md): on a
# native-resolution dataset (0.8 mm) nnU-Net's 8 GB plan (patch 192x192x64, batch 2) took 4.5 times as long per
# training step as the 2 GB plan (128x112x40) on 2 cores; 1 GB (96x96x32) was only 1.4 times faster again while
# seeing half the context, so 2 GB. Datasets whose images are smaller than the patch (the demo, the tests) plan
# the same at either target. Chosen for speed; the effect on accuracy is not measured.
CPU_MEMORY_TARGET_GB = 2.0


@dataclass(frozen=True)
class PlanningChoice:
    """The planner settings a run uses, resolved from the spec's ``planning`` for the machine, and why."""
    memory_target_gb: float
    target_spacing: tuple[float, ...] | None
    reason: str

    def to_dict(self) -> dict:
        return {"memory_target_gb": self.memory_target_gb, "target_spacing": self.target_spacing,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanningChoice":
        spacing = d.get("target_spacing")
        return cls(float(d["memory_target_gb"]), None if spacing is None else tuple(spacing), d.get("reason", ""))


# what runs planned before the choice was recorded used: nnU-Net's defaults
NNUNET_DEFAULTS = PlanningChoice(NNUNET_MEMORY_TARGET_GB, None, "nnU-Net's default planner memory target (8 GB)")


def resolve_planning(planning, device_type: str) -> PlanningChoice:
    """The spec's ``planning`` for a machine whose torch device is ``device_type`` ("cpu" or "cuda")."""
    spacing = None if planning.target_spacing is None else tuple(float(v) for v in planning.target_spacing)
    where = "" if spacing is None else f"; target spacing {'x'.join(f'{v:g}' for v in spacing)} mm as the spec says"
    if planning.memory_target_gb != "auto":
        gb = float(planning.memory_target_gb)
        return PlanningChoice(gb, spacing, f"planner memory target {gb:g} GB as the spec says{where}")
    if device_type == "cpu":
        return PlanningChoice(CPU_MEMORY_TARGET_GB, spacing,
                              f"planned for a CPU: planner memory target {CPU_MEMORY_TARGET_GB:g} GB instead of "
                              f"nnU-Net's GPU-sized {NNUNET_MEMORY_TARGET_GB:g} GB, so large images get a smaller "
                              f"patch that trains in seconds per iteration (planning.memory_target_gb; see docs/cli.md)"
                              f"{where}")
    return PlanningChoice(NNUNET_MEMORY_TARGET_GB, spacing,
                          f"nnU-Net's default planner memory target ({NNUNET_MEMORY_TARGET_GB:g} GB) for a GPU{where}")


def describe_plans(plans: dict, configuration: str) -> str:
    """The planned patch, batch and spacing in a few words, for the log and the report."""
    cm = plans["configurations"][configuration]
    return (f"patch {'x'.join(map(str, cm['patch_size']))}, batch {cm['batch_size']}, spacing "
            f"{'x'.join(f'{v:.3g}' for v in cm['spacing'])} mm")


def workspace_key(tasks: list[Task], configuration: str, plan_task: Task | None = None,
                  plans: dict | None = None, planning: PlanningChoice = NNUNET_DEFAULTS) -> str:
    """A hash of what planning depends on: the set of task folders with their training cases, the task planned on
    (default: the first) and the planner settings, or the given plans, and the configuration. Sorted, so that every
    ordering of the same tasks shares one key."""
    source = {"plans": plans} if plans is not None else {
        "plan_source": (plan_task or tasks[0]).name, "memory_target_gb": planning.memory_target_gb,
        "target_spacing": planning.target_spacing}
    blob = json.dumps({"config": configuration, **source, "rule": PREPROCESSING_RULE,
                       "tasks": sorted([str(t.folder), t.train_cases, t.dataset_json, _fingerprint(t)] for t in tasks)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fingerprint(task: Task) -> list:
    """Name, size and modification time of every training file: a dataset rebuilt under the same name (new images)
    gets a new key instead of silently reusing the old preprocessed data."""
    out = []
    for cid in task.train_cases:
        case = task.cases[cid]
        for f in (*case.images, case.label):
            st = Path(f).stat()
            out.append([Path(f).name, st.st_size, st.st_mtime_ns])
    return out


def find_plan_task(tasks: list[Task], plan_with: str | int | None) -> Task:
    """The task nnU-Net plans on: ``plan_with`` (a folder, dataset name or ID, matched by dataset ID), else the
    first task."""
    if plan_with is None:
        return tasks[0]
    wanted = task_id_of(plan_with)
    for t in tasks:
        if wanted in (t.dataset_id, str(t.folder), t.name):
            return t
    raise UserInputError(f"plan_with '{plan_with}' is not one of the tasks ({', '.join(t.name for t in tasks)}). "
                         f"Name one of them (folder, dataset name or ID), or leave plan_with out to plan with the "
                         f"first task.")


class Workspace:
    """nnU-Net raw/preprocessed folders for one (set of tasks, splits, planning task, configuration) combination.

    With ``plans`` (a run's stored plans, when ``extend`` adds tasks to a finished run) nothing is planned: every
    task is preprocessed with exactly those plans, as the planning task's plans are moved to the other tasks of a
    batch run, so a task added later gets the same preprocessed arrays as in a run that had it from the start."""

    def __init__(self, root: Path, tasks: list[Task], configuration: str, plan_with: str | int | None = None,
                 plans: dict | None = None, planning: PlanningChoice = NNUNET_DEFAULTS) -> None:
        self.given_plans = plans
        self.planning = planning
        self.plan_task = None if plans is not None else find_plan_task(tasks, plan_with)
        self.root = Path(root) / workspace_key(tasks, configuration, self.plan_task, plans, planning)
        self.tasks = tasks
        self.configuration = configuration
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"

    @property
    def done_marker(self) -> Path:
        return self.root / "planned.json"

    def env(self, **kw):
        return nnunet_env(self.raw, self.preprocessed, **kw)

    def plans(self, task: Task) -> dict:
        return json.loads((self.preprocessed / task.name / f"{PLANS_NAME}.json").read_text())

    def preprocessed_folder(self, task: Task) -> Path:
        data_id = self.plans(task)["configurations"][self.configuration]["data_identifier"]
        return self.preprocessed / task.name / data_id

    def dataset_json(self, task: Task) -> dict:
        return json.loads((self.raw / task.name / "dataset.json").read_text())

    @property
    def lock_file(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")

    def remove(self) -> None:
        """Delete the workspace (its preprocessed data) and its lock file."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.lock_file.unlink(missing_ok=True)

    def ensure_planned(self, log=print) -> None:
        """Plan and preprocess once; a finished workspace is reused, an interrupted one is redone from scratch.

        Runs that share a cache may start at the same time (two terminals, a sweep's parallel runs): the workspace's
        lock file lets one plan while the others wait, and they then reuse its result instead of removing the
        folder it is writing."""
        from filelock import FileLock, Timeout
        self.root.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"Waiting for another run that is planning the same data in {self.root} ...")
            lock.acquire()
        try:
            self._ensure_planned(log)
        finally:
            lock.release()

    def _ensure_planned(self, log) -> None:
        if self.done_marker.is_file():
            log(f"Reusing planned and preprocessed data in {self.root}")
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        tmp = self.root.with_name(self.root.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        self._link_training_cases(tmp / "nnUNet_raw")
        # In a child process: nnU-Net's planning starts worker processes (which need a __main__ guard in the
        # caller's script) and leaves process state behind that changed the float bits of the next training.
        # the planning task first (its plans are moved to the others), the others in a fixed order
        others = sorted((t for t in self.tasks if t is not self.plan_task), key=lambda t: t.name)
        first = [self.plan_task] if self.plan_task is not None else []
        if self.given_plans is not None:
            write_json(tmp / "given_plans.json", self.given_plans)
        args = json.dumps({"root": str(tmp), "configuration": self.configuration,
                           "tasks": [[t.name, t.dataset_id] for t in [*first, *others]],
                           "given_plans": self.given_plans is not None, "planning": self.planning.to_dict()})
        child = subprocess.Popen([sys.executable, "-m", __name__, args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        output = []
        for line in child.stdout:
            output.append(line)
            if line.startswith(PROGRESS_PREFIX):
                log(line[len(PROGRESS_PREFIX):].rstrip())
        if child.wait() != 0:
            raise RuntimeError("nnU-Net planning/preprocessing failed:\n" + "".join(output[-40:]))
        os.replace(tmp, self.root)
        write_json(self.done_marker, {"tasks": sorted(t.name for t in self.tasks), "configuration": self.configuration,
                                      "plan_with": self.plan_task.name if self.plan_task else "given plans"})

    def _link_training_cases(self, raw: Path) -> None:
        for t in self.tasks:
            dst = raw / t.name
            (dst / "imagesTr").mkdir(parents=True)
            (dst / "labelsTr").mkdir()
            for cid in t.train_cases:
                case = t.cases[cid]
                for img in case.images:
                    (dst / "imagesTr" / img.name).symlink_to(img.resolve())
                (dst / "labelsTr" / case.label.name).symlink_to(case.label.resolve())
            djson = dict(t.dataset_json, numTraining=len(t.train_cases))
            (dst / "dataset.json").write_text(json.dumps(djson, indent=2))


def cached_workspaces(root: Path) -> list[dict]:
    """The workspaces under a cache folder (finished or interrupted), with their tasks and size in bytes."""
    root = Path(root)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        marker = folder / "planned.json"
        tasks = json.loads(marker.read_text()).get("tasks", []) if marker.is_file() else []
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        out.append({"path": str(folder), "tasks": tasks, "bytes": size})
    return out


def clear_cache(root: Path) -> tuple[int, int]:
    """Delete every workspace under ``root``; return how many and their size. Runs never need them again."""
    entries = cached_workspaces(root)
    for entry in entries:
        shutil.rmtree(entry["path"])
    for lock in Path(root).glob("*.lock") if Path(root).is_dir() else []:  # the lock files of Workspace.ensure_planned
        lock.unlink(missing_ok=True)
    return len(entries), sum(e["bytes"] for e in entries)


PROGRESS_PREFIX = "@progress "

# Training data (images and labels, bytes on disk) up to which nnU-Net's worker pools run as one thread inside the
# planning process (`_in_process_pools`). Each of nnU-Net's spawned workers imports torch and nnU-Net before it does
# any work, which costs more than the work on small data: planning and preprocessing two 4-case 24^3 tasks took
# 80-104 s with nnU-Net's processes and 35-36 s in-process, with the same bytes written (benchmarks/planning_pools.py,
# results/planning_pools.md; a shared, loaded 2-core machine). The test and demo datasets are a few MB at most.
# Larger datasets keep nnU-Net's parallel processes, where the work outweighs their start.
IN_PROCESS_PLANNING_BYTES = 32 * 2**20


def training_bytes(raw: Path) -> int:
    """Bytes on disk of the training images and labels under a workspace's raw view (links followed)."""
    return sum(f.stat().st_size for pattern in ("*/imagesTr/*", "*/labelsTr/*") for f in raw.glob(pattern))


@contextlib.contextmanager
def _in_process_pools():
    """Run nnU-Net's worker pools (fingerprint extraction and preprocessing: spawned processes; file listing: 12
    forked ones) as a single thread of this process. The same per-case functions run on the same inputs, one case
    after another, and nnU-Net gathers their results in case order as before, so the fingerprint, plans and
    preprocessed arrays are the same bytes (compared by benchmarks/planning_pools.py); only the start of the
    processes is saved. Used only in the planning child process, which is started for planning alone."""
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    from nnunetv2.utilities import utils

    real_get_context, real_pool = multiprocessing.get_context, utils.Pool

    class _Context:  # nnU-Net asks for get_context("spawn").Pool(n)
        def __init__(self, method=None):
            self._context = real_get_context(method)

        def __getattr__(self, name):
            return getattr(self._context, name)

        @staticmethod
        def Pool(processes=None, *args, **kw):
            return ThreadPool(1)

    multiprocessing.get_context = _Context
    utils.Pool = lambda processes=None, *args, **kw: ThreadPool(1)
    try:
        yield
    finally:
        multiprocessing.get_context, utils.Pool = real_get_context, real_pool


def _pools_for(raw: Path):
    """nnU-Net's own worker processes for a large dataset, one thread of this process for a small one."""
    return _in_process_pools() if training_bytes(raw) <= IN_PROCESS_PLANNING_BYTES else contextlib.nullcontext()


def _preprocess_with_given_plans(plans: dict, tasks: list[tuple[str, int]], configuration: str, log) -> None:
    """Each task preprocessed with ``plans``, written for it the way nnU-Net's ``move_plans_between_datasets``
    writes them (dataset name, plans name, the reader/writer its files need), without planning. The task's own
    fingerprint is still extracted: nnU-Net's trainer copies it into its output folder."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    for i, (name, dataset_id) in enumerate(tasks):
        raw = Path(os.environ["nnUNet_raw"]) / name
        target = Path(os.environ["nnUNet_preprocessed"]) / name
        target.mkdir(parents=True, exist_ok=True)
        dataset_json = json.loads((raw / "dataset.json").read_text())
        example = next(iter(get_filenames_of_train_images_and_targets(str(raw), dataset_json).values()))["images"][0]
        reader = determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                           verbose=False)
        log(f"Planning [{i + 1}/{len(tasks)}] {name}: fingerprint and normalisation (the architecture is the run's)")
        with silenced_stdout():
            extract_fingerprint_dataset(dataset_id, num_processes=2, verbose=False, show_progress_bar=False)
            plan_experiment_dataset(dataset_id)  # only for the normalisation nnU-Net chooses for this task
        own = task_normalisation(_read_plans(target), configuration)
        moved = {**plans, "dataset_name": name, "image_reader_writer": reader.__name__, "plans_name": PLANS_NAME}
        _write_plans(target, with_normalisation(moved, configuration, own))
        shutil.copy(raw / "dataset.json", target / "dataset.json")
        log(f"Preprocessing [{i + 1}/{len(tasks)}] {name} with the run's stored plans")
        with silenced_stdout():
            preprocess_dataset(dataset_id, PLANS_NAME, (configuration,), (2,), verbose=False,
                               show_progress_bar=False)
        shutil.rmtree(target / "gt_segmentations", ignore_errors=True)


def _plan_and_preprocess(tasks: list[tuple[str, int]], configuration: str, log,
                         planning: PlanningChoice = NNUNET_DEFAULTS) -> None:
    # imported here: nnunetv2 reads its folder variables at import time in places, so import inside the env
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    first_name, first_id = tasks[0]
    for i, (name, dataset_id) in enumerate(tasks):
        log(f"Planning [{i + 1}/{len(tasks)}] {name}: fingerprint")
        with silenced_stdout():
            extract_fingerprint_dataset(dataset_id, num_processes=2, verbose=False, show_progress_bar=False)
            if dataset_id == first_id:  # the architecture of the whole run
                plan_experiment_dataset(dataset_id, gpu_memory_target_in_gb=planning.memory_target_gb,
                                        overwrite_target_spacing=planning.target_spacing)
            else:  # only for its normalisation; also places dataset.json where preprocessing needs it
                plan_experiment_dataset(dataset_id)
                target = Path(os.environ["nnUNet_preprocessed"]) / name
                own = task_normalisation(_read_plans(target), configuration)
                move_plans_between_datasets(first_id, dataset_id, PLANS_NAME, PLANS_NAME)
                _write_plans(target, with_normalisation(_read_plans(target), configuration, own))
        log(f"Preprocessing [{i + 1}/{len(tasks)}] {name} with the plans of {first_name}"
            + ("" if dataset_id == first_id else " and its own normalisation"))
        with silenced_stdout():
            preprocess_dataset(dataset_id, PLANS_NAME, (configuration,), (2,), verbose=False,
                               show_progress_bar=False)
        # nnU-Net copies the label maps here for its own validation; we evaluate from the raw test files instead
        shutil.rmtree(Path(os.environ["nnUNet_preprocessed"]) / name / "gt_segmentations", ignore_errors=True)


def _read_plans(preprocessed_task: Path) -> dict:
    return json.loads((preprocessed_task / f"{PLANS_NAME}.json").read_text())


def _write_plans(preprocessed_task: Path, plans: dict) -> None:
    (preprocessed_task / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=4))


def _child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    root = Path(spec["root"])
    tasks, log = [tuple(t) for t in spec["tasks"]], lambda msg: print(PROGRESS_PREFIX + msg, flush=True)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0: a user who trains with
    # augmentation in the main process (nnUNet_n_proc_DA=0) still plans, with one thread
    threads = "1" if os.environ.get("nnUNet_n_proc_DA", "").strip() == "0" else os.environ.get("nnUNet_n_proc_DA")
    with nnunet_env(root / "nnUNet_raw", root / "nnUNet_preprocessed",
                    **({"nnUNet_n_proc_DA": threads} if threads else {})), _pools_for(root / "nnUNet_raw"):
        if spec["given_plans"]:
            _preprocess_with_given_plans(json.loads((root / "given_plans.json").read_text()), tasks,
                                         spec["configuration"], log)
        else:
            _plan_and_preprocess(tasks, spec["configuration"], log, PlanningChoice.from_dict(spec["planning"]))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
