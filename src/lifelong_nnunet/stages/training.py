"""Training one stage: the stage-0 model, the stage's trainer with its `StageState`, and the stage's saved model.

Every stage starts from a stored model (the previous stage's, or the untrained stage-0 one), in the method's
architecture for the tasks before it; the method then adapts it for the stage's own tasks. A stage killed at any
point resumes from nnU-Net's per-epoch checkpoint, and a stage whose ``model.pt`` exists is done.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..console import RunLog, progress_bar, silenced_stdout
from ..methods import Stage, StageState
from ..run_folder import NNUNET_FINAL_CHECKPOINT, load_model, save_model
from ..seeding import seed_everything
from .context import RunContext
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
        net = build_network(ctx.plans, ctx.exp.configuration, ctx.dataset_json, deep_supervision=True)
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
        """nnU-Net's folders for this stage; augmentation in the main process unless the user set workers
        (as fast as worker processes on 2 cores, measured, and seedable)."""
        return self.ctx.workspace.env(results=self.ctx.run.nnunet_results(stage.index),
                                      nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "0"))

    def build_stage_trainer(self, stage: Stage, epochs: int, on_epoch=None):
        """A trainer ready for the stage's first epoch: the method's network with the starting weights loaded
        and ``before_stage`` called. Call inside ``stage_env(stage)``."""
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
                              iterations_per_epoch=t.iterations_per_epoch, val_iterations=t.val_iterations,
                              initial_lr=t.initial_lr, seed=exp.seed, batch_size=t.batch_size, on_epoch=on_epoch)
            trainer.initialize()
            before = list(state.tasks_before)
            trainer.set_network(ctx.method.adapt_network(trainer.network, before))
            trainer.network.load_state_dict(load_model(init_from)["network_weights"])
            trainer.set_network(ctx.method.adapt_network(trainer.network, [*before, *stage.train_tasks]))
            ctx.method.before_stage(trainer, stage)
        return trainer

    # ---- training ------------------------------------------------------------------------------------------
    def train(self, stage: Stage) -> None:
        ctx = self.ctx
        run, t = ctx.run, ctx.exp.training
        if run.model(stage.index).is_file():
            self.load_method_state(stage.index)
            return
        epochs = max(1, round(t.epochs * stage.budget))
        with progress_bar(ctx.log.quiet) as bar:
            job = bar.add_task(f"Stage {stage.index} [{stage.label}] epochs", total=epochs, info="")

            def on_epoch(epoch, total, stats):
                bar.update(job, completed=epoch, info=f"loss {stats['train_loss']:.3f} "
                                                      f"pseudo-Dice {stats['pseudo_dice']:.3f}")
                ctx.log.path and RunLog(ctx.log.path, quiet=True)(
                    f"stage {stage.index} epoch {epoch}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in stats.items()))

            with self.stage_env(stage):
                trainer = self.build_stage_trainer(stage, epochs, on_epoch)
                resume_from = trainer.resume_checkpoint()
                if resume_from is not None:
                    trainer.load_checkpoint(str(resume_from))
                    bar.update(job, completed=trainer.current_epoch)
                    ctx.log(f"Stage {stage.index}: resuming from epoch {trainer.current_epoch}")
                started = time.time()
                with silenced_stdout():
                    trainer.run_training()
                    ctx.method.after_stage(trainer, stage)
        save_model(run.model(stage.index), trainer.network.state_dict(), ctx.method.state_dict(),
                   {"stage": stage.index, "trained_on": list(stage.train_tasks),
                    "tasks_seen": ctx.tasks_trained_by(stage.index),
                    "train_seconds": time.time() - started, "epochs": epochs,
                    "iterations_per_epoch": t.iterations_per_epoch, **peak_memory_mb(ctx.device)})
        final = Path(trainer.output_folder) / NNUNET_FINAL_CHECKPOINT
        final.unlink(missing_ok=True)  # model.pt holds the weights; the optimizer state is not needed any more
        ctx.log(f"Stage {stage.index} [{stage.label}] trained in {time.time() - started:.0f} s")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak GPU memory on CUDA) so far, in MiB."""
    import resource
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
