"""The stage loop: check inputs -> plan once -> stage 0 -> (train -> evaluate every task -> save) per stage -> report.

Everything a stage produces is written atomically, and a stage counts as done only when its evaluation file exists,
so a run killed at any point and started again with the same command continues from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .console import RunLog, progress_bar
from .errors import UserInputError
from .experiment import Experiment
from .evaluation.summary import write_summary_and_report
from .labels import LabelSpace
from .methods import Method, Stage, create_method
from .run_folder import NNUNET_FINAL_CHECKPOINT, RESULT_COLUMNS, RunFolder, load_model, load_schedule, save_model
from .tasks import Task, check_case, check_sequence, load_task, make_test_split, resolve_task_folder


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIFELONG_NNUNET_CACHE", Path.home() / ".cache" / "lifelong-nnunet"))


def prepare(exp: Experiment, run_dir: Path, log: RunLog) -> tuple[list[Task], LabelSpace]:
    """Every check on the spec, the data and the run folder. Writes no file (it resolves ``exp.tasks`` to folders
    and sets each task's test cases, in memory)."""
    run = RunFolder(Path(run_dir))
    raw_root = exp.raw_root or os.environ.get("nnUNet_raw")
    tasks = [load_task(resolve_task_folder(t, Path(raw_root) if raw_root else None)) for t in exp.tasks]
    exp.tasks = [str(t.folder) for t in tasks]  # the identity of a run names folders, however they were typed
    check_sequence(tasks, exp.scenario)
    if exp.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device 'cuda' was requested but no CUDA GPU is visible. Use device 'auto' or 'cpu'.")
    if run.spec.is_file():
        stored = run.read_experiment().identity()
        if stored != exp.identity():
            diff = sorted(k for k in set(stored) | set(exp.identity()) if stored.get(k) != exp.identity().get(k))
            raise UserInputError(
                f"{run.root} already holds a different experiment (differs in: {', '.join(diff)}). Use a new output "
                f"folder, or repeat the original command to resume that run.")
    elif run.root.exists() and any(run.root.iterdir()):
        raise UserInputError(f"{run.root} exists and is not empty, but holds no lifelong-nnunet run "
                             f"({run.spec.name} is missing). Choose an empty or new output folder.")
    stored_splits = run.read_splits() if run.splits.is_file() else {}
    total = sum(len(t.cases) for t in tasks)
    with progress_bar(log.quiet) as bar:
        job = bar.add_task("Checking data", total=total, info="")
        for t in tasks:
            for case in t.cases.values():
                check_case(t, case)
                bar.advance(job)
            t.test_cases = stored_splits.get(t.name) or make_test_split(
                t, exp.test_split.fraction, exp.test_split.min_cases, exp.seed)
    return tasks, LabelSpace.from_tasks(tasks, exp.scenario)


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, quiet: bool = False) -> dict:
    """Run (or resume) an experiment into ``run_dir`` and return its summary."""
    from .nnunet.planning import Workspace

    run = RunFolder(Path(run_dir).resolve())
    log = RunLog(None, quiet)
    tasks, labels = prepare(exp, run.root, log)
    method = create_method(exp.method, exp.method_params)
    if exp.scenario not in method.scenarios:
        raise UserInputError(f"method '{method.name}' is not defined for the {exp.scenario} scenario (it supports: "
                             f"{', '.join(method.scenarios)}); see docs/methods/{method.name}.md. Choose another "
                             f"method (lifelong-nnunet methods) or scenario.")
    method.labels = labels
    stages = method.schedule([t.name for t in tasks])
    if run.summary.is_file() and all(run.stage_eval(s.index).is_file() for s in stages):
        log(f"Run in {run.root} is already complete; nothing to do. (Use 'lifelong-nnunet report' to re-render.)")
        return run.read_summary()

    log.path = run.log
    run.write_experiment(exp)
    run.write_splits({t.name: t.test_cases for t in tasks})
    run.write_schedule(stages)
    run.write_labels(labels)
    log(f"Run {run.root}: method '{method.name}', {len(tasks)} task(s), {len(stages)} stage(s), "
        f"configuration {exp.configuration}")

    workspace = Workspace(Path(exp.cache_dir) if exp.cache_dir else default_cache_dir(), tasks,
                          exp.configuration, plan_with=exp.plan_with)
    workspace.ensure_planned(log)
    plans = workspace.plans(workspace.plan_task)
    run.write_plans(plans)
    run.write_dataset_json(model_dataset_json(workspace.dataset_json(workspace.plan_task), labels))

    from .nnunet.env import resolve_device
    device = resolve_device(exp.device)
    ctx = StageContext(exp, run, workspace, tasks, method, device, log, labels)
    ctx.ensure_initial_model()
    ctx.evaluate(0, "none")
    for stage in stages:
        if run.stage_eval(stage.index).is_file():
            log(f"Stage {stage.index} ({stage.label}) already done, skipping")
            ctx.load_method_state(stage.index)
            continue
        ctx.train(stage)
        ctx.evaluate(stage.index, stage.label)
    run.write_results(pd.concat([run.read_stage_eval(i) for i in [0] + [s.index for s in stages]]))
    summary = write_summary_and_report(run.root)
    run.write_format()  # every record is now in the current format (see run_folder)
    log(f"Done. Report: {run.report}")
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
        self.plans = workspace.plans(tasks[0])
        self.dataset_json = model_dataset_json(workspace.dataset_json(tasks[0]), self.labels)

    # ---- models --------------------------------------------------------------------------------------------
    def ensure_initial_model(self) -> None:
        """Stage 0: nnU-Net's He-initialised network, seeded. Every stage-1 (and `initial`) start is this model."""
        from .nnunet.trainer import build_network, seed_everything
        path = self.run.model(0)
        if path.is_file():
            return
        seed_everything(self.exp.seed)
        net = build_network(self.plans, self.exp.configuration, self.dataset_json, deep_supervision=True)
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
        replay = [DataSource(name, self.workspace.preprocessed_folder(self.by_name[name]), sorted(cases), [])
                  for name, cases in buffer.items() if cases]
        for group, total in ((current, 1.0 - share), (replay, share)):
            n = sum(len(s.train_keys) for s in group)
            for s in group:
                s.weight = total * len(s.train_keys) / n
        return current + replay

    def stage_env(self, stage: Stage):
        """nnU-Net's folders for this stage; augmentation in the main process unless the user set workers
        (as fast as worker processes on 2 cores, measured, and seedable)."""
        return self.workspace.env(results=self.run.nnunet_results(stage.index),
                                  nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))

    def build_stage_trainer(self, stage: Stage, epochs: int, on_epoch=None):
        """A trainer ready for the stage's first epoch: the method's network with the starting weights loaded
        and ``before_stage`` called. Call inside ``stage_env(stage)``."""
        from .nnunet.trainer import build_trainer
        exp, t = self.exp, self.exp.training
        first = self.by_name[stage.train_tasks[0]]
        init_from = self.run.model(stage.index - 1 if stage.init == "previous" else 0)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = build_trainer(self.workspace.plans(first), exp.configuration, self.dataset_json, self.device,
                                    resume=True, results_dir=self.run.nnunet_results(stage.index))
            trainer.configure(sources=self.sources(stage), method=self.method, stage=stage, epochs=epochs,
                              iterations_per_epoch=t.iterations_per_epoch, val_iterations=t.val_iterations,
                              initial_lr=t.initial_lr, seed=exp.seed, batch_size=t.batch_size, on_epoch=on_epoch)
            trainer.initialize()
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

    def train(self, stage: Stage) -> None:
        run, t = self.run, self.exp.training
        if run.model(stage.index).is_file():
            self.load_method_state(stage.index)
            return
        epochs = max(1, round(t.epochs * stage.budget))
        with progress_bar(self.log.quiet) as bar:
            job = bar.add_task(f"Stage {stage.index} [{stage.label}] epochs", total=epochs, info="")

            def on_epoch(epoch, total, stats):
                bar.update(job, completed=epoch, info=f"loss {stats['train_loss']:.3f} "
                                                      f"pseudo-Dice {stats['pseudo_dice']:.3f}")
                self.log.path and RunLog(self.log.path, quiet=True)(
                    f"stage {stage.index} epoch {epoch}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))

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
        save_model(run.model(stage.index), trainer.network.state_dict(), self.method.state_dict(),
                   {"stage": stage.index, "trained_on": list(stage.train_tasks),
                    "tasks_seen": self.tasks_trained_by(stage.index),
                    "train_seconds": time.time() - started, "epochs": epochs,
                    "iterations_per_epoch": t.iterations_per_epoch, **peak_memory_mb(self.device)})
        final = Path(trainer.output_folder) / NNUNET_FINAL_CHECKPOINT
        final.unlink(missing_ok=True)  # model.pt holds the weights; the optimizer state is not needed any more
        self.log(f"Stage {stage.index} [{stage.label}] trained in {time.time() - started:.0f} s")

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, index: int, trained_on: str) -> None:
        """Predict every task's test cases with the stage's model and score them."""
        from .evaluation.metrics import nsd_tolerances, score_case
        from .nnunet.predictor import Segmenter, read_label
        from .nnunet.trainer import build_network
        out = self.run.stage_eval(index)
        if out.is_file():
            return
        net = build_network(self.plans, self.exp.configuration, self.dataset_json, deep_supervision=False)
        stored = load_model(self.run.model(index))
        if index > 0:
            self.method.load_state_dict(stored["method_state"])  # architecture choices the state records
        net = self.method.adapt_network(net, self.tasks_trained_by(index))
        net.load_state_dict(stored["network_weights"])
        dataset_json = known_labels_json(self.dataset_json, self.labels, self.tasks_trained_by(index))
        rows = []
        n_cases = sum(len(t.test_cases) for t in self.tasks)
        started = time.time()
        with progress_bar(self.log.quiet) as bar:
            job = bar.add_task(f"Evaluating stage {index}", total=n_cases, info="")
            for t in self.tasks:
                seg = Segmenter(self.method.network_for_task(net, t.name), self.workspace.plans(t),
                                self.exp.configuration, dataset_json,
                                self.device, self.exp.evaluation.mirroring, self.exp.evaluation.tile_step_size)
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
        self.run.write_stage_eval(index, df)
        mean = df[df.metric == "dice"].groupby("eval_task").value.mean()
        self.log(f"Stage {index} evaluated in {time.time() - started:.0f} s: "
                 + ", ".join(f"{self.by_name[k].short_name} Dice {v:.3f}" for k, v in mean.items()))


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory on CUDA) so far, in MiB."""
    import resource
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
