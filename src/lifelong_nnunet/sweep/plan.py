"""The plan of a sweep: every run (method x ordering x seed) as a full experiment, and how the plan meets the sweep
folder (which runs are finished, whether the folder holds this same sweep).

Every run plans with the same task (``plan_with``, default the given order's first task), and the planning cache is
keyed by the set of tasks, not their order, so all orderings and methods of one seed share one planning and
preprocessing. (Different seeds hold out different test cases, and planning sees only training cases, so each seed
plans once.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import RunLog
from ..errors import UserInputError
from ..experiment import experiment_from_dict, task_id_of
from ..orderings import Ordering, make_orderings
from ..run_folder import RunFolder, SweepFolder
from .spec import NOT_IDENTITY, SweepSpec


@dataclass
class PlannedRun:
    """One run of a sweep: ``experiment`` is the full spec dict handed to ``run_experiment``."""
    method: str
    ordering: str
    order: list[str]
    seed: int
    path: str  # relative to the sweep folder
    experiment: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.ordering} seed{self.seed}"

    def to_json(self) -> dict:
        return {"method": self.method, "ordering": self.ordering, "order": list(self.order), "seed": self.seed,
                "path": self.path}


def plan_runs(spec: SweepSpec) -> tuple[list[PlannedRun], list[Ordering]]:
    """Resolve the tasks, draw the orderings and list every run (seed, then ordering, then method), so that early
    results already compare every method."""
    from ..tasks import resolve_task_folder

    shared = dict(spec.shared)
    raw_root = shared.get("raw_root") or os.environ.get("nnUNet_raw")
    folders = [resolve_task_folder(t, Path(raw_root) if raw_root else None) for t in spec.tasks]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise UserInputError(f"The sweep's tasks name one dataset twice ({spec.tasks} -> {names}). Give each task "
                             f"once.")
    by_name = dict(zip(names, folders))
    orderings = make_orderings(names, spec.orderings, spec.ordering_seed, spec.max_orderings)
    plan_with = folders[0]
    if shared.get("plan_with") is not None:
        wanted = task_id_of(shared["plan_with"])
        plan_with = next(f for f in folders if task_id_of(str(f)) == wanted)  # validated with the spec
    shared["plan_with"] = str(plan_with)
    shared["cache_dir"] = str(Path(shared["cache_dir"]).expanduser().resolve() if shared.get("cache_dir")
                              else _default_cache_dir())  # Ray workers must not fall back to their own home
    runs = []
    for seed in spec.seeds:
        for ordering in orderings:
            for method in spec.methods:
                exp = {**shared, "tasks": [str(by_name[n]) for n in ordering.order], "method": method,
                       "method_params": dict(spec.method_params.get(method, {})), "seed": seed}
                experiment_from_dict(dict(exp), f"sweep run {method}/{ordering.name}/seed{seed}")  # validates
                runs.append(PlannedRun(method, ordering.name, list(ordering.order), seed,
                                       SweepFolder.run_path(method, ordering.name, seed), exp))
    return runs, orderings


def _default_cache_dir() -> Path:
    from ..runner import default_cache_dir
    return Path(default_cache_dir()).expanduser().resolve()


def run_identity(run: PlannedRun) -> dict:
    return experiment_from_dict(dict(run.experiment), run.path).identity()


def holds_run(folder: RunFolder, run: PlannedRun) -> bool:
    """Whether ``folder`` holds the experiment of ``run`` (its experiment.json, migrated)."""
    return folder.read_experiment().identity() == run_identity(run)


def is_finished(sweep_dir: Path, run: PlannedRun) -> bool:
    """A run counts as finished when its folder holds summary.json and this run's experiment (cheap: no data read)."""
    folder = SweepFolder(Path(sweep_dir)).run(run.path)
    return folder.summary.is_file() and folder.spec.is_file() and holds_run(folder, run)


def check_sweep_folder(sweep_dir: Path, spec: SweepSpec, runs: list[PlannedRun]) -> dict | None:
    """The output folder must be new, empty, or this same sweep (then its stored runs must be the ones planned).
    Returns the stored sweep.json, if any."""
    folder = SweepFolder(sweep_dir)
    sweep_file = folder.sweep_file
    if not sweep_file.is_file():
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
            raise UserInputError(f"{sweep_dir} exists and is not empty, but holds no lifelong-nnunet sweep "
                                 f"({sweep_file.name} is missing). Choose an empty or new output folder.")
        return None
    stored = folder.read_sweep()
    old = {k: v for k, v in stored["spec"].items() if k not in NOT_IDENTITY}
    new = spec.identity()
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserInputError(f"{sweep_dir} already holds a different sweep (differs in: {', '.join(diff)}). Use a "
                             f"new output folder, or repeat the original command to resume that sweep.")
    if stored["runs"] != [r.to_json() for r in runs]:
        raise UserInputError(f"{sweep_file} lists other runs than this sweep plans now (the task folders or their "
                             f"names changed?). Use a new output folder for the changed sweep.")
    return stored


def check_data_and_folders(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], log: RunLog):
    """Check the data once (runner.prepare on the first pending run) and every existing run folder, before anything
    is written, so bad input stops the sweep with nothing changed. Returns the first pending run's tasks."""
    from ..runner import prepare
    for r in runs:
        folder = SweepFolder(sweep_dir).run(r.path)
        if folder.spec.is_file() and not holds_run(folder, r):
            raise UserInputError(f"{folder.root} holds a different experiment than the sweep's run {r.label}. Move "
                                 f"that folder away or use a new sweep folder.")
    first = pending[0]
    tasks, _ = prepare(experiment_from_dict(dict(first.experiment), first.path), sweep_dir / first.path,
                       RunLog(None, log.quiet))
    return tasks
