"""Sweeps: every method x task ordering x seed, each one an ordinary run folder inside one sweep folder.

Continual results depend on the method, on the order the tasks arrive in and on the seed, so a comparison needs all
three. A sweep is a plan of runs, not a new kind of run: each run is written by ``runner.run_experiment``, so it
resumes (and a finished one is skipped) exactly like ``lifelong-nnunet run``, and a sweep is resumable run by run.
The sweep folder's layout (sweep.json, runs/<method>/<ordering>/seed<seed>/, runs.csv, sweep.log, the comparison
report) belongs to ``run_folder.SweepFolder``; sweep.json is written before the first run starts.

The parts: ``spec`` (what a sweep computes, validated), ``plan`` (the runs, and which of them are finished),
``local`` and ``ray_backend`` (running them: sequentially here, or each as a Ray task with
``pip install 'lifelong-nnunet[ray]'``), ``gather`` (runs.csv and the comparison report). ``run_sweep`` ties them.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..console import RunLog
from ..errors import UserInputError
from ..run_folder import SweepFolder
from . import gather, local, ray_backend
from .plan import PlannedRun, check_data_and_folders, check_sweep_folder, is_finished, plan_runs
from .spec import SweepSpec, load_sweep_spec, sweep_spec_from_dict

__all__ = ["PlannedRun", "SweepSpec", "command_line", "load_sweep_spec", "plan_runs", "run_sweep",
           "sweep_spec_from_dict", "versions"]


def versions() -> dict[str, str | None]:
    """Package versions recorded with the sweep, so its numbers can be traced to the code that made them."""
    from importlib import metadata

    from .. import __version__
    out: dict[str, str | None] = {"lifelong_nnunet": __version__}
    for name in ("nnunetv2", "torch", "monai"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def run_sweep(spec: SweepSpec | str | os.PathLike | dict, output: str | os.PathLike, *, use_ray: bool = False,
              ray_address: str | None = None, cpus_per_run: int = 1, gpus_per_run: float | None = None,
              ray_num_cpus: int | None = None, quiet: bool = False, command: str | None = None) -> dict:
    """Run (or resume) a sweep into ``output``; returns {"sweep_dir", "ran", "skipped", "runs"}.

    Every check (spec, data, existing folders) happens before anything is written. Finished runs are skipped
    without reading any data; a sweep whose runs are all finished does nothing and says so.
    ``use_ray``/``ray_address``: run each pending run as a Ray task (a local Ray instance with ``ray_num_cpus``
    CPUs when no address is given). ``command``: the command line recorded in sweep.json.
    """
    if isinstance(spec, dict):
        spec = sweep_spec_from_dict(spec)
    elif not isinstance(spec, SweepSpec):
        spec = load_sweep_spec(spec)
    use_ray = use_ray or ray_address is not None
    if isinstance(cpus_per_run, bool) or not isinstance(cpus_per_run, int) or cpus_per_run < 1:
        raise UserInputError(f"--cpus-per-run must be an integer >= 1 (got {cpus_per_run!r}).")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise UserInputError(f"--gpus-per-run must be >= 0 (got {gpus_per_run!r}).")
    if use_ray:
        ray_backend.import_ray()  # fail before anything is written
    sweep_dir = Path(output).expanduser().resolve()
    log = RunLog(None, quiet)
    runs, orderings = plan_runs(spec)
    # store the tasks as resolved folders (the first planned run has the given order), so that resuming from
    # another directory, or with IDs instead of paths, is still the same sweep
    spec = replace(spec, tasks=list(runs[0].experiment["tasks"]))
    folder = SweepFolder(sweep_dir)
    stored = check_sweep_folder(sweep_dir, spec, runs)
    finished = {r.path for r in runs if is_finished(sweep_dir, r)}
    if len(finished) == len(runs):
        if not folder.runs_table.is_file():  # stopped after its last run, before gathering: finish that
            rows = gather.gather(sweep_dir, runs)
            gather.write_comparison(sweep_dir, log)
        else:
            rows = gather.gather(sweep_dir, runs, write=False)
        log(f"Sweep in {sweep_dir} is already complete ({len(runs)} run(s)); nothing to do.")
        return {"sweep_dir": str(sweep_dir), "ran": 0, "skipped": len(runs), "runs": rows}

    pending = [r for r in runs if r.path not in finished]
    tasks = check_data_and_folders(sweep_dir, runs, pending, log)
    commands = list(stored["commands"]) if stored else []
    command = command or "lifelong_nnunet.sweep.run_sweep (Python API)"
    if not commands or commands[-1] != command:
        commands.append(command)
    folder.write_sweep(spec.to_dict(), [r.to_json() for r in runs], commands, versions())
    log.path = folder.log
    log(f"Sweep {sweep_dir}: {len(spec.methods)} method(s) x {len(orderings)} ordering(s) x {len(spec.seeds)} "
        f"seed(s) = {len(runs)} run(s); {len(finished)} already finished, {len(pending)} to run"
        f"{' with Ray' if use_ray else ''}.")
    started = time.time()
    index = {r.path: i + 1 for i, r in enumerate(runs)}
    for r in runs:
        if r.path in finished:
            summary = folder.run(r.path).read_summary()
            log(f"[{index[r.path]}/{len(runs)}] {r.label}: already done, {gather.headline(summary)}")
    if use_ray:
        ray_backend.run_with_ray(sweep_dir, runs, pending, index, tasks, log, ray_address, cpus_per_run,
                                 gpus_per_run, ray_num_cpus, quiet)
    else:
        local.run_locally(sweep_dir, runs, pending, index, log, quiet)
    gathered = gather.gather(sweep_dir, runs)
    log(f"Sweep finished: {len(pending)} run(s) in {(time.time() - started) / 60:.1f} min. Runs table: "
        f"{folder.runs_table}")
    gather.write_comparison(sweep_dir, log)
    return {"sweep_dir": str(sweep_dir), "ran": len(pending), "skipped": len(finished), "runs": gathered}


def command_line() -> str:
    """The command as typed, for sweep.json."""
    return "lifelong-nnunet " + shlex.join(sys.argv[1:])
