"""The experiment spec: which tasks in which order, which method, what budget. Loaded from YAML and validated.

Every field has a default, so the smallest spec is a task list. Unknown keys are errors (a typo must not silently
fall back to a default).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError

SCENARIOS = ("domain", "class")
CONFIGURATIONS = ("2d", "3d_fullres")
DEVICES = ("auto", "cpu", "cuda")


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


@dataclass
class Experiment:
    tasks: list[str]
    method: str = "sequential"
    method_params: dict[str, Any] = field(default_factory=dict)
    scenario: str = "domain"
    configuration: str = "3d_fullres"
    training: Training = field(default_factory=Training)
    test_split: TestSplit = field(default_factory=TestSplit)
    evaluation: Evaluation = field(default_factory=Evaluation)
    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    raw_root: str | None = None
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields that define *what* is computed: a run folder may only be resumed with the same identity."""
        d = self.to_dict()
        for k in ("device", "cache_dir", "raw_root"):
            d.pop(k)
        return d


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: expected a mapping, got {type(data).__name__}. Fix the spec.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserInputError(f"{where}: unknown key(s) {unknown}; allowed are {sorted(known)}. Fix the spelling.")
    kwargs = {}
    nested = {"training": Training, "test_split": TestSplit, "evaluation": Evaluation}
    for k, v in data.items():
        kwargs[k] = _build(nested[k], v, f"{where}.{k}") if k in nested and cls is Experiment else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserInputError(f"{where}: {e}. Fix the spec.") from None


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
    if not isinstance(exp.seed, int):
        raise bad(f"seed must be an integer (got {exp.seed!r}).")
    if not isinstance(exp.method_params, dict):
        raise bad("method_params must be a mapping of parameter names to values.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
