"""The experiment spec: which tasks in which order, which method, what budget. Loaded from YAML and validated.

Every field has a default, so the smallest spec is a task list. Unknown keys are errors (a typo must not silently
fall back to a default).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from .errors import UserInputError
from .names import dataset_id_of

# The closed string options of a spec, each written once: the type checker reads the Literal, `validate` its values.
# (Literal rather than StrEnum: the values travel as plain strings through YAML, JSON and stored run folders, and
# StrEnum needs Python 3.11 while the package supports 3.10.)
Scenario = Literal["domain", "class"]
Configuration = Literal["2d", "3d_fullres"]
Device = Literal["auto", "cpu", "cuda"]
ScoreOn = Literal["test", "validation"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
CONFIGURATIONS: tuple[str, ...] = get_args(Configuration)
DEVICES: tuple[str, ...] = get_args(Device)
SCORE_ON: tuple[str, ...] = get_args(ScoreOn)


@dataclass
class Training:
    """Training budget per stage. nnU-Net's defaults (1000 x 250) are far too long for a benchmark on CPU."""
    epochs: int = 5
    iterations_per_epoch: int = 20
    val_iterations: int = 5
    initial_lr: float = 1e-2
    batch_size: int | None = None  # None: nnU-Net's planned batch size


@dataclass
class TestSplit:
    """Held-out cases per task: round(fraction * cases), at least min_cases."""
    fraction: float = 0.25
    min_cases: int = 1


@dataclass
class Evaluation:
    mirroring: bool = False  # test-time mirroring costs 8x prediction time on CPU
    tile_step_size: float = 0.5
    # what every test case is scored with (names in lifelong_nnunet.evaluation.metrics.METRICS)
    metrics: list[str] = field(default_factory=lambda: ["dice", "iou", "nsd", "hd95"])
    # NSD tolerance in mm: one number, or label name -> mm with an optional "default" key
    nsd_tolerance_mm: float | dict[str, float] = 2.0
    report_metric: str = "dice"  # the metric of the report's headline, summary.json's top-level keys and plots


@dataclass
class Planning:
    """How nnU-Net plans the shared architecture for the machine at hand (docs/cli.md, "Planning for the machine").

    ``memory_target_gb`` is nnU-Net's planner memory target, which sets the patch and batch size: ``"auto"`` is
    nnU-Net's own default (8 GB, sized for a GPU) on CUDA and ``nnunet.planning.CPU_MEMORY_TARGET_GB`` on a CPU,
    where nnU-Net's GPU-sized patch of a native-resolution dataset takes minutes per iteration (measured in
    benchmarks/cpu_planning.py). ``target_spacing`` (mm, nnU-Net's axis order) replaces nnU-Net's median spacing;
    it applies to 3d_fullres, as in nnU-Net."""
    memory_target_gb: float | str = "auto"
    target_spacing: list[float] | None = None


@dataclass
class Experiment:
    tasks: list[str]
    method: str = "sequential"
    method_params: dict[str, Any] = field(default_factory=dict)
    scenario: Scenario = "domain"
    configuration: Configuration = "3d_fullres"
    plan_with: str | int | None = None  # the task nnU-Net plans on (folder, name or ID); None: the first task
    planning: Planning = field(default_factory=Planning)
    training: Training = field(default_factory=Training)
    test_split: TestSplit = field(default_factory=TestSplit)
    evaluation: Evaluation = field(default_factory=Evaluation)
    validation_fraction: float = 0.2
    # what every cell of the result matrix is scored on: the held-out test cases, or (tuning) validation cases
    # carved from the training split, with the test cases left out of the run entirely (tasks.scored_cases)
    score_on: ScoreOn = "test"
    seed: int = 0
    device: Device = "auto"
    raw_root: str | None = None
    cache_dir: str | None = None
    # a stock nnU-Net v2 model folder as stage 1 ({"folder": ..., "fold": K}); its task is the first one
    start_from: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields that define *what* is computed: a run folder may only be resumed with the same identity.
        (Folders whose experiment.json predates a field are read through ``run_folder.migrate``.)"""
        d = self.to_dict()
        for k in NOT_IDENTITY:
            d.pop(k)
        return d


# where and how a run is computed, not what: may change when a run resumes
NOT_IDENTITY = ("device", "cache_dir", "raw_root")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: expected a mapping, got {type(data).__name__}. Fix the spec.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserInputError(f"{where}: unknown key(s) {unknown}; allowed are {sorted(known)}. Fix the spelling.")
    kwargs = {}
    nested = {"training": Training, "test_split": TestSplit, "evaluation": Evaluation, "planning": Planning}
    for k, v in data.items():
        kwargs[k] = _build(nested[k], v, f"{where}.{k}") if k in nested and cls is Experiment else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserInputError(f"{where}: {e}. Fix the spec.") from None


def stored_experiment(identity: dict, where: str) -> Experiment:
    """The Experiment a run folder's experiment.json describes (its identity, every field present), checked for
    its keys but not validated: a run made by a method that is not installed here must still report."""
    return _build(Experiment, identity, where)


def experiment_from_dict(data: dict, where: str = "spec") -> Experiment:
    method = data.get("method")
    if isinstance(method, dict):  # `method: {name: ewc, lambda: 100}` is accepted as shorthand
        data = dict(data)
        params = dict(method)
        data["method"] = params.pop("name", None)
        data["method_params"] = {**params, **(data.get("method_params") or {})}
    exp = _build(Experiment, data, where)
    validate(exp, where)
    return exp


def load_experiment(path: str | os.PathLike) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"The spec file {path} does not exist. Give the path of an experiment YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserInputError(f"{path} is not valid YAML ({str(e).splitlines()[0]}). Fix the syntax.") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a mapping with at least 'tasks'. See docs/cli.md for an example.")
    exp = experiment_from_dict(data, str(path))
    if exp.raw_root and not Path(exp.raw_root).is_absolute():
        exp.raw_root = str((path.parent / exp.raw_root).resolve())
    exp.tasks = [str((path.parent / t).resolve()) if (path.parent / str(t)).is_dir() else str(t) for t in exp.tasks]
    validate(exp, str(path))  # again: two spellings of one folder are duplicates only once resolved
    return exp


def validate(exp: Experiment, where: str = "spec") -> None:
    from .methods import available_methods

    def bad(msg: str) -> UserInputError:
        return UserInputError(f"{where}: {msg}")

    if not isinstance(exp.tasks, list) or not exp.tasks:
        raise bad("'tasks' must be a non-empty list of nnU-Net raw dataset folders, names or IDs.")
    if len(set(map(str, exp.tasks))) != len(exp.tasks):
        raise bad(f"'tasks' lists a dataset twice ({exp.tasks}). Give each task once.")
    if exp.scenario not in SCENARIOS:
        raise bad(f"scenario '{exp.scenario}' is unknown; use one of {list(SCENARIOS)}.")
    if exp.method not in available_methods():
        raise bad(f"method '{exp.method}' is unknown; available: {', '.join(available_methods())}.")
    if exp.configuration not in CONFIGURATIONS:
        raise bad(f"configuration '{exp.configuration}' is not supported; use one of {list(CONFIGURATIONS)}.")
    if exp.device not in DEVICES:
        raise bad(f"device '{exp.device}' is unknown; use one of {list(DEVICES)}.")
    if exp.score_on not in SCORE_ON:
        raise bad(f"score_on '{exp.score_on}' is unknown; use 'test' (the held-out test cases) or 'validation' "
                  f"(cases carved from the training split, for tuning).")
    _validate_planning(exp, bad)
    t = exp.training
    for name in ("epochs", "iterations_per_epoch", "val_iterations"):
        if not isinstance(getattr(t, name), int) or getattr(t, name) < 1:
            raise bad(f"training.{name} must be a positive integer (got {getattr(t, name)!r}).")
    if t.batch_size is not None and (not isinstance(t.batch_size, int) or t.batch_size < 1):
        raise bad(f"training.batch_size must be a positive integer or null (got {t.batch_size!r}).")
    if not _is_number(t.initial_lr) or not 0 < t.initial_lr < 10:
        raise bad(f"training.initial_lr must be a positive number (got {t.initial_lr!r}).")
    if not _is_number(exp.test_split.fraction) or not 0 < exp.test_split.fraction < 1:
        raise bad(f"test_split.fraction must lie strictly between 0 and 1 (got {exp.test_split.fraction}).")
    if not isinstance(exp.test_split.min_cases, int) or exp.test_split.min_cases < 1:
        raise bad(f"test_split.min_cases must be an integer >= 1 (got {exp.test_split.min_cases!r}).")
    if not _is_number(exp.validation_fraction) or not 0 < exp.validation_fraction < 1:
        raise bad(f"validation_fraction must lie strictly between 0 and 1 (got {exp.validation_fraction}).")
    if not isinstance(exp.evaluation.mirroring, bool):
        raise bad(f"evaluation.mirroring must be true or false (got {exp.evaluation.mirroring!r}).")
    if not _is_number(exp.evaluation.tile_step_size) or not 0 < exp.evaluation.tile_step_size <= 1:
        raise bad(f"evaluation.tile_step_size must lie in (0, 1] (got {exp.evaluation.tile_step_size!r}).")
    _validate_evaluation_metrics(exp.evaluation, bad)
    if not isinstance(exp.seed, int):
        raise bad(f"seed must be an integer (got {exp.seed!r}).")
    if not isinstance(exp.method_params, dict):
        raise bad("method_params must be a mapping of parameter names to values.")
    if exp.start_from is not None:
        sf = exp.start_from
        fold = sf.get("fold", 0) if isinstance(sf, dict) else None
        if not isinstance(sf, dict) or not isinstance(sf.get("folder"), str) or set(sf) - {"folder", "fold"} \
                or isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise bad(f"start_from must be a mapping with 'folder' (a stock nnU-Net model folder) and optionally "
                      f"'fold' (a whole number >= 0), not {sf!r}.")
        if exp.plan_with is not None:
            raise bad("plan_with cannot be combined with start_from: the imported model's plans are the run's plans.")
    if exp.plan_with is not None and (isinstance(exp.plan_with, bool) or not isinstance(exp.plan_with, (str, int))
                                      or task_id_of(exp.plan_with) not in {task_id_of(t) for t in exp.tasks}):
        raise bad(f"plan_with {exp.plan_with!r} is not one of the tasks {exp.tasks}. Name one of them (folder, "
                  f"dataset name or ID), or leave plan_with out to plan with the first task.")


def _validate_planning(exp: Experiment, bad) -> None:
    p = exp.planning
    if p.memory_target_gb != "auto" and (not _is_number(p.memory_target_gb) or not 0 < p.memory_target_gb <= 1024):
        raise bad(f"planning.memory_target_gb must be 'auto' or a number of GB > 0, e.g. 4 (got "
                  f"{p.memory_target_gb!r}).")
    spacing = p.target_spacing
    if spacing is not None:
        if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(v) and v > 0 for v in spacing):
            raise bad(f"planning.target_spacing must be three spacings in mm (nnU-Net's axis order), e.g. "
                      f"[1.5, 1.5, 1.5], or null for nnU-Net's own (got {spacing!r}).")
        if exp.configuration != "3d_fullres":
            raise bad(f"planning.target_spacing applies to the 3d_fullres configuration only (as in nnU-Net), not "
                      f"to {exp.configuration}. Leave it out, or use 3d_fullres.")
    if exp.start_from is not None and (p.memory_target_gb != "auto" or spacing is not None):
        raise bad("planning cannot be combined with start_from: the imported model's plans are the run's plans.")


def task_id_of(spelling: str | int) -> int | str:
    """A task as written (folder, ``DatasetXXX_Name`` or ID) reduced to its dataset ID, unique within a sequence, so
    that ``plan_with: 11`` matches the task ``/data/Dataset011_SiteA``; the plain string if it names no ID."""
    text = str(spelling).strip().rstrip("/\\")
    if text.isdigit():
        return int(text)
    found = dataset_id_of(text)
    return text if found is None else found


def _validate_evaluation_metrics(ev: Evaluation, bad) -> None:
    """The metric list, the NSD tolerance(s) and the headline metric. Label names in a tolerance mapping are
    checked against the tasks' labels when the run evaluates (the spec alone does not know them)."""
    from .evaluation.metrics import METRICS

    if not isinstance(ev.metrics, list) or not ev.metrics or not all(isinstance(m, str) for m in ev.metrics):
        raise bad(f"evaluation.metrics must be a non-empty list of metric names from {list(METRICS)} "
                  f"(got {ev.metrics!r}).")
    unknown = [m for m in ev.metrics if m not in METRICS]
    if unknown:
        raise bad(f"evaluation.metrics: unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    if len(set(ev.metrics)) != len(ev.metrics):
        raise bad(f"evaluation.metrics lists a metric twice ({ev.metrics}). Give each once.")
    tolerance = ev.nsd_tolerance_mm
    values = tolerance.values() if isinstance(tolerance, dict) else [tolerance]
    if (isinstance(tolerance, dict) and (not tolerance or not all(isinstance(k, str) for k in tolerance))) \
            or not all(_is_number(v) and 0 <= v < float("inf") for v in values):
        raise bad(f"evaluation.nsd_tolerance_mm must be a distance in mm >= 0, or a mapping of label names (and "
                  f"optionally 'default') to such distances (got {tolerance!r}).")
    if ev.report_metric not in ev.metrics:
        raise bad(f"evaluation.report_metric '{ev.report_metric}' is not among evaluation.metrics {ev.metrics}; "
                  f"pick one of them, or add it to the list.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
