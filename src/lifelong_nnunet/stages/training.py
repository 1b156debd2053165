"""Training one stage: the stage-0 model, the stage's trainer with its `StageState`, and the stage's saved model.

Every stage starts from a stored model (the previous stage's, or the untrained stage-0 one), in the method's
architecture for the tasks before it; the method then adapts it for the stage's own tasks. A stage killed at any
point resumes from nnU-Net's per-epoch checkpoint, and a stage whose ``model.pt`` exists is done.
"""
from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from ..console import RunLog, progress_bar, silenced_stdout
from ..io_utils import atomic_write
from ..methods import Stage, StageState
from ..run_folder import NNUNET_FINAL_CHECKPOINT, load_model, save_model
from ..runner import known_labels_json
from ..tasks import Task, content_fingerprint
from ..seeding import seed_everything
from .context import RunContext
from .resources import Session, peak_memory_mb
from .sources import StageSources


class StageTraining:
    """Trains the stages of one run (see the module docstring)."""

    def __init__(self, ctx: RunContext, sources: StageSources | None = None) -> None:
        self.ctx = ctx
        self.sources = sources or StageSources.of(ctx)

    # ---- models --------------------------------------------------------------------------------------------
    def ensure_initial_model(self) -> None:
        """Stage 0: nnU-Net's He-initialised network, seeded. Every stage-1 (and `initial`) start is this model."""
        from ..nnunet.trainer import build_network
        ctx = self.ctx
        path = ctx.run.model(0)
        if path.is_file():
            return
        seed_everything(ctx.exp.seed)
        # the first task's outputs only: the untrained model must not depend on which tasks come later (their
        # labels would change how many random numbers the output layers draw), or `extend` could never equal a run
        # that knew the whole sequence from the start
        first_labels = known_labels_json(ctx.dataset_json, ctx.labels, [])
        net = build_network(ctx.plans, ctx.exp.configuration, first_labels, deep_supervision=True)
        save_model(path, ctx.method.adapt_network(net, []).state_dict(), {})

    def load_method_state(self, index: int) -> None:
        self.ctx.method.load_state_dict(load_model(self.ctx.run.model(index))["method_state"])

    # ---- the stage's trainer -------------------------------------------------------------------------------
    def stage_state(self, stage: Stage) -> StageState:
        """What the stage is about, fixed before its trainer exists (see `StageState`)."""
        ctx = self.ctx
        annotated = None
        if ctx.labels.is_class_incremental:  # channels annotated in this stage's data (background shift)
            annotated = (0, *sorted({c for name in stage.train_tasks for c in ctx.labels.global_classes(name)}))
        return StageState(stage, tuple(ctx.tasks_before(stage)), ctx.run.stage_dir(stage.index), annotated)

    def stage_env(self, stage: Stage):
        """nnU-Net's folders for this stage, and its augmentation workers (`nnunet.env.augmentation_workers`)."""
        from ..nnunet.env import augmentation_workers
        return self.ctx.workspace.env(results=self.ctx.run.nnunet_results(stage.index),
                                      nnUNet_n_proc_DA=augmentation_workers(self.ctx.device))

    def build_stage_trainer(self, stage: Stage, epochs: int, on_epoch=None, on_iteration=None, progress=None):
        """A trainer ready for the stage's first epoch: the method's network with the starting weights loaded
        and ``before_stage`` called; ``on_epoch`` and ``progress`` as in `ContinualTrainer.configure`. Call inside
        ``stage_env(stage)``."""
        from ..nnunet.trainer import build_trainer
        ctx = self.ctx
        exp, t = ctx.exp, ctx.exp.training
        first = ctx.by_name[stage.train_tasks[0]]
        init_from = ctx.run.model(stage.index - 1 if stage.init == "previous" else 0)
        state = self.stage_state(stage)
        with silenced_stdout():
            trainer = build_trainer(ctx.workspace.plans(first), exp.configuration, ctx.dataset_json, ctx.device,
                                    resume=True, results_dir=ctx.run.nnunet_results(stage.index))
            trainer.configure(sources=self.sources(stage), method=ctx.method, stage_state=state, epochs=epochs,
                              iterations_per_epoch=stage_iterations(stage, t), val_iterations=t.val_iterations,
                              initial_lr=t.initial_lr, seed=exp.seed, batch_size=t.batch_size, on_epoch=on_epoch,
                              on_iteration=on_iteration, progress=progress)
            trainer.initialize()
            # seeded before the method adapts the network: parts it adds (new output channels, heads) are then the
            # same whatever ran before in this process (an uninterrupted run, a resumed one, or `extend`)
            seed_everything(exp.seed, stage.index)
            before = list(state.tasks_before)
            trainer.set_network(ctx.method.adapt_network(trainer.network, before))
            trainer.network.load_state_dict(load_model(init_from)["network_weights"])
            trainer.set_network(ctx.method.adapt_network(trainer.network, [*before, *stage.train_tasks]))
            ctx.method.before_stage(trainer, stage)
        return trainer

    # ---- training ------------------------------------------------------------------------------------------
    def train(self, stage: Stage, origin: str = "run") -> None:
        """Train ``stage`` (or finish it after a kill) and save its model; ``origin`` ("run" or "extend") goes into
        the run's history."""
        ctx = self.ctx
        run, t = ctx.run, ctx.exp.training
        if run.model(stage.index).is_file():
            self.load_method_state(stage.index)
            return
        epochs, iterations = stage_epochs(stage, t), stage_iterations(stage, t)
        started_at = now()
        session = Session(run, stage.index, "train", ctx.device)
        with progress_bar(ctx.log.quiet) as bar:
            job = bar.add_task(f"Stage {stage.index} [{stage.label}] iterations", total=epochs * iterations,
                               info="")
            speed = IterationSpeed(epochs * iterations)

            def on_iteration(loss):
                speed.tick()
                bar.update(job, advance=1, info=f"{speed.seconds_per_iteration:.2f} s/it, loss {loss:.3f}")

            def on_epoch(epoch, total, stats):
                bar.update(job, completed=epoch * iterations, info=f"loss {stats['train_loss']:.3f} "
                                                                   f"pseudo-Dice {stats['pseudo_dice']:.3f}")
                ctx.log.path and RunLog(ctx.log.path, quiet=True)(
                    f"stage {stage.index} epoch {epoch}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))
                session.save()  # a kill loses at most the epoch in progress of this session's time
                warning = speed.slow_budget_warning(stage.index, (total - epoch) * iterations)
                if warning:
                    ctx.log(warning)

            def step_bar(description: str, total: int):
                """A method's long step (an importance pass, a distillation): one more bar on the stage's display."""
                step = bar.add_task(f"Stage {stage.index} {description}", total=total, info="")
                return lambda: bar.advance(step)

            with self.stage_env(stage):
                trainer = self.build_stage_trainer(stage, epochs, on_epoch, on_iteration, step_bar)
                resume_from = trainer.resume_checkpoint()
                if resume_from is not None:
                    trainer.load_checkpoint(str(resume_from))
                    bar.update(job, completed=trainer.current_epoch * iterations)
                    ctx.log(f"Stage {stage.index}: resuming from epoch {trainer.current_epoch}")
                started = speed.started = time.time()
                with silenced_stdout():
                    trainer.run_training()
                    ctx.method.after_stage(trainer, stage)
        if ctx.method.keeps_old_data:
            self.keep_for_replay(stage)
        if ctx.method.infers_task or ctx.method.describes_images:  # before model.pt: a complete stage is described
            from .description import describe_stage
            describe_stage(ctx, stage)
        session.save()
        from ..nnunet.env import augmentation_workers
        workers = int(augmentation_workers(ctx.device))  # bitwise reproducible for a given seed *and* worker count
        save_model(run.model(stage.index), trainer.network.state_dict(), ctx.method.state_dict(),
                   {"stage": stage.index, "trained_on": list(stage.train_tasks),
                    "tasks_seen": ctx.tasks_trained_by(stage.index),
                    "train_seconds": session.phase_seconds(), "epochs": epochs,
                    "iterations_per_epoch": iterations, "augmentation_workers": workers, "notes": ctx.method.notes(),
                    **peak_memory_mb(ctx.device)})
        run.record_history({"stage": stage.index, "origin": origin, "started": started_at, "finished": now(),
                            "datasets": [dataset_summary(ctx.by_name[n]) for n in stage.train_tasks],
                            "budget": {"epochs": epochs, "iterations_per_epoch": iterations,
                                       "augmentation_workers": workers}, "versions": versions()})
        final = Path(trainer.output_folder) / NNUNET_FINAL_CHECKPOINT
        final.unlink(missing_ok=True)  # model.pt holds the weights; the optimizer state is not needed any more
        ctx.log(f"Stage {stage.index} [{stage.label}] trained in {time.time() - started:.0f} s")


    def keep_for_replay(self, stage: Stage) -> None:
        """Copy the cases the method keeps of this stage's tasks into the run folder (its declared, bounded buffer),
        and drop the copies of cases that left the buffer, so replay never needs the cache or the raw data."""
        ctx = self.ctx
        for name in stage.train_tasks:
            buffer = ctx.method.keep_for_replay(name, self.sources.split_train_val(ctx.by_name[name])[0])
            for task, cases in buffer.items():
                folder = ctx.run.replay_dir(task)
                if task in stage.train_tasks:
                    source = ctx.workspace.preprocessed_folder(ctx.by_name[task])
                    for case in cases:
                        for f in preprocessed_files(source, case):
                            if not (folder / f.name).is_file():
                                atomic_write(folder / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp),
                                             suffix=f.suffix)
                for f in list(folder.iterdir()) if folder.is_dir() else []:
                    if case_of(f) not in cases:
                        f.unlink()


class IterationSpeed:
    """Seconds per training iteration as a stage trains (everything included: data loading, augmentation,
    validation), and the warning when its budget would take hours on this machine (a native-resolution plan on a
    CPU can need minutes per iteration)."""
    WARN_AFTER_HOURS = 3.0

    def __init__(self, total: int) -> None:
        self.total, self.count, self.warned = total, 0, False
        self.started = time.time()

    def tick(self) -> None:
        self.count += 1

    @property
    def seconds_per_iteration(self) -> float:
        return (time.time() - self.started) / max(1, self.count)

    def slow_budget_warning(self, stage: int, left_iterations: int) -> str | None:
        """Once, after the first epoch: a warning line when the rest of the stage would take hours, else None."""
        if self.warned:
            return None
        self.warned = True
        left = left_iterations * self.seconds_per_iteration
        if left <= self.WARN_AFTER_HOURS * 3600:
            return None
        return (f"Warning: stage {stage} trains at {self.seconds_per_iteration:.1f} s per iteration (measured over its "
                f"first epoch), so its remaining {left_iterations} iterations will take about {left / 3600:.1f} h on "
                f"this machine. For a quicker run: a smaller budget (--epochs/--iterations), or plans for this machine "
                f"(see 'Planning for a CPU' in docs/cli.md).")


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


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in ("lifelong-nnunet", "nnunetv2", "torch")}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
