"""The stage loop: check inputs -> plan once -> stage 0 -> (train -> evaluate every task -> save) per stage -> report.

Everything a stage produces is written atomically, and a stage counts as done only when its evaluation file exists,
so a run killed at any point and started again with the same command continues from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from datetime import datetime, timezone
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .console import RunLog, progress_bar
from .errors import UserInputError
from .experiment import Experiment
from .io_utils import atomic_write, read_json, write_json
from .methods import Method, Stage, create_method
from .labels import LabelSpace
from .tasks import (Task, check_case, check_sequence, load_task, make_test_split, resolve_task_folder,
                    task_record)

RESULT_COLUMNS = ["stage", "trained_on", "eval_task", "case", "label", "metric", "value"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIFELONG_NNUNET_CACHE", Path.home() / ".cache" / "lifelong-nnunet"))


@dataclass
class RunFolder:
    """Paths inside a run folder (one experiment)."""
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "experiment.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

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
    def schedule(self) -> Path:
        return self.root / "schedule.json"

    def stage_dir(self, index: int) -> Path:
        return self.root / "stages" / f"stage_{index}"

    def model(self, index: int) -> Path:
        return self.stage_dir(index) / "model.pt"

    def stage_eval(self, index: int) -> Path:
        """Format 1: one file per stage with every task's rows (read, never written, by this version)."""
        return self.stage_dir(index) / "eval.csv"

    def cell_eval(self, index: int, task: str) -> Path:
        """The scores of one cell R[stage][task]: cells are evaluated one by one, so ``extend`` can add a task's
        cells for earlier stages, and a task whose test data are gone simply has no file."""
        return self.stage_dir(index) / "eval" / f"{task}.csv"

    @property
    def task_records(self) -> Path:
        return self.root / "tasks.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"

    def replay_dir(self, task: str) -> Path:
        """The rehearsal buffer: preprocessed copies of the earlier cases a ``keeps_old_data`` method replays. The
        only image data a run folder ever holds, bounded by the method (docs/lifelong.md)."""
        return self.root / "replay" / task

    def cell_rows(self, index: int, task: str) -> pd.DataFrame | None:
        """Scores of R[index][task], from its own file or a format-1 stage file; None when not evaluated."""
        if self.cell_eval(index, task).is_file():
            return pd.read_csv(self.cell_eval(index, task))
        if self.stage_eval(index).is_file():
            rows = pd.read_csv(self.stage_eval(index))
            rows = rows[rows.eval_task == task]
            return rows if len(rows) else None
        return None


def prepare(exp: Experiment, run_dir: Path, log: RunLog, imported: Task | None = None) -> tuple[list[Task], LabelSpace]:
    """Every check on the spec, the data and the run folder. Writes nothing. ``imported``: the first task is the
    one a stock model was trained on (``--start-from``), known from the model folder, with no data here."""
    run = RunFolder(Path(run_dir))
    raw_root = exp.raw_root or os.environ.get("nnUNet_raw")
    given = exp.tasks[1:] if imported is not None else exp.tasks
    tasks = [load_task(resolve_task_folder(t, Path(raw_root) if raw_root else None)) for t in given]
    tasks = [imported, *tasks] if imported is not None else tasks
    exp.tasks = [str(t.folder) for t in tasks]  # the identity of a run names folders, however they were typed
    check_sequence(tasks, exp.scenario)
    if exp.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device 'cuda' was requested but no CUDA GPU is visible. Use device 'auto' or 'cpu'.")
    if run.spec.is_file():
        stored = read_json(run.spec)
        if stored != exp.identity():
            diff = sorted(k for k in set(stored) | set(exp.identity()) if stored.get(k) != exp.identity().get(k))
            raise UserInputError(
                f"{run.root} already holds a different experiment (differs in: {', '.join(diff)}). Use a new output "
                f"folder, or repeat the original command to resume that run.")
    elif run.root.exists() and any(run.root.iterdir()):
        raise UserInputError(f"{run.root} exists and is not empty, but holds no lifelong-nnunet run "
                             f"(experiment.json is missing). Choose an empty or new output folder.")
    stored_splits = read_json(run.splits) if run.splits.is_file() else {}
    total = sum(len(t.cases) for t in tasks)
    with progress_bar(log.quiet) as bar:
        job = bar.add_task("Checking data", total=total, info="")
        for t in tasks:
            if t is imported:
                continue
            for case in t.cases.values():
                check_case(t, case)
                bar.advance(job)
            t.test_cases = stored_splits.get(t.name) or make_test_split(
                t, exp.test_split.fraction, exp.test_split.min_cases, exp.seed)
    return tasks, LabelSpace.from_tasks(tasks, exp.scenario)


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, quiet: bool = False) -> dict:
    """Run (or resume) an experiment into ``run_dir`` and return its summary."""
    from .nnunet.planning import Workspace
    if exp.start_from is not None:
        from .lifelong import run_from_stock_model
        return run_from_stock_model(exp, run_dir, quiet)

    run = RunFolder(Path(run_dir).resolve())
    log = RunLog(None, quiet)
    tasks, labels = prepare(exp, run.root, log)
    method = method_for(exp, labels)
    stages = method.schedule([t.name for t in tasks])
    if is_complete(run, stages, tasks):
        log(f"Run in {run.root} is already complete; nothing to do. (Use 'lifelong-nnunet report' to re-render.)")
        return read_json(run.summary)

    log.path = run.log
    write_run_records(run, exp, tasks, stages, labels)
    log(f"Run {run.root}: method '{method.name}', {len(tasks)} task(s), {len(stages)} stage(s), "
        f"configuration {exp.configuration}")

    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), tasks,
                          exp.configuration, plan_with=exp.plan_with)
    workspace.ensure_planned(log)
    plans = workspace.plans(workspace.plan_task)
    if run.plans.is_file() and read_json(run.plans) != plans:
        raise UserInputError(
            f"The data of {run.root} changed since the run started: nnU-Net now plans it differently than the "
            f"plans stored in {run.plans}. A run folder's plans are never overwritten, since its models were "
            f"trained with them. Use a new output folder for the changed data.")
    write_json(run.plans, plans)
    write_json(run.dataset_json, model_dataset_json(workspace.dataset_json(workspace.plan_task), labels))
    return advance(exp, run, workspace, tasks, method, stages, labels, log, origin="run")


def method_for(exp: Experiment, labels: LabelSpace) -> Method:
    """The experiment's method, checked against its scenario, with the run's label space bound."""
    method = create_method(exp.method, exp.method_params)
    if exp.scenario not in method.scenarios:
        raise UserInputError(f"method '{method.name}' is not defined for the {exp.scenario} scenario (it supports: "
                             f"{', '.join(method.scenarios)}); see docs/methods/{method.name}.md. Choose another "
                             f"method (lifelong-nnunet methods) or scenario.")
    method.labels = labels
    return method


def write_run_records(run: RunFolder, exp: Experiment, tasks: list[Task], stages: list[Stage],
                      labels: LabelSpace) -> None:
    """The spec, splits, schedule, label space and task records: everything later stages (and ``extend``, after
    the old training data are gone) need to know about the tasks, without their images."""
    write_json(run.spec, exp.identity())
    write_json(run.splits, {t.name: t.test_cases for t in tasks})
    write_json(run.schedule, [asdict(s) for s in stages])
    write_json(run.labels, labels.to_dict())
    write_json(run.task_records, {t.name: task_record(t) for t in tasks})


def is_complete(run: RunFolder, stages: list[Stage], tasks: list[Task]) -> bool:
    """Every stage trained and every cell evaluated whose task still has its test data."""
    if not run.summary.is_file() or not all(run.model(s.index).is_file() for s in stages):
        return False
    return all(run.cell_rows(i, t.name) is not None for i in [0, *(s.index for s in stages)] for t in tasks
               if t.evaluable)


def advance(exp: Experiment, run: RunFolder, workspace, tasks: list[Task], method: Method, stages: list[Stage],
            labels: LabelSpace, log: RunLog, origin: str) -> dict:
    """Bring a run up to date: train every stage without a model, evaluate every cell not yet scored (whose task
    still has its test data), then write results.csv, summary.json and the report. ``origin`` ("run" or "extend")
    goes into the history of each stage trained now."""
    from .evaluation.summary import write_summary_and_report
    from .nnunet.env import resolve_device
    device = resolve_device(exp.device)
    ctx = StageContext(exp, run, workspace, tasks, method, device, log, labels)
    ctx.ensure_initial_model()
    ctx.evaluate(0, "none")
    for stage in stages:
        if run.model(stage.index).is_file():
            ctx.load_method_state(stage.index)
        else:
            ctx.train(stage, origin)
        ctx.evaluate(stage.index, stage.label)
    cells = [run.cell_rows(i, t.name) for i in [0, *(s.index for s in stages)] for t in tasks]
    results = pd.concat([c for c in cells if c is not None])
    atomic_write(run.results, lambda tmp: results.to_csv(tmp, index=False))
    summary = write_summary_and_report(run.root)
    log(f"Done. Report: {run.root / 'report.md'}")
    return summary


def model_dataset_json(first_task_json: dict, labels: LabelSpace) -> dict:
    """The dataset.json of the run's model: the first task's, with every structure of the sequence in the class
    scenario (global IDs), so the final model's label map and its dataset.json list everything learned."""
    if not labels.is_class_incremental:
        return first_task_json
    return {**first_task_json, "labels": labels.dataset_labels(),
            "description": "lifelong-nnunet class-incremental model over: " + ", ".join(labels.tasks)}


def known_labels_json(dataset_json: dict, labels: LabelSpace, tasks_seen: list[str]) -> dict:
    """``dataset_json`` restricted to the structures a model trained on ``tasks_seen`` outputs (class scenario: its
    channels 0..n-1); nnU-Net's predictor sizes its buffers from this label list."""
    if not labels.is_class_incremental:
        return dataset_json
    n = labels.num_outputs(tasks_seen)
    return {**dataset_json, "labels": {k: v for k, v in dataset_json["labels"].items() if v < n}}


class StageContext:
    """State shared by the stages of one run (the workspace, the method, the device, the label space)."""

    def __init__(self, exp: Experiment, run: RunFolder, workspace, tasks: list[Task], method: Method,
                 device: torch.device, log: RunLog, labels: LabelSpace | None = None) -> None:
        self.exp, self.run, self.workspace, self.tasks = exp, run, workspace, tasks
        self.method, self.device, self.log = method, device, log
        self.labels = labels or LabelSpace.from_tasks(tasks, exp.scenario)
        self.by_name = {t.name: t for t in tasks}
        # the run's stored plans and model dataset.json, not the workspace's: after `extend` the workspace holds
        # only the new tasks (the plans differ per task only in the dataset name nnU-Net writes into them)
        self.plans = read_json(run.plans)
        self.dataset_json = model_dataset_json(dict(tasks[0].dataset_json, numTraining=len(tasks[0].train_cases)),
                                               self.labels)

    # ---- models --------------------------------------------------------------------------------------------
    def ensure_initial_model(self) -> None:
        """Stage 0: nnU-Net's He-initialised network, seeded. Every stage-1 (and `initial`) start is this model."""
        from .nnunet.trainer import build_network, seed_everything
        path = self.run.model(0)
        if path.is_file():
            return
        seed_everything(self.exp.seed)
        # the first task's outputs only: the untrained model must not depend on which tasks come later (their
        # labels would change how many random numbers the output layers draw), or `extend` could never equal a run
        # that knew the whole sequence from the start
        first_labels = known_labels_json(self.dataset_json, self.labels, [])
        net = build_network(self.plans, self.exp.configuration, first_labels, deep_supervision=True)
        save_model(path, self.method.adapt_network(net, []).state_dict(), {})

    def load_method_state(self, index: int) -> None:
        self.method.load_state_dict(load_model(self.run.model(index))["method_state"])

    # ---- training ------------------------------------------------------------------------------------------
    def split_train_val(self, task: Task) -> tuple[list[str], list[str]]:
        """nnU-Net's per-epoch validation cases: a seeded part of the task's training cases (never test cases)."""
        keys = task.train_cases
        n_val = max(1, int(round(self.exp.validation_fraction * len(keys))))
        order = np.random.default_rng(self.exp.seed + task.dataset_id + 7).permutation(keys).tolist()
        return sorted(order[n_val:]), sorted(order[:n_val])

    def tasks_before(self, stage: Stage) -> list[str]:
        """Tasks trained into the weights this stage starts from."""
        if stage.init != "previous":
            return []
        done = [s for s in load_schedule(self.run.root) if s.index < stage.index]
        return list(dict.fromkeys(t for s in done for t in s.train_tasks))

    def tasks_trained_by(self, index: int) -> list[str]:
        """Tasks whose training went into the model of stage ``index`` (none for stage 0)."""
        if index == 0:
            return []
        stage = next(s for s in load_schedule(self.run.root) if s.index == index)
        return list(dict.fromkeys([*self.tasks_before(stage), *stage.train_tasks]))

    def sources(self, stage: Stage):
        """The stage's own tasks, plus the method's replay buffer drawn with its share of every batch."""
        from .nnunet.trainer import DataSource
        current = []
        for name in stage.train_tasks:
            t = self.by_name[name]
            train, val = self.split_train_val(t)
            current.append(DataSource(name, self.workspace.preprocessed_folder(t), train, val))
        earlier = {name: self.split_train_val(self.by_name[name])[0] for name in self.tasks_before(stage)
                   if name not in stage.train_tasks}
        buffer = self.method.replay_buffer(stage, earlier) if earlier else {}
        if buffer and not self.method.keeps_old_data:
            raise RuntimeError(f"method '{self.method.name}' replays old data but does not declare keeps_old_data")
        for name, cases in buffer.items():
            unknown = sorted(set(cases) - set(earlier.get(name, [])))
            if unknown:
                raise RuntimeError(f"replay buffer of '{self.method.name}' names cases outside {name}'s training "
                                   f"cases: {unknown[:3]}")
        share = self.method.replay_share(stage) if buffer else 0.0
        replay = [DataSource(name, self.run.replay_dir(name), sorted(cases), []) for name, cases in buffer.items()
                  if cases]
        for group, total in ((current, 1.0 - share), (replay, share)):
            n = sum(len(s.train_keys) for s in group)
            for s in group:
                s.weight = total * len(s.train_keys) / n
        return current + replay

    def stage_env(self, stage: Stage):
        """nnU-Net's folders for this stage; augmentation in the main process unless the user set workers
        (as fast as worker processes on 2 cores, measured, and seedable)."""
        return self.workspace.env(results=self.run.stage_dir(stage.index) / "nnunet",
                                  nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))

    def build_stage_trainer(self, stage: Stage, epochs: int, on_epoch=None):
        """A trainer ready for the stage's first epoch: the method's network with the starting weights loaded
        and ``before_stage`` called. Call inside ``stage_env(stage)``."""
        from .nnunet.trainer import build_trainer, seed_everything
        exp, t = self.exp, self.exp.training
        first = self.by_name[stage.train_tasks[0]]
        init_from = self.run.model(stage.index - 1 if stage.init == "previous" else 0)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = build_trainer(self.workspace.plans(first), exp.configuration, self.dataset_json, self.device,
                                    resume=True, results_dir=self.run.stage_dir(stage.index) / "nnunet")
            trainer.configure(sources=self.sources(stage), method=self.method, stage=stage, epochs=epochs,
                              iterations_per_epoch=stage_iterations(stage, t), val_iterations=t.val_iterations,
                              initial_lr=t.initial_lr, seed=exp.seed, batch_size=t.batch_size, on_epoch=on_epoch)
            trainer.initialize()
            # seeded before the method adapts the network: parts it adds (new output channels, heads) are then the
            # same whatever ran before in this process (an uninterrupted run, a resumed one, or `extend`)
            seed_everything(exp.seed, stage.index)
            before = self.tasks_before(stage)
            trainer.set_network(self.method.adapt_network(trainer.network, before))
            trainer.network.load_state_dict(load_model(init_from)["network_weights"])
            trainer.set_network(self.method.adapt_network(trainer.network, [*before, *stage.train_tasks]))
            trainer.tasks_before, trainer.stage_dir = before, self.run.stage_dir(stage.index)
            if self.labels.is_class_incremental:  # channels annotated in this stage's data (background shift)
                trainer.annotated_classes = [0, *sorted({c for name in stage.train_tasks
                                                         for c in self.labels.global_classes(name)})]
            self.method.before_stage(trainer, stage)
        return trainer

    def train(self, stage: Stage, origin: str = "run") -> None:
        run, t = self.run, self.exp.training
        if run.model(stage.index).is_file():
            self.load_method_state(stage.index)
            return
        epochs, iterations = stage_epochs(stage, t), stage_iterations(stage, t)
        with progress_bar(self.log.quiet) as bar:
            job = bar.add_task(f"Stage {stage.index} [{stage.label}] epochs", total=epochs, info="")

            def on_epoch(epoch, total, stats):
                bar.update(job, completed=epoch, info=f"loss {stats['train_loss']:.3f} "
                                                      f"pseudo-Dice {stats['pseudo_dice']:.3f}")
                self.log.path and RunLog(self.log.path, quiet=True)(
                    f"stage {stage.index} epoch {epoch}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))

            started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with self.stage_env(stage):
                trainer = self.build_stage_trainer(stage, epochs, on_epoch)
                resume_from = trainer.resume_checkpoint()
                if resume_from is not None:
                    trainer.load_checkpoint(str(resume_from))
                    bar.update(job, completed=trainer.current_epoch)
                    self.log(f"Stage {stage.index}: resuming from epoch {trainer.current_epoch}")
                started = time.time()
                with contextlib.redirect_stdout(io.StringIO()):
                    trainer.run_training()
                    self.method.after_stage(trainer, stage)
        if self.method.keeps_old_data:
            self.keep_for_replay(stage)
        save_model(run.model(stage.index), trainer.network.state_dict(), self.method.state_dict(),
                   {"stage": stage.index, "trained_on": list(stage.train_tasks),
                    "tasks_seen": self.tasks_trained_by(stage.index),
                    "train_seconds": time.time() - started, "epochs": epochs,
                    "iterations_per_epoch": iterations, **peak_memory_mb(self.device)})
        record_history(run, {"stage": stage.index, "origin": origin, "started": started_at,
                             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "datasets": [dataset_summary(self.by_name[n]) for n in stage.train_tasks],
                             "budget": {"epochs": epochs, "iterations_per_epoch": iterations}, "versions": versions()})
        final = Path(trainer.output_folder) / "checkpoint_final.pth"
        final.unlink(missing_ok=True)  # model.pt holds the weights; the optimizer state is not needed any more
        self.log(f"Stage {stage.index} [{stage.label}] trained in {time.time() - started:.0f} s")

    def keep_for_replay(self, stage: Stage) -> None:
        """Copy the cases the method keeps of this stage's tasks into the run folder (its declared, bounded buffer),
        and drop the copies of cases that left the buffer, so replay never needs the cache or the raw data."""
        for name in stage.train_tasks:
            buffer = self.method.keep_for_replay(name, self.split_train_val(self.by_name[name])[0])
            for task, cases in buffer.items():
                folder = self.run.replay_dir(task)
                if task in stage.train_tasks:
                    source = self.workspace.preprocessed_folder(self.by_name[task])
                    for case in cases:
                        for f in preprocessed_files(source, case):
                            if not (folder / f.name).is_file():
                                atomic_write(folder / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp),
                                             suffix=f.suffix)
                for f in list(folder.iterdir()) if folder.is_dir() else []:
                    if case_of(f) not in cases:
                        f.unlink()

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, index: int, trained_on: str) -> None:
        """Predict the test cases of every task not yet scored at this stage with the stage's model, cell by cell.
        A task whose test files are gone is left out (its cell stays "not evaluated"), never scored as zero."""
        from .evaluation.metrics import nsd_tolerances, score_case
        from .nnunet.predictor import Segmenter, read_label
        from .nnunet.trainer import build_network
        todo = [t for t in self.tasks if self.run.cell_rows(index, t.name) is None]
        for t in [t for t in todo if t.missing_test_cases]:
            self.log(f"Stage {index}: {t.short_name} not evaluated: {len(t.missing_test_cases)} of its "
                     f"{len(t.test_cases)} test case(s) are gone (e.g. {t.missing_test_cases[0]})")
        todo = [t for t in todo if t.evaluable]
        if not todo:
            return
        net = build_network(self.plans, self.exp.configuration, self.dataset_json, deep_supervision=False)
        stored = load_model(self.run.model(index))
        if index > 0:
            self.method.load_state_dict(stored["method_state"])  # architecture choices the state records
        net = self.method.adapt_network(net, self.tasks_trained_by(index))
        net.load_state_dict(stored["network_weights"])
        dataset_json = known_labels_json(self.dataset_json, self.labels, self.tasks_trained_by(index))
        started, means = time.time(), {}
        with progress_bar(self.log.quiet) as bar:
            job = bar.add_task(f"Evaluating stage {index}", total=sum(len(t.test_cases) for t in todo), info="")
            for t in todo:
                rows = []
                seg = Segmenter(self.method.network_for_task(net, t.name), self.plans, self.exp.configuration,
                                dataset_json, self.device, self.exp.evaluation.mirroring,
                                self.exp.evaluation.tile_step_size)
                for cid in t.test_cases:
                    case = t.cases[cid]
                    pred, props = seg.predict_files(list(case.images))
                    ref = read_label(case.label)
                    if self.labels.is_class_incremental:  # the task's local values -> global IDs of the model
                        ref = np.asarray(self.labels.lut(t.name))[ref.astype(np.int64)]
                    ev, scored = self.exp.evaluation, self.labels.eval_labels(t.name)
                    for row in score_case(pred, ref, scored, ev.metrics, spacing=props["spacing"],  # z, y, x as pred
                                          nsd_tolerance_mm=nsd_tolerances(ev.nsd_tolerance_mm, list(scored),
                                                                          [n for x in self.tasks for n in x.labels])):
                        rows.append({"stage": index, "trained_on": trained_on, "eval_task": t.name, "case": cid,
                                     **row})
                    bar.advance(job, 1)
                    bar.update(job, info=t.short_name)
                df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
                atomic_write(self.run.cell_eval(index, t.name), lambda tmp: df.to_csv(tmp, index=False))
                means[t.short_name] = df[df.metric == "dice"].value.mean()
        self.log(f"Stage {index} evaluated in {time.time() - started:.0f} s: "
                 + ", ".join(f"{k} Dice {v:.3f}" for k, v in means.items()))


def stage_epochs(stage: Stage, training) -> int:
    """A stage's epochs: its own (set by `extend --epochs`), else the spec's, scaled by the stage's budget."""
    return stage.epochs if stage.epochs is not None else max(1, round(training.epochs * stage.budget))


def stage_iterations(stage: Stage, training) -> int:
    return stage.iterations_per_epoch if stage.iterations_per_epoch is not None else training.iterations_per_epoch


def preprocessed_files(folder: Path, case: str) -> list[Path]:
    """The files nnU-Net's preprocessing wrote for one case (image, segmentation, properties), in any format."""
    return sorted(f for f in Path(folder).iterdir() if case_of(f) == case)


def case_of(path: Path) -> str:
    """The case a preprocessed file belongs to: ``case.b2nd``, ``case_seg.b2nd``, ``case.pkl`` -> ``case``."""
    stem = path.name.split(".")[0]
    return stem[: -len("_seg")] if stem.endswith("_seg") else stem


def dataset_summary(task: Task) -> dict:
    """What a stage saw of a dataset, for the history: name, case counts and a fingerprint of its files."""
    return {"name": task.name, "n_cases": len(task.cases), "n_train": len(task.train_cases),
            "n_test": len(task.test_cases), "fingerprint": content_fingerprint(task)}


def content_fingerprint(task: Task) -> str:
    """SHA-256 over every case file's name and bytes (training and test), in case order: the same data gives the
    same fingerprint wherever it is copied, changed data a new one."""
    import hashlib
    digest = hashlib.sha256()
    for cid in sorted(task.cases):
        case = task.cases[cid]
        for f in (*case.images, case.label):
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in ("lifelong-nnunet", "nnunetv2", "torch")}


def record_history(run: RunFolder, entry: dict) -> None:
    """Append (or, for a stage trained again after a kill, replace) the stage's entry in history.json."""
    history = [h for h in (read_json(run.history) if run.history.is_file() else []) if h["stage"] != entry["stage"]]
    write_json(run.history, sorted([*history, entry], key=lambda h: h["stage"]))


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory on CUDA) so far, in MiB."""
    import resource
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def load_schedule(run_dir: Path) -> list[Stage]:
    """The stage plan stored with the run, so reports and predict work without the method's code."""
    path = RunFolder(Path(run_dir)).schedule
    if not path.is_file():
        raise UserInputError(f"{path} is missing: {run_dir} is not a lifelong-nnunet run folder. Give the folder "
                             f"that 'lifelong-nnunet run -o' wrote.")
    return [Stage(s["index"], tuple(s["train_tasks"]), s["init"], s.get("budget", 1.0), s.get("epochs"),
                  s.get("iterations_per_epoch")) for s in read_json(path)]


def is_one_model_per_task(schedule: list[Stage]) -> bool:
    """`separate`-like plans: every stage restarts from the untrained model on one task."""
    return len(schedule) > 1 and all(s.init == "initial" and len(s.train_tasks) == 1 for s in schedule)


def save_model(path: Path, weights: dict, method_state: dict, info: dict | None = None) -> None:
    payload = {"network_weights": {k: v.detach().cpu() for k, v in weights.items()},
               "method_state": method_state, "info": info or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


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


def load_model(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
