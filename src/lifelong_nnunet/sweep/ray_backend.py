"""Running a sweep's runs on Ray (``pip install 'lifelong-nnunet[ray]'``): each run one Ray task.

The driver plans every workspace first, so the parallel runs only read the planning cache; each run writes its own
run folder in the shared sweep folder, which the driver reads back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..console import RunLog, progress_bar
from ..errors import UserInputError
from ..run_folder import SweepFolder
from . import local
from .gather import headline
from .plan import PlannedRun

INSTALL_RAY = "pip install 'lifelong-nnunet[ray]'"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserInputError(f"--ray needs the optional dependency Ray, which is not installed. Install it with "
                             f"`{INSTALL_RAY}` (on every node of a cluster), or leave out --ray/--ray-address "
                             f"to run the sweep locally, one run after the other.") from None
    return ray


def ray_task(experiment: dict, run_dir: str, threads: int, gpus: float) -> dict:
    """Body of one Ray task: the run, with torch limited to the CPUs Ray granted it. Ray hides no GPU from a task
    that reserved none, so such a run is kept on the CPU (the device is not part of a run's identity)."""
    import torch
    torch.set_num_threads(max(1, int(threads)))
    if not gpus and experiment.get("device") == "auto":
        experiment = {**experiment, "device": "cpu"}
    return local.execute_run(experiment, run_dir, quiet=True)


def plan_shared_workspaces(pending: list[PlannedRun], tasks, log: Callable[[str], None]) -> list[Path]:
    """Plan and preprocess, in this process, every workspace the pending runs need (one per seed), so that runs
    started in parallel find the cache complete and never plan at the same time."""
    from ..nnunet.planning import Workspace
    from ..tasks import make_test_split
    roots = []
    for seed in sorted({r.seed for r in pending}):
        exp = next(r.experiment for r in pending if r.seed == seed)
        split = exp["test_split"]
        seeded = [replace(t, test_cases=make_test_split(t, split["fraction"], split["min_cases"], seed))
                  for t in tasks]
        workspace = Workspace(Path(exp["cache_dir"]), seeded, exp["configuration"], plan_with=exp["plan_with"])
        workspace.ensure_planned(log)
        roots.append(workspace.root)
    return roots


def resources(ray, cpus_per_run: int, gpus_per_run: float | None, device: str, local: bool) -> dict:
    """Ray resources per run: one GPU where GPUs exist (or as asked), else ``cpus_per_run`` CPUs."""
    total = ray.cluster_resources()
    if gpus_per_run is None:
        import torch
        gpus_per_run = 0 if device == "cpu" else (1 if torch.cuda.is_available() or total.get("GPU", 0) > 0 else 0)
    if device == "cuda" and not gpus_per_run:
        raise UserInputError("device 'cuda' with --gpus-per-run 0: the runs would use GPUs Ray did not reserve "
                             "for them. Give --gpus-per-run > 0, or --device auto/cpu.")
    if local and cpus_per_run > total.get("CPU", 0):
        raise UserInputError(f"--cpus-per-run {cpus_per_run} is more than the {total.get('CPU', 0):.0f} CPUs of the "
                             f"local Ray instance; no run could start. Lower --cpus-per-run.")
    if gpus_per_run and gpus_per_run > total.get("GPU", 0) and local:
        raise UserInputError(f"--gpus-per-run {gpus_per_run} asks for GPUs the local Ray instance does not have "
                             f"({total.get('GPU', 0):.0f}). Use --gpus-per-run 0, or a cluster with GPUs.")
    return {"num_cpus": cpus_per_run, "num_gpus": gpus_per_run}


def run_with_ray(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], index: dict, tasks,
                  log: RunLog, address: str | None, cpus_per_run: int, gpus_per_run: float | None,
                  ray_num_cpus: int | None, quiet: bool) -> None:
    """Plan in the driver, send each pending run as a Ray task, print each as it finishes. A failed run does not stop
    the others; the first failure is raised once every started run has ended. Ctrl-C cancels the runs in flight
    (they resume from their last epoch next time)."""
    ray = import_ray()
    plan_shared_workspaces(pending, tasks, log)
    own_instance = not ray.is_initialized()
    if own_instance:  # Ray's own start-up messages are left out: the line below says what runs where
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(num_cpus=ray_num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
    refs: dict = {}
    try:
        res = resources(ray, cpus_per_run, gpus_per_run, pending[0].experiment["device"], local=not address)
        remote = ray.remote(ray_task).options(**res)
        log(f"Ray: {len(pending)} run(s), each with {res['num_cpus']} CPU(s) and {res['num_gpus']} GPU(s); cluster "
            f"{ {k: v for k, v in ray.cluster_resources().items() if k in ('CPU', 'GPU')} }")
        refs = {remote.remote(r.experiment, str(sweep_dir / r.path), res["num_cpus"], res["num_gpus"]): r
                for r in pending}
        failures = []
        with progress_bar(quiet) as bar:
            job = bar.add_task("Sweep runs", total=len(runs), completed=len(runs) - len(pending), info="")
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    r = refs.pop(ref)
                    try:
                        summary = ray.get(ref)
                    except ray.exceptions.RayError as e:  # a RayTaskError wraps the run's own exception
                        cause = getattr(e, "cause", None) or e
                        failures.append((r, cause))
                        log(f"[{index[r.path]}/{len(runs)}] {r.label}: FAILED ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''})")
                    else:
                        summary_file = SweepFolder(sweep_dir).run(r.path).summary
                        if not summary_file.is_file():
                            raise UserInputError(
                                f"Run {r.label} finished on a Ray worker, but {summary_file} is not visible here: "
                                f"the sweep folder (and the planning cache) must be on a filesystem shared by every "
                                f"node, at the same path. See docs/sweep.md.")
                        log(f"[{index[r.path]}/{len(runs)}] {r.label}: done, {headline(summary)}")
                    bar.advance(job)
                    bar.update(job, info=r.label)
        if failures:
            r, cause = failures[0]
            log(f"{len(failures)} of {len(pending)} run(s) failed; the others are finished and kept. Repeat the "
                f"command to retry the failed run(s).")
            raise cause
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if own_instance:
            ray.shutdown()
