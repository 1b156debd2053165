"""Sweeps: every method x task ordering x seed, each one an ordinary run folder inside one sweep folder.

Continual results depend on the method, on the order the tasks arrive in and on the seed, so a comparison needs all
three. A sweep is a plan of runs, not a new kind of run: each run is written by ``runner.run_experiment``, so it
resumes (and a finished one is skipped) exactly like ``lifelong-nnunet run``, and a sweep is resumable run by run.

Layout (the comparison report reads it; keep it stable)::

    SWEEP/sweep.json   {"spec": {...}, "runs": [{"method", "ordering", "order", "seed", "path"}, ...],
                        "commands": [...], "versions": {...}}   written before the first run starts
    SWEEP/runs/<method>/<ordering>/seed<seed>/   one run folder per run
    SWEEP/runs.csv     one row per run with its headline metrics, gathered when the runs are done
    SWEEP/sweep.log    time-stamped progress lines

Every run of a sweep plans with the same task (``plan_with``, default the given order's first task), and the
planning cache is keyed by the set of tasks, not their order, so all orderings and methods of one seed share one
planning and preprocessing. (Different seeds hold out different test cases, and planning sees only training cases,
so each seed plans once.)

Execution is local and sequential by default (no extra dependency). With Ray (``pip install
'lifelong-nnunet[ray]'``) each run becomes one Ray task; the driver plans first, so the parallel runs only read the
cache, and gathers the runs' summaries from the shared sweep folder.
"""
from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .console import RunLog, progress_bar
from .errors import MethodParamError, UserInputError
from .io_utils import atomic_write, read_json, write_json
from .orderings import (
    DEFAULT_MAX_ORDERINGS,
    Ordering,
    make_orderings,
    parse_ordering_request,
)

SWEEP_FILE = "sweep.json"
RUNS_TABLE = "runs.csv"
SWEEP_KEYS = ("tasks", "methods", "method_params", "orderings", "ordering_seed", "seeds", "max_orderings")
# experiment fields every run of the sweep shares (method, method_params, seed and the order vary per run)
SHARED_KEYS = ("scenario", "configuration", "plan_with", "training", "test_split", "evaluation",
               "validation_fraction", "device", "raw_root", "cache_dir")
# where and how the sweep runs, not what it computes: may change when resuming
NOT_IDENTITY = ("device", "raw_root", "cache_dir", "max_orderings")
KEY_HINTS = {"method": "use 'methods: [name, ...]'", "seed": "use 'seeds: N' (seeds 0..N-1) or 'seeds: [0, 3]'",
             "ordering": "use 'orderings'"}
INSTALL_RAY = "pip install 'lifelong-nnunet[ray]'"


@dataclass
class SweepSpec:
    """What a sweep computes: the tasks (in their given order), methods, orderings, seeds, and the experiment fields
    every run shares."""
    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["sequential"])
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    orderings: str | int = "given"
    ordering_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    max_orderings: int = DEFAULT_MAX_ORDERINGS
    shared: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat, like the sweep file: the sweep keys and every shared experiment field (defaults filled in)."""
        return {"tasks": list(self.tasks), "methods": list(self.methods),
                "method_params": {m: dict(p) for m, p in self.method_params.items()}, "orderings": self.orderings,
                "ordering_seed": self.ordering_seed, "seeds": list(self.seeds), "max_orderings": self.max_orderings,
                **self.shared}

    def identity(self) -> dict:
        """The fields that define what is computed: a sweep folder is only resumed with the same identity."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}


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


# ---- the spec --------------------------------------------------------------------------------------------------
def sweep_spec_from_dict(data: Any, where: str = "sweep spec", base_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep spec (the YAML's mapping, or flags gathered by the CLI). Writes and reads no data.

    ``base_dir``: the YAML's folder, against which relative task folders and ``raw_root`` are resolved.
    """
    from .experiment import experiment_from_dict
    from .methods import available_methods, create_method

    def bad(msg: str) -> UserInputError:
        return UserInputError(f"{where}: {msg}")

    if not isinstance(data, dict):
        raise bad("a sweep spec must be a mapping with at least 'tasks' (see docs/sweep.md for an example).")
    allowed = (*SWEEP_KEYS, *SHARED_KEYS)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        hints = "; ".join(f"'{k}': {KEY_HINTS[k]}" for k in unknown if k in KEY_HINTS)
        raise bad(f"unknown key(s) {unknown}{' (' + hints + ')' if hints else ''}; allowed are {sorted(allowed)}. "
                  f"Fix the spelling.")
    data = dict(data)
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise bad("'tasks' must be a non-empty list of nnU-Net raw dataset folders, names or IDs, in the given order.")
    tasks = [str(t) for t in tasks]
    shared = {k: data[k] for k in SHARED_KEYS if data.get(k) is not None}
    if base_dir is not None:
        tasks = [str((base_dir / t).resolve()) if (base_dir / t).is_dir() else t for t in tasks]
        if shared.get("raw_root") and not Path(shared["raw_root"]).is_absolute():
            shared["raw_root"] = str((base_dir / shared["raw_root"]).resolve())

    methods = data.get("methods", ["sequential"])
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise bad(f"'methods' must be a non-empty list of method names (got {methods!r}); see "
                  f"`lifelong-nnunet methods`.")
    if len(set(methods)) != len(methods):
        raise bad(f"'methods' lists a method twice ({methods}). Give each method once.")
    for m in methods:
        if m not in available_methods():
            raise bad(f"method '{m}' is unknown; available: {', '.join(available_methods())}.")
    params = data.get("method_params") or {}
    if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
        raise bad("'method_params' must map method names to parameter mappings, e.g. {ewc: {lambda: 1000}}.")
    stray = sorted(set(params) - set(methods))
    if stray:
        raise bad(f"method_params names method(s) {stray} that are not in 'methods' {methods}. Add them to "
                  f"'methods' or remove their parameters.")
    scenario = data.get("scenario") or "domain"
    for m in methods:
        try:
            method = create_method(m, params.get(m, {}))
        except MethodParamError as e:
            raise bad(e.message(f"Fix method_params.{m}.")) from None
        if scenario not in getattr(method, "scenarios", (scenario,)):
            raise bad(f"method '{m}' is not defined for the {scenario} scenario (it supports: "
                      f"{', '.join(method.scenarios)}); see docs/methods/{m}.md. Remove it from 'methods' or "
                      f"change the scenario.")

    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise bad(f"'seeds' must be a count N (seeds 0..N-1) or a list of integer seeds (got {seeds!r}).")
    if isinstance(seeds, int):
        if seeds < 1:
            raise bad(f"'seeds' must be at least 1 (got {seeds}).")
        seeds = list(range(seeds))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise bad(f"'seeds' must be a non-empty list of integers (got {seeds!r}).")
    if len(set(seeds)) != len(seeds):
        raise bad(f"'seeds' lists a seed twice ({seeds}). Give each seed once.")

    try:
        orderings = parse_ordering_request(data.get("orderings", "given"))
    except UserInputError as e:
        raise bad(str(e)) from None
    ordering_seed, max_orderings = data.get("ordering_seed", 0), data.get("max_orderings", DEFAULT_MAX_ORDERINGS)
    if isinstance(ordering_seed, bool) or not isinstance(ordering_seed, int):
        raise bad(f"'ordering_seed' must be an integer (got {ordering_seed!r}).")
    if isinstance(max_orderings, bool) or not isinstance(max_orderings, int) or max_orderings < 1:
        raise bad(f"'max_orderings' must be a positive integer (got {max_orderings!r}).")
    try:  # the guard, before anything else happens (it raises before listing any permutation)
        make_orderings([f"task{i}" for i in range(len(tasks))], orderings, ordering_seed, max_orderings)
    except UserInputError as e:
        raise bad(str(e)) from None

    # every shared field checked once, by the experiment's own validation (defaults filled in)
    probe = experiment_from_dict({**shared, "tasks": tasks, "method": methods[0],
                                  "method_params": params.get(methods[0], {})}, where)
    full = probe.to_dict()
    return SweepSpec(tasks=tasks, methods=methods, method_params={m: dict(params[m]) for m in methods if m in params},
                     orderings=orderings, ordering_seed=ordering_seed, seeds=seeds, max_orderings=max_orderings,
                     shared={k: full[k] for k in SHARED_KEYS})


def load_sweep_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML; relative task folders are relative to the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"The sweep file {path} does not exist. Give the path of a sweep YAML file "
                             f"(docs/sweep.md has an example), or give --tasks.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserInputError(f"{path} is not valid YAML ({str(e).splitlines()[0]}). Fix the syntax.") from None
    return sweep_spec_from_dict(data, str(path), base_dir=path.parent)


# ---- the plan of runs ------------------------------------------------------------------------------------------
def plan_runs(spec: SweepSpec) -> tuple[list[PlannedRun], list[Ordering]]:
    """Resolve the tasks, draw the orderings and list every run (seed, then ordering, then method), so that early
    results already compare every method."""
    from .experiment import experiment_from_dict, task_id_of
    from .tasks import resolve_task_folder

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
                                       f"runs/{method}/{ordering.name}/seed{seed}", exp))
    return runs, orderings


def _default_cache_dir() -> Path:
    from .runner import default_cache_dir
    return Path(default_cache_dir()).expanduser().resolve()


def run_identity(run: PlannedRun) -> dict:
    from .experiment import experiment_from_dict
    return experiment_from_dict(dict(run.experiment), run.path).identity()


def is_finished(sweep_dir: Path, run: PlannedRun) -> bool:
    """A run counts as finished when its folder holds summary.json and this run's experiment (cheap: no data read)."""
    folder = Path(sweep_dir) / run.path
    spec = folder / "experiment.json"
    return (folder / "summary.json").is_file() and spec.is_file() and read_json(spec) == run_identity(run)


def versions() -> dict[str, str | None]:
    """Package versions recorded with the sweep, so its numbers can be traced to the code that made them."""
    from importlib import metadata

    from . import __version__
    out: dict[str, str | None] = {"lifelong_nnunet": __version__}
    for name in ("nnunetv2", "torch", "monai"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


# ---- running ---------------------------------------------------------------------------------------------------
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
        _import_ray()  # fail before anything is written
    sweep_dir = Path(output).expanduser().resolve()
    log = RunLog(None, quiet)
    runs, orderings = plan_runs(spec)
    # store the tasks as resolved folders (the first planned run has the given order), so that resuming from
    # another directory, or with IDs instead of paths, is still the same sweep
    spec = replace(spec, tasks=list(runs[0].experiment["tasks"]))
    sweep_file = sweep_dir / SWEEP_FILE
    stored = _check_sweep_folder(sweep_dir, spec, runs)
    finished = {r.path for r in runs if is_finished(sweep_dir, r)}
    if len(finished) == len(runs):
        if not (sweep_dir / RUNS_TABLE).is_file():  # stopped after its last run, before gathering: finish that
            rows = _gather(sweep_dir, runs)
            _write_comparison(sweep_dir, log)
        else:
            rows = _gather(sweep_dir, runs, write=False)
        log(f"Sweep in {sweep_dir} is already complete ({len(runs)} run(s)); nothing to do.")
        return {"sweep_dir": str(sweep_dir), "ran": 0, "skipped": len(runs), "runs": rows}

    pending = [r for r in runs if r.path not in finished]
    tasks = _check_data_and_folders(sweep_dir, runs, pending, log)
    commands = list(stored.get("commands", [])) if stored else []
    command = command or "lifelong_nnunet.sweep.run_sweep (Python API)"
    if not commands or commands[-1] != command:
        commands.append(command)
    write_json(sweep_file, {"spec": spec.to_dict(), "runs": [r.to_json() for r in runs], "commands": commands,
                            "versions": versions()})
    log.path = sweep_dir / "sweep.log"
    log(f"Sweep {sweep_dir}: {len(spec.methods)} method(s) x {len(orderings)} ordering(s) x {len(spec.seeds)} "
        f"seed(s) = {len(runs)} run(s); {len(finished)} already finished, {len(pending)} to run"
        f"{' with Ray' if use_ray else ''}.")
    started = time.time()
    index = {r.path: i + 1 for i, r in enumerate(runs)}
    for r in runs:
        if r.path in finished:
            summary = read_json(sweep_dir / r.path / "summary.json")
            log(f"[{index[r.path]}/{len(runs)}] {r.label}: already done, {_headline(summary)}")
    if use_ray:
        _run_with_ray(sweep_dir, runs, pending, index, tasks, log, ray_address, cpus_per_run, gpus_per_run,
                      ray_num_cpus, quiet)
    else:
        _run_locally(sweep_dir, runs, pending, index, log, quiet)
    gathered = _gather(sweep_dir, runs)
    log(f"Sweep finished: {len(pending)} run(s) in {(time.time() - started) / 60:.1f} min. Runs table: "
        f"{sweep_dir / RUNS_TABLE}")
    _write_comparison(sweep_dir, log)
    return {"sweep_dir": str(sweep_dir), "ran": len(pending), "skipped": len(finished), "runs": gathered}


def _check_sweep_folder(sweep_dir: Path, spec: SweepSpec, runs: list[PlannedRun]) -> dict | None:
    """The output folder must be new, empty, or this same sweep (then its stored runs must be the ones planned)."""
    sweep_file = sweep_dir / SWEEP_FILE
    if not sweep_file.is_file():
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
            raise UserInputError(f"{sweep_dir} exists and is not empty, but holds no lifelong-nnunet sweep "
                                 f"({SWEEP_FILE} is missing). Choose an empty or new output folder.")
        return None
    stored = read_json(sweep_file)
    old = {k: v for k, v in stored.get("spec", {}).items() if k not in NOT_IDENTITY}
    new = spec.identity()
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserInputError(f"{sweep_dir} already holds a different sweep (differs in: {', '.join(diff)}). Use a "
                             f"new output folder, or repeat the original command to resume that sweep.")
    if stored.get("runs") != [r.to_json() for r in runs]:
        raise UserInputError(f"{sweep_file} lists other runs than this sweep plans now (the task folders or their "
                             f"names changed?). Use a new output folder for the changed sweep.")
    return stored


def _check_data_and_folders(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], log: RunLog):
    """Check the data once (runner.prepare on the first pending run) and every existing run folder, before anything
    is written, so bad input stops the sweep with nothing changed. Returns the first pending run's tasks."""
    from .experiment import experiment_from_dict
    from .runner import prepare
    for r in runs:
        spec = sweep_dir / r.path / "experiment.json"
        if spec.is_file() and read_json(spec) != run_identity(r):
            raise UserInputError(f"{spec.parent} holds a different experiment than the sweep's run {r.label}. Move "
                                 f"that folder away or use a new sweep folder.")
    first = pending[0]
    tasks, _ = prepare(experiment_from_dict(dict(first.experiment), first.path), sweep_dir / first.path,
                       RunLog(None, log.quiet))
    return tasks


def _headline(summary: dict | None) -> str:
    """``final avg Dice 0.412`` (or the run's own headline metric)."""
    summary = summary or {}
    metric = str(summary.get("metric", "dice"))
    name = {"dice": "Dice", "iou": "IoU"}.get(metric, metric.upper())
    value = summary.get("final_average")
    return f"final avg {name} {value:.3f}" if isinstance(value, (int, float)) else f"final avg {name} n/a"


def _execute_run(experiment: dict, run_dir: str, quiet: bool) -> dict:
    """One run, in this process: an ordinary ``run_experiment`` call (resumes, or returns a finished summary)."""
    from .experiment import experiment_from_dict
    from .runner import run_experiment
    return run_experiment(experiment_from_dict(dict(experiment), f"sweep run {run_dir}"), run_dir, quiet=quiet)


def _run_locally(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], index: dict, log: RunLog,
                 quiet: bool) -> None:
    """Sequential, in this process, with each run's own progress bars (Ctrl-C stops between or inside a run;
    finished runs stay finished, the interrupted one resumes from its last epoch)."""
    for r in pending:
        log(f"[{index[r.path]}/{len(runs)}] {r.label}: running ({' -> '.join(r.order)})")
        summary = _execute_run(r.experiment, str(sweep_dir / r.path), quiet)
        log(f"[{index[r.path]}/{len(runs)}] {r.label}: done, {_headline(summary)}")


# ---- Ray -------------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserInputError(f"--ray needs the optional dependency Ray, which is not installed. Install it with "
                             f"`{INSTALL_RAY}` (on every node of a cluster), or leave out --ray/--ray-address "
                             f"to run the sweep locally, one run after the other.") from None
    return ray


def _ray_task(experiment: dict, run_dir: str, threads: int, gpus: float) -> dict:
    """Body of one Ray task: the run, with torch limited to the CPUs Ray granted it. Ray hides no GPU from a task
    that reserved none, so such a run is kept on the CPU (the device is not part of a run's identity)."""
    import torch
    torch.set_num_threads(max(1, int(threads)))
    if not gpus and experiment.get("device") == "auto":
        experiment = {**experiment, "device": "cpu"}
    return _execute_run(experiment, run_dir, quiet=True)


def plan_shared_workspaces(pending: list[PlannedRun], tasks, log: Callable[[str], None]) -> list[Path]:
    """Plan and preprocess, in this process, every workspace the pending runs need (one per seed), so that runs
    started in parallel find the cache complete and never plan at the same time."""
    from .nnunet.planning import Workspace
    from .tasks import make_test_split
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


def _resources(ray, cpus_per_run: int, gpus_per_run: float | None, device: str, local: bool) -> dict:
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


def _run_with_ray(sweep_dir: Path, runs: list[PlannedRun], pending: list[PlannedRun], index: dict, tasks,
                  log: RunLog, address: str | None, cpus_per_run: int, gpus_per_run: float | None,
                  ray_num_cpus: int | None, quiet: bool) -> None:
    """Plan in the driver, send each pending run as a Ray task, print each as it finishes. A failed run does not stop
    the others; the first failure is raised once every started run has ended. Ctrl-C cancels the runs in flight
    (they resume from their last epoch next time)."""
    ray = _import_ray()
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
        res = _resources(ray, cpus_per_run, gpus_per_run, pending[0].experiment["device"], local=not address)
        remote = ray.remote(_ray_task).options(**res)
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
                        if not (sweep_dir / r.path / "summary.json").is_file():
                            raise UserInputError(
                                f"Run {r.label} finished on a Ray worker, but {sweep_dir / r.path / 'summary.json'} "
                                f"is not visible here: the sweep folder (and the planning cache) must be on a "
                                f"filesystem shared by every node, at the same path. See docs/sweep.md.")
                        log(f"[{index[r.path]}/{len(runs)}] {r.label}: done, {_headline(summary)}")
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


# ---- gathering -------------------------------------------------------------------------------------------------
def _gather(sweep_dir: Path, runs: list[PlannedRun], write: bool = True) -> list[dict]:
    """One row per run with its headline metrics (from each run's summary.json), also written to runs.csv."""
    import csv
    rows = []
    for r in runs:
        path = sweep_dir / r.path / "summary.json"
        s = read_json(path) if path.is_file() else {}
        rows.append({**{k: v for k, v in r.to_json().items() if k != "order"}, "order": " > ".join(r.order),
                     "finished": bool(s), **{k: s.get(k) for k in ("final_average", "bwt", "fwt",
                                                                    "mean_forgetting", "train_seconds")}})

    def _write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if write and any(row["finished"] for row in rows):
        atomic_write(sweep_dir / RUNS_TABLE, _write)
    return rows


def _write_comparison(sweep_dir: Path, log: Callable[[str], None]) -> None:
    """The cross-run comparison report, when this installation has it (lifelong_nnunet.evaluation.comparison)."""
    try:
        from .evaluation.comparison import write_comparison_report
    except ImportError as e:
        log(f"No comparison report written: lifelong_nnunet.evaluation.comparison is not available ({e}). The runs "
            f"and {RUNS_TABLE} are complete.")
        return
    path = write_comparison_report(sweep_dir)
    log(f"Comparison report: {path}")


def command_line() -> str:
    """The command as typed, for sweep.json."""
    return "lifelong-nnunet " + shlex.join(sys.argv[1:])
