"""The on-disk layout of run and sweep folders: every file name, typed readers and writers, the format version, and
the one migration of older folders.

Files are the API between training, reporting and deployment, as in nnU-Net (plans, then preprocessed data, then
checkpoints), and a run folder grows over months. So one module owns the layout, as nnU-Net's ``paths.py`` and
``file_path_utilities.py`` do: no other module spells a file name of a run or sweep folder. Every write is atomic.

A run folder (``RUN_FORMAT`` 2)::

    format.json          {"format": 2, "kind": "run", "written_by": "lifelong_nnunet 0.1.0"}
    experiment.json      the run's identity (Experiment.identity(), every field): a resume must match it
    splits.json          task name -> its held-out test cases, in training order (the run's task list)
    schedule.json        the method's stage plan, so reports and predict work without the method's code
    labels.json          the label space (global IDs, every task's local -> global map)
    plans.json           nnU-Net's plans, shared by every stage (the architecture; the planning task's normalisation)
    planning.json        the planner settings the plans were made with, resolved for the machine that planned them
                         (nnunet.planning.PlanningChoice; runs planned before it existed used nnU-Net's defaults)
    normalisation.json   task name -> the intensity normalisation its images get (nnunet.normalisation): each task
                         is normalised as nnU-Net would for it alone, on the shared architecture. A task without an
                         entry (runs made before it existed) is normalised with plans.json's
    dataset.json         the model's dataset.json (class scenario: every structure, global IDs)
    run.log              time-stamped progress lines
    tasks.json           task name -> its record (dataset.json, training and test case IDs, where its test files
                         are): later stages and `extend` never need a learned task's training data again
    history.json         one entry per stage: imported, trained in `run` or added by `extend`; when; the data it saw
                         (name, case counts, fingerprint); its budget; the package versions
    stages/stage_<k>/model.pt    {"format", "network_weights", "method_state", "info"} (stage 0: untrained)
    stages/stage_<k>/eval/<task>.csv    the scores of one cell R[k][task] (RESULT_COLUMNS); a task whose test data
                         were gone when stage k was evaluated has none ("not evaluated")
    stages/stage_<k>/resources.json    one entry per session that trained or evaluated stage k: its phase, wall
                         seconds, peak memory and device, written while it happens (optional in every format: a
                         folder written before it existed reads as "not recorded")
    stages/stage_<k>/nnunet/     nnU-Net's own results folder while the stage trains
    stages/stage_<k>/task_description.json    methods with per-task parts (heads, gated decoders): what each task
                         looks like, parameters only (task_inference.StageDescription), for predict without --task
    stages/stage_<k>/eval_task_agnostic/<task>.csv    the same cell scored with the head task inference chose per
                         case (RESULT_COLUMNS + chosen_task, ood)
    replay/<task>/       rehearsal only: preprocessed copies of the bounded replay buffer, the one image data a
                         run folder may hold (methods that declare ``keeps_old_data``)
    results.csv          every cell, gathered in stage and task order
    summary.json         the result matrix and continual metrics (evaluation.summary)
    report.md, report_details.md (per-label and per-case tables), figures/result_matrix.png,
    figures/task_curves.png

A comparison folder (`compare -o`) holds comparison.md and comparison.png.

A tuning folder (`tune -o`) holds tune.json, tune.csv, tune.md, tradeoff.png, tune.log and one run folder per
setting and seed under runs/<setting>/seed<seed>/, each scored on validation cases (``score_on: validation``).

A sweep folder holds format.json ("kind": "sweep"), sweep.json, runs.csv, sweep.log, one run folder per run under
runs/<method>/<ordering>/seed<seed>/, and the comparison report (comparison.html with its CSV tables).

Why format.json and not a key in experiment.json: experiment.json is compared whole with the spec of a resume (and
by a sweep with its planned runs), so a version in it would have to be stripped by every reader; a file of its own
also versions a sweep folder the same way. A run writes it when it finishes, once every record is in the current
format: a run in progress (or an older folder being resumed) reads as format 1 until then, and format 1's migration
only fills what is missing, which leaves complete records unchanged. model.pt files are never rewritten, so each
carries its own ``format`` key. ``migrate`` upgrades records in memory only: a resumed run rewrites its records
itself, while report, predict and export leave an older folder as they found it.

Formats:

1. Everything written before the format had a number (no format.json). experiment.json leaves out the fields added
   later (evaluation.metrics, nsd_tolerance_mm, report_metric, plan_with) while they hold their defaults; schedule
   entries may lack ``budget``; labels.json may lack ``scenario``, ``introduced_by``, ``task_maps``,
   ``task_labels``; summary.json may lack ``metric``, ``by_metric``, a metric's ``higher_is_better`` and
   ``mean_forgetting``; model.pt lacks ``format`` and may lack ``info.tasks_seen``. Scores are one
   ``stages/stage_<k>/eval.csv`` per stage (every task's rows; still read), there is no tasks.json (such a run is
   extended only while its task folders still exist: their records are rebuilt from them) and no history.json.
2. format.json; every record written in full; one eval file per cell; tasks.json and history.json.

Moving a folder: nothing inside a run folder names the run folder itself, so it can be moved or copied freely;
report, predict and export never read the training data. experiment.json names the tasks by absolute folder, so a
run resumes only against data at the same place: after moving the data, point the run at it with ``relocate_tasks``.
"""
from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import __version__
from .errors import UserInputError
from .io_utils import atomic_write, read_json, write_json, write_text
from .methods.base import Stage

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .experiment import Experiment
    from .labels import LabelSpace
    from .task_inference import StageDescription

RUN_FORMAT = 2
# Columns of a stage's eval.csv and of results.csv: one row per (stage, task, case, label, metric).
RESULT_COLUMNS = ["stage", "trained_on", "eval_task", "case", "label", "metric", "value"]
# nnU-Net's name of a finished training's checkpoint (also what a stock model folder holds per fold).
NNUNET_FINAL_CHECKPOINT = "checkpoint_final.pth"
FORMAT_FILE = "format.json"

Record = Literal["experiment", "schedule", "labels", "summary", "model", "sweep"]


class RunFolderError(UserInputError):
    """A record of a run or sweep folder is missing, damaged, or written by a newer lifelong-nnunet."""


# ---- migration ---------------------------------------------------------------------------------------------------
def migrate(record: Record, data: Any, version: int) -> Any:
    """Upgrade one ``record`` read from a folder (or model file) of format ``version`` to ``RUN_FORMAT``, in memory.

    The only code that knows what older folders left out. Steps only fill what is missing, so a record that is
    already complete passes unchanged. The input is not modified."""
    if version > RUN_FORMAT:
        raise RunFolderError(f"This {record} record was written by a newer lifelong-nnunet (format {version}; this "
                             f"version reads formats up to {RUN_FORMAT}). Install a newer lifelong-nnunet.")
    data = copy.deepcopy(data)
    for step in range(version, RUN_FORMAT):
        upgrade = _UPGRADES[step].get(record)
        if upgrade is not None:
            data = upgrade(data)
    return data


def _experiment_from_1(identity: dict) -> dict:
    """Fields added after the first release were left out while at their default: a missing field is its default
    (nested sections field by field), exactly as the spec itself reads."""
    from .experiment import Experiment
    defaults = Experiment(tasks=[]).identity()
    full = {**defaults, **identity}
    for section in ("training", "test_split", "evaluation", "planning"):
        full[section] = {**defaults[section], **(identity.get(section) or {})}
    return full


def _schedule_from_1(stages: list[dict]) -> list[dict]:
    return [{"budget": 1.0, **s} for s in stages]  # before joint got the whole sequence's budget


def _labels_from_1(space: dict) -> dict:
    """labels.json of the first runs held the registry only (ids, introduced_by); those runs were domain runs."""
    return {"scenario": "domain", "introduced_by": {}, "task_maps": {}, "task_labels": {}, **space}


def _summary_from_1(summary: dict) -> dict:
    """Summaries from before other metrics than Dice held the headline metric's keys at the top level only;
    ``forgetting`` was once the mean, not the per-task list; the direction of a metric was not stored."""
    from .evaluation.metrics import metric_spec
    from .evaluation.summary import CONTINUAL_KEYS
    summary.setdefault("metric", "dice")
    by_metric = summary["by_metric"] = summary.get("by_metric") or {}
    if summary["metric"] not in by_metric:  # the top level held the headline metric's entry
        by_metric[summary["metric"]] = {k: summary[k] for k in ("R", *CONTINUAL_KEYS) if k in summary}
    for name, entry in by_metric.items():
        entry.setdefault("higher_is_better", metric_spec(name).higher_is_better)
        if "mean_forgetting" not in entry:
            forgetting = entry.get("forgetting")
            entry["mean_forgetting"] = None if isinstance(forgetting, list) else forgetting
        for key in ("R", "final_per_task", "final_average", "plasticity", "bwt", "fwt"):
            entry.setdefault(key, None)
    return summary


def _model_from_1(payload: dict) -> dict:
    payload.setdefault("method_state", {})
    payload["info"] = {"tasks_seen": [], **(payload.get("info") or {})}  # before the runner recorded it
    return payload


def _sweep_from_1(sweep: dict) -> dict:
    return {**sweep, "spec": sweep.get("spec") or {}, "commands": sweep.get("commands") or [],
            "versions": sweep.get("versions") or {}}


# step -> record -> the upgrade from that format to the next
_UPGRADES: dict[int, dict[str, Callable[[Any], Any]]] = {
    1: {"experiment": _experiment_from_1, "schedule": _schedule_from_1, "labels": _labels_from_1,
        "summary": _summary_from_1, "model": _model_from_1, "sweep": _sweep_from_1},
}


# ---- reading and writing -----------------------------------------------------------------------------------------
def _damaged(path: Path, error: Exception, fix: str = "Restore it from a copy, or run the command that wrote it "
                                                         "again.") -> RunFolderError:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return RunFolderError(f"{path} is damaged ({type(error).__name__}: {first_line}). {fix}")


def _read_json(path: Path) -> Any:
    """A JSON record; a file that does not parse is a RunFolderError naming it (a missing one stays an OSError)."""
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _read_format(path: Path) -> int:
    """format.json's number; 1 for a folder written before format.json existed."""
    if not path.is_file():
        return 1
    record = _read_json(path)
    version = record.get("format") if isinstance(record, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFolderError(f"{path} holds no format number. Restore it from a copy, or delete it if the folder was "
                             f"written before format.json existed.")
    if version > RUN_FORMAT:
        raise RunFolderError(f"{path.parent} was written by a newer lifelong-nnunet (folder format {version}; this "
                             f"version reads formats up to {RUN_FORMAT}). Install a newer lifelong-nnunet to use it.")
    return version


def _write_format(path: Path, kind: str) -> None:
    write_json(path, {"format": RUN_FORMAT, "kind": kind, "written_by": f"lifelong_nnunet {__version__}"})


def save_model(path: Path, weights: dict, method_state: dict, info: dict | None = None) -> None:
    """A stage's model.pt: the network's weights on the CPU, the method's state (for resume) and what the stage
    did (``info``: trained_on, tasks_seen, train_seconds, peak memory...)."""
    payload = {"format": RUN_FORMAT, "network_weights": {k: v.detach().cpu() for k, v in weights.items()},
               "method_state": method_state, "info": info or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_model(path: Path, mmap: bool = False) -> dict:
    """A model.pt, migrated by its own format key, loaded without unpickling code (``weights_only``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # what torch.load raises on a damaged file
        raise _damaged(path, e, "Delete it and the eval.csv next to it, then repeat the run command: that stage is "
                                "trained again.") from None
    return migrate("model", payload, payload.get("format", 1))


def stored_parameter_count(weights: dict) -> int:
    """Learnable values in a stored ``network_weights``, each tensor counted once: nnU-Net registers every
    convolution twice (``conv`` and ``all_modules.0``), so its state_dict lists the same storage under two keys."""
    seen, total = set(), 0
    for v in weights.values():
        if not v.is_floating_point() or v.ndim == 0:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            total += v.numel()
    return total


def load_schedule(run_dir: Path) -> list[Stage]:
    """The stage plan stored with the run, so reports and predict work without the method's code."""
    return RunFolder(Path(run_dir)).read_schedule()


def is_one_model_per_task(schedule: list[Stage]) -> bool:
    """`separate`-like plans: every stage restarts from the untrained model on one task."""
    return len(schedule) > 1 and all(s.init == "initial" and len(s.train_tasks) == 1 for s in schedule)


# ---- a run folder ------------------------------------------------------------------------------------------------
_NOT_A_RUN = "Give the folder that 'lifelong-nnunet run -o' wrote."


@dataclass(frozen=True)
class _Folder:
    """A folder this package writes: its root, and paths inside it as its reports link them."""
    root: Path

    def relative(self, path: Path) -> str:
        """``path`` relative to the folder (a link in its report)."""
        return Path(path).relative_to(self.root).as_posix()


@dataclass(frozen=True)
class RunFolder(_Folder):
    """Paths inside a run folder (one experiment), and its records read and written typed."""

    # ---- paths ------------------------------------------------------------------------------------------------
    @property
    def format_file(self) -> Path:
        return self.root / FORMAT_FILE

    @property
    def spec(self) -> Path:
        return self.root / "experiment.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def schedule(self) -> Path:
        return self.root / "schedule.json"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def normalisation(self) -> Path:
        return self.root / "normalisation.json"

    @property
    def planning(self) -> Path:
        return self.root / "planning.json"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def details_report(self) -> Path:
        """The page of per-label and per-case tables that report.md links."""
        return self.root / "report_details.md"

    @property
    def result_matrix_figure(self) -> Path:
        return self.root / "figures" / "result_matrix.png"

    @property
    def task_curves_figure(self) -> Path:
        return self.root / "figures" / "task_curves.png"

    def stage_dir(self, index: int) -> Path:
        return self.root / "stages" / f"stage_{index}"

    def model(self, index: int) -> Path:
        return self.stage_dir(index) / "model.pt"

    def stage_eval(self, index: int) -> Path:
        """Format 1: one file per stage with every task's rows (read, never written)."""
        return self.stage_dir(index) / "eval.csv"

    def resources(self, index: int) -> Path:
        """What training and evaluating stage ``index`` cost, one entry per session (see ``record_session``)."""
        return self.stage_dir(index) / "resources.json"

    def cell_eval(self, index: int, task: str) -> Path:
        """The scores of one cell R[stage][task]: cells are evaluated one by one, so `extend` adds a new task's cells
        for earlier stages, and a task whose test data are gone simply has none."""
        return self.stage_dir(index) / "eval" / f"{task}.csv"

    def task_description(self, index: int) -> Path:
        """The per-task image descriptions of stage ``index`` (`task_inference`); methods with heads only."""
        return self.stage_dir(index) / "task_description.json"

    def task_agnostic_cell(self, index: int, task: str) -> Path:
        """Cell R[stage][task] scored with the head that task inference chose for each case (not the oracle's)."""
        return self.stage_dir(index) / "eval_task_agnostic" / f"{task}.csv"

    @property
    def task_records(self) -> Path:
        return self.root / "tasks.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    def replay_dir(self, task: str) -> Path:
        """The rehearsal buffer of ``task``: preprocessed copies of exactly the cases the method keeps."""
        return self.root / "replay" / task

    def nnunet_results(self, index: int) -> Path:
        """nnU-Net's results folder (``nnUNet_results``) of a stage while it trains."""
        return self.stage_dir(index) / "nnunet"

    def stage_models(self) -> dict[int, Path]:
        """The stage models on disk, by stage index."""
        found = {int(p.parent.name.split("_")[1]): p for p in (self.root / "stages").glob("stage_*/model.pt")}
        return dict(sorted(found.items()))

    # ---- checks -----------------------------------------------------------------------------------------------
    def require_run(self) -> None:
        """A UserInputError unless this is a run folder (its experiment.json exists)."""
        if not self.spec.is_file():
            raise RunFolderError(f"{self.root} is not a lifelong-nnunet run folder ({self.spec.name} is missing). "
                                 f"{_NOT_A_RUN}")

    def require_finished(self) -> None:
        """A UserInputError unless the run's results are gathered (what report and comparison read)."""
        for path in (self.spec, self.splits, self.results):
            if not path.is_file():
                raise RunFolderError(f"{path} is missing: {self.root} is not a finished lifelong-nnunet run. Run "
                                     f"'lifelong-nnunet run' into it first (a killed run resumes with the same "
                                     f"command).")

    # ---- records ----------------------------------------------------------------------------------------------
    def format(self) -> int:
        return _read_format(self.format_file)

    def write_format(self) -> None:
        """Mark the folder as written in ``RUN_FORMAT``: call once all its records are (re)written in that format."""
        _write_format(self.format_file, "run")

    def _read(self, record: Record, path: Path) -> Any:
        return migrate(record, _read_json(path), self.format())

    def read_experiment(self) -> Experiment:
        """The stored experiment (every field, migrated); not validated against this installation's methods."""
        from .experiment import stored_experiment
        record = self._read("experiment", self.spec)
        try:
            return stored_experiment(record, str(self.spec))
        except RunFolderError:
            raise
        except UserInputError as e:  # keys this version does not know: a damaged (or hand-edited) record
            raise RunFolderError(str(e)) from None

    def write_experiment(self, exp: Experiment) -> None:
        write_json(self.spec, exp.identity())

    def read_splits(self) -> dict[str, list[str]]:
        return _read_json(self.splits)

    def write_splits(self, splits: Mapping[str, list[str]]) -> None:
        write_json(self.splits, dict(splits))

    def read_tasks(self) -> list[str]:
        """The run's task names in training order."""
        return list(self.read_splits())

    def read_schedule(self) -> list[Stage]:
        if not self.schedule.is_file():
            raise RunFolderError(f"{self.schedule} is missing: {self.root} is not a lifelong-nnunet run folder. "
                                 f"{_NOT_A_RUN}")
        return [Stage(s["index"], tuple(s["train_tasks"]), s["init"], s["budget"], s.get("epochs"),
                      s.get("iterations_per_epoch"))
                for s in self._read("schedule", self.schedule)]

    def write_schedule(self, stages: Iterable[Stage]) -> None:
        write_json(self.schedule, [asdict(s) for s in stages])

    def read_labels(self) -> LabelSpace | None:
        """The run's label space; None for a folder without labels.json."""
        from .labels import LabelSpace
        return LabelSpace.from_dict(self._read("labels", self.labels)) if self.labels.is_file() else None

    def write_labels(self, labels: LabelSpace) -> None:
        write_json(self.labels, labels.to_dict())

    def read_plans(self) -> dict:
        return _read_json(self.plans)

    def write_plans(self, plans: dict) -> None:
        write_json(self.plans, plans)

    def read_planning(self) -> dict | None:
        """The planner settings the run's plans were made with; None when not recorded (a run planned before the
        record existed used nnU-Net's defaults)."""
        return _read_json(self.planning) if self.planning.is_file() else None

    def write_planning(self, choice: dict) -> None:
        write_json(self.planning, choice)

    def read_normalisation(self) -> dict[str, dict]:
        """Task name -> its normalisation; empty for runs made before normalisation was per task (every task was
        then normalised with plans.json's, which is what `task_plans` gives them)."""
        return _read_json(self.normalisation) if self.normalisation.is_file() else {}

    def write_normalisation(self, normalisation: Mapping[str, dict]) -> None:
        write_json(self.normalisation, dict(normalisation))

    def task_plans(self, task: str, configuration: str) -> dict:
        """The plans that preprocess ``task``'s images: the run's architecture with the task's normalisation."""
        from .nnunet.normalisation import with_normalisation
        norm = self.read_normalisation().get(task)
        plans = self.read_plans()
        return plans if norm is None else with_normalisation(plans, configuration, norm)

    def read_dataset_json(self) -> dict:
        return _read_json(self.dataset_json)

    def write_dataset_json(self, dataset_json: dict) -> None:
        write_json(self.dataset_json, dataset_json)

    def read_cell(self, index: int, task: str) -> pd.DataFrame | None:
        """The scores of R[index][task], from its own file or a format-1 stage file; None when not evaluated."""
        if self.cell_eval(index, task).is_file():
            return _read_csv(self.cell_eval(index, task))
        if self.stage_eval(index).is_file():
            rows = _read_csv(self.stage_eval(index))
            rows = rows[rows["eval_task"] == task]
            return rows if len(rows) else None
        return None

    def write_cell(self, index: int, task: str, scores: pd.DataFrame) -> None:
        _write_csv(self.cell_eval(index, task), scores)

    def write_task_description(self, index: int, descriptions: Mapping[str, StageDescription]) -> None:
        write_json(self.task_description(index), {"format": 1, "tasks": {t: d.to_json()
                                                                         for t, d in descriptions.items()}})

    def read_task_descriptions(self, indices: Iterable[int]) -> dict[str, StageDescription]:
        """Every task's description from the stages ``indices`` (a later stage's wins for a task trained twice);
        a UserInputError naming the file when one is missing (a run trained before task inference existed)."""
        from .task_inference import FEATURES_VERSION, StageDescription
        found: dict[str, StageDescription] = {}
        for index in indices:
            path = self.task_description(index)
            if not path.is_file():
                raise RunFolderError(
                    f"{path} is missing: stage {index} of {self.root} has no description of its images, so the task "
                    f"of an image cannot be inferred from it (the run was trained before task inference existed). "
                    f"Give the task with --task, or choose by the heads' entropy with --task-choice entropy.")
            for task, data in _read_json(path)["tasks"].items():
                d = StageDescription.from_json(data)
                if d.features_version != FEATURES_VERSION:
                    raise RunFolderError(f"{path} describes images with features of version {d.features_version}; "
                                         f"this installation computes version {FEATURES_VERSION}. Use "
                                         f"--task-choice entropy or --task, or the version that made the run.")
                found[task] = d
        return found

    def read_task_agnostic_cell(self, index: int, task: str) -> pd.DataFrame | None:
        path = self.task_agnostic_cell(index, task)
        return _read_csv(path) if path.is_file() else None

    def write_task_agnostic_cell(self, index: int, task: str, scores: pd.DataFrame) -> None:
        _write_csv(self.task_agnostic_cell(index, task), scores)

    def read_task_records(self) -> dict[str, dict] | None:
        """Task name -> record (`tasks.task_record`), in training order; None for a format-1 folder."""
        return _read_json(self.task_records) if self.task_records.is_file() else None

    def write_task_records(self, records: Mapping[str, dict]) -> None:
        write_json(self.task_records, dict(records))

    def read_history(self) -> list[dict]:
        return _read_json(self.history) if self.history.is_file() else []

    def record_history(self, entry: dict) -> None:
        """Add (or, for a stage trained again after a kill, replace) the stage's entry of history.json."""
        kept = [h for h in self.read_history() if h["stage"] != entry["stage"]]
        write_json(self.history, sorted([*kept, entry], key=lambda h: h["stage"]))

    def read_sessions(self, index: int) -> list[dict] | None:
        """The sessions that trained or evaluated stage ``index`` (``record_session``); None when none was recorded
        (a folder written before resources.json existed, or an imported stage)."""
        return _read_json(self.resources(index)) if self.resources(index).is_file() else None

    def record_session(self, index: int, session: dict) -> None:
        """Add, or update in place, one session's entry of stage ``index``: ``session`` (an id unique to one process
        and phase), ``phase`` ("train" or "evaluate"), ``seconds``, ``peak_rss_mb``, ``peak_gpu_mb`` (None off CUDA)
        and ``device``. Training updates its entry after every epoch, so a killed session keeps the time it spent up
        to its last epoch, and a resumed stage adds its sessions up."""
        kept = [s for s in self.read_sessions(index) or [] if s["session"] != session["session"]]
        write_json(self.resources(index), [*kept, session])

    def read_results(self) -> pd.DataFrame:
        return _read_csv(self.results)

    def write_results(self, results: pd.DataFrame) -> None:
        _write_csv(self.results, results)

    def read_summary(self) -> dict:
        return self._read("summary", self.summary)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary, summary)

    def write_report(self, markdown: str) -> None:
        write_text(self.report, markdown)

    def write_details_report(self, markdown: str) -> None:
        write_text(self.details_report, markdown)

    def load_model(self, index: int, mmap: bool = False) -> dict:
        return load_model(self.model(index), mmap=mmap)

    def trained_models(self, schedule: Iterable[Stage], mmap: bool = False) -> dict[int, dict]:
        """The stored model (weights, method state and ``info``) of every stage of ``schedule`` that has one, by
        stage index (``mmap``: the weights are only mapped, for callers that read many runs)."""
        return {s.index: self.load_model(s.index, mmap=mmap) for s in schedule if self.model(s.index).is_file()}


def relocate_tasks(run_dir: str | Path, folders: Iterable[str | Path]) -> None:
    """Point a run at the new place of its data, so that it resumes there.

    experiment.json names the tasks by absolute folder (its identity names folders however they were typed), so a
    run whose data moved would refuse to resume. Give every task's new folder; each must keep its dataset name
    (``DatasetXXX_Name``), and nothing but the stored locations changes (a ``plan_with`` that names a task's folder
    moves with it). Writes experiment.json (atomically) in the current format. The data is not read here: the
    resumed run checks it as always."""
    run = RunFolder(Path(run_dir))
    run.require_run()
    exp = run.read_experiment()
    moved = {Path(f).name: str(Path(f).expanduser().resolve()) for f in folders}
    stored = [Path(t).name for t in exp.tasks]
    if sorted(moved) != sorted(stored):
        raise UserInputError(f"The new task folders {sorted(moved)} do not name the run's tasks {stored} one for one. "
                             f"Give one folder per task, each with the dataset name it had.")
    exp.tasks = [moved[name] for name in stored]
    plan_with = Path(str(exp.plan_with))
    if exp.plan_with is not None and plan_with.name in moved and plan_with.parent != Path("."):
        exp.plan_with = moved[plan_with.name]
    run.write_experiment(exp)


def _write_rows(path: Path, rows: list[dict]) -> None:
    """A CSV of ``rows`` (dicts sharing their keys, in the first row's order), written atomically."""
    import csv

    def _write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, _write)


# ---- a sweep folder ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComparisonFiles:
    """The comparison report of a sweep: the HTML and, next to it, its tables under the same stem."""
    html: Path

    def table(self, part: Literal["methods", "runs", "pairs"]) -> Path:
        suffix = {"methods": "", "runs": "_runs", "pairs": "_pairs"}[part]
        return self.html.with_name(f"{self.html.stem}{suffix}.csv")


@dataclass(frozen=True)
class SweepFolder(_Folder):
    """Paths inside a sweep folder, and its own records (its runs are ordinary run folders)."""

    @property
    def format_file(self) -> Path:
        return self.root / FORMAT_FILE

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.json"

    @property
    def runs_table(self) -> Path:
        return self.root / "runs.csv"

    @property
    def log(self) -> Path:
        return self.root / "sweep.log"

    @property
    def comparison(self) -> ComparisonFiles:
        return ComparisonFiles(self.root / "comparison.html")

    @staticmethod
    def run_path(method: str, ordering: str, seed: int) -> str:
        """Where a run lies, relative to the sweep folder (as sweep.json stores it)."""
        return f"runs/{method}/{ordering}/seed{seed}"

    def run(self, path: str) -> RunFolder:
        return RunFolder(self.root / path)

    def read_sweep(self) -> dict:
        """sweep.json (spec, runs, commands, versions), migrated; a UserInputError naming the folder if absent."""
        if not self.sweep_file.is_file():
            raise RunFolderError(f"{self.sweep_file} is missing: {self.root} is not a sweep folder. Give the folder "
                                 f"the sweep command wrote (it holds {self.sweep_file.name} and runs/).")
        sweep = migrate("sweep", _read_json(self.sweep_file), _read_format(self.format_file))
        if not isinstance(sweep.get("runs"), list):
            raise RunFolderError(f"{self.sweep_file} has no 'runs' list; it was not written by the sweep runner.")
        return sweep

    def write_sweep(self, spec: dict, runs: list[dict], commands: list[str], versions: dict) -> None:
        write_json(self.sweep_file, {"spec": spec, "runs": runs, "commands": commands, "versions": versions})
        _write_format(self.format_file, "sweep")

    def write_runs_table(self, rows: list[dict]) -> None:
        """runs.csv: one row per run of the sweep (``rows`` share their keys)."""
        _write_rows(self.runs_table, rows)


# ---- a tuning folder ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneFolder(_Folder):
    """What `tune` writes: tune.json (the spec and the grid, written before the first run), one ordinary run folder
    per setting and seed under runs/<setting>/seed<seed>/ (all scored on validation cases), tune.csv, tune.md,
    tradeoff.png and tune.log."""

    @property
    def tune_file(self) -> Path:
        return self.root / "tune.json"

    @property
    def table(self) -> Path:
        return self.root / "tune.csv"

    @property
    def report(self) -> Path:
        return self.root / "tune.md"

    @property
    def tradeoff_plot(self) -> Path:
        return self.root / "tradeoff.png"

    @property
    def log(self) -> Path:
        return self.root / "tune.log"

    def run(self, setting: str, seed: int) -> RunFolder:
        return RunFolder(self.root / "runs" / setting / f"seed{seed}")

    def read_tune(self) -> dict | None:
        return read_json(self.tune_file) if self.tune_file.is_file() else None

    def write_tune(self, record: dict) -> None:
        write_json(self.tune_file, record)

    def write_table(self, rows: list[dict]) -> None:
        """tune.csv: one row per setting and seed (``rows`` share their keys)."""
        _write_rows(self.table, rows)

    def write_report(self, text: str) -> None:
        write_text(self.report, text)


# ---- the folders predict, export and the demo write --------------------------------------------------------------
@dataclass(frozen=True)
class PredictionFolder(_Folder):
    """What `predict` writes: one label map per case (and its probabilities), and the task chosen per case."""

    def label_map(self, case: str, file_ending: str) -> Path:
        return self.root / f"{case}{file_ending}"

    def probabilities(self, case: str) -> Path:
        return self.root / f"{case}_probabilities.npz"

    @property
    def task_choices(self) -> Path:
        """Per case: the task chosen without --task, the rule, the margin and the out-of-distribution flag."""
        return self.root / "task_choices.csv"


@dataclass(frozen=True)
class NnunetModelFolder(_Folder):
    """A stock nnU-Net v2 trained-model folder, as `export` writes it (nnU-Net's names)."""

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    def checkpoint(self, fold: int = 0) -> Path:
        return self.root / f"fold_{fold}" / NNUNET_FINAL_CHECKPOINT


@dataclass(frozen=True)
class ComparisonFolder(_Folder):
    """`lifelong-nnunet compare -o`: several runs side by side, as markdown and a figure."""

    @property
    def report(self) -> Path:
        return self.root / "comparison.md"

    @property
    def figure(self) -> Path:
        return self.root / "comparison.png"


@dataclass(frozen=True)
class DemoFolder(_Folder):
    """`lifelong-nnunet demo`: one run folder per method and the comparison of them."""

    def run(self, method: str) -> RunFolder:
        return RunFolder(self.root / method)

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figure(self) -> Path:
        return self.root / "comparison.png"

    @property
    def record(self) -> Path:
        return self.root / "demo.json"
