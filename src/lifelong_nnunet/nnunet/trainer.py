"""`ContinualTrainer`: nnU-Net's own trainer (loss, deep supervision, augmentation, poly LR) with plugin hooks.

What it changes and why:
- training/validation data come from explicit (preprocessed folder, case list) sources, so a stage can train on
  one task, several tasks (joint) or a task plus a replay buffer, and test cases are never seen;
- the training step adds the method's loss terms and calls its hooks; the method is never named here;
- checkpoints are written atomically every epoch, hold only tensors and plain data (loadable with
  ``weights_only=True``), and carry the method's state, so a killed stage resumes where it stopped;
- every epoch is seeded from (seed, stage, epoch), so a resumed stage draws the same random numbers; with
  augmentation workers (``nnUNet_n_proc_DA`` > 0) every batch is drawn in a worker seeded from
  (seed, stage, epoch, batch) and the workers' batches are taken in a fixed order (`SeededBatches`);
- nnU-Net's console printing is replaced by a progress callback.

It implements `methods.base.TrainerView`, which is all a method's hooks may use of it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetBaseDataset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from ..console import no_progress
from ..io_utils import atomic_write
from ..methods.base import Method, Stage, StageState
from ..seeding import seed_everything
from .env import nnunet_env
from .loss import loss_with_ignore_label
from .network import set_deep_supervision

LATEST = "checkpoint_latest.pth"


@dataclass
class DataSource:
    """Preprocessed cases of one task: ``folder`` is nnU-Net's data_identifier folder of that task."""
    task: str
    folder: Path
    train_keys: list[str]
    val_keys: list[str]
    weight: float = 1.0  # share of training batches drawn from this source


class MultiSourceDataset(nnUNetBaseDataset):
    """Several preprocessed folders seen as one nnU-Net dataset; identifiers are ``task/case``.

    nnU-Net's loader draws identifiers uniformly with replacement, so a source's share of the batches is set by
    repeating its identifiers (resolution 1/``REPEAT_RESOLUTION``). This works with augmentation workers too.
    """
    REPEAT_RESOLUTION = 1000

    def __init__(self, parts: dict[str, tuple[type, Path, list[str]]], weights: dict[str, float] | None = None):
        self._parts = {task: cls(str(folder), list(keys)) for task, (cls, folder, keys) in parts.items() if keys}
        identifiers = []
        for task, ds in self._parts.items():
            repeat = 1
            if weights:
                per_case = weights[task] / sum(weights[t] for t in self._parts) / len(ds.identifiers)
                repeat = max(1, round(per_case * self.REPEAT_RESOLUTION))
            identifiers += [f"{task}/{k}" for k in ds.identifiers for _ in range(repeat)]
        super().__init__(folder="", identifiers=identifiers)

    def load_case(self, identifier: str):
        task, key = identifier.split("/", 1)
        return self._parts[task].load_case(key)

    @staticmethod
    def save_case(*args, **kwargs):  # pragma: no cover - training never writes cases
        raise NotImplementedError

    @staticmethod
    def get_identifiers(folder: str) -> list[str]:  # pragma: no cover
        raise NotImplementedError


class SeededBatches:
    """nnU-Net's data loader for augmentation workers, each batch drawn from generators seeded by its place in the
    stage: (seed, stage, stream, epoch, batch within the epoch).

    nnU-Net hands its loader to ``NonDetMultiThreadedAugmenter`` with ``seeds=None``: every worker starts from OS
    entropy and the main process takes whichever batch is ready first, so no two runs see the same batches.
    Here batchgenerators' ordered ``MultiThreadedAugmenter`` takes the workers' batches round-robin, so worker
    ``t`` of ``n`` produces the stage's batches ``start + t``, ``start + t + n``, ... and reseeds Python's, numpy's
    and torch's generators before each one. A batch then depends only on its index, not on which worker drew it
    or on what that worker drew before: two runs with the same seed see the same batches, a resumed stage
    (``start`` = its first epoch x batches per epoch) continues the stream of the uninterrupted one, and 1 and 2
    workers give the same stream. Seeding per batch costs microseconds against a batch's augmentation (tenths of
    a second). ``stream`` keeps the training and validation batches apart.
    """

    def __init__(self, loader, key: tuple[int, ...], per_epoch: int, start: int, workers: int):
        self.loader, self.key, self.per_epoch, self.start, self.workers = loader, key, per_epoch, start, workers
        self.thread, self.drawn = 0, 0

    def set_thread_id(self, thread_id: int) -> None:
        """Called once in each worker process, before its first batch (batchgenerators' producer)."""
        self.loader.set_thread_id(thread_id)
        self.thread, self.drawn = thread_id, 0
        torch.set_num_threads(1)  # as nnU-Net's own workers: one thread each, the cores are shared among them

    def __iter__(self):
        return self

    def __next__(self):
        index = self.start + self.thread + self.drawn * self.workers
        self.drawn += 1
        seed_everything(*self.key, index // self.per_epoch, index % self.per_epoch)
        return next(self.loader)


class ContinualTrainer(nnUNetTrainer):
    """nnUNetTrainer with continual-learning hooks. Call `configure` before `initialize`."""

    def configure(self, *, sources: list[DataSource], method: Method, stage_state: StageState, epochs: int,
                  iterations_per_epoch: int, val_iterations: int, initial_lr: float, seed: int,
                  batch_size: int | None = None,
                  on_epoch: Callable[[int, int, dict], None] | None = None,
                  on_iteration: Callable[[float], None] | None = None,
                  progress: Callable[[str, int], Callable[[], None]] | None = None) -> None:
        """``on_epoch(epoch, total, stats)`` after each epoch, ``on_iteration(loss)`` after each training step;
        ``progress(description, total)`` opens a progress bar for a method's long step and returns its
        ``advance()`` (see `TrainerView.progress`; none: no bar)."""
        self.sources = sources
        self.method = method
        self._stage_state = stage_state
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations_per_epoch
        self.num_val_iterations_per_epoch = val_iterations
        self.initial_lr = initial_lr
        self.seed = seed
        self.on_epoch = on_epoch
        self.on_iteration = on_iteration  # called after every training step with its loss (progress per iteration)
        self._progress = progress
        self._losses_ignoring: dict[int, Any] = {}  # `loss_ignoring`'s copies of self.loss, per ignore label
        self.save_every = 1
        # class scenario: per task, local label value -> training target (global ID); see `map_targets`
        self.target_luts = {s.task: torch.tensor(lut) for s in sources
                            if (lut := method.training_label_map(s.task)) is not None}
        if batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = batch_size

    # ---- what the methods read (TrainerView) ----------------------------------------------------------------
    @property
    def stage_state(self) -> StageState:
        """The stage being trained; read-only (set once by `configure`)."""
        return self._stage_state

    @property
    def stage(self) -> Stage:
        """The stage being trained (the trainer's own shorthand, e.g. for seeding each epoch)."""
        return self._stage_state.stage

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.configuration_manager.patch_size)

    @property
    def ignore_label(self) -> int | None:
        return self.label_manager.ignore_label

    def loss_ignoring(self, label: int) -> Callable[[Any, Any], torch.Tensor]:
        """nnU-Net's own training loss (``self.loss``, built by ``initialize``) with ``label`` as its ignore label
        (`nnunet.loss`); built once per label and stage."""
        if label not in self._losses_ignoring:
            self._losses_ignoring[label] = loss_with_ignore_label(self.loss, label)
        return self._losses_ignoring[label]

    def progress(self, description: str, total: int) -> Callable[[], None]:
        return (self._progress or no_progress)(description, total)

    # ---- data ----------------------------------------------------------------------------------------------
    def get_dataloaders(self):
        """nnU-Net's loaders; with augmentation workers, run by batchgenerators' ordered augmenter on
        `SeededBatches` instead of nnU-Net's unseeded one (same worker counts: ``nnUNet_n_proc_DA`` for training,
        half of it, at least 1, for validation; pinned memory on CUDA).

        nnU-Net builds its loaders (transforms, patch sizes, oversampling) inside ``get_dataloaders``; it is asked
        for in-process ones here, so none of that is copied, and their loaders are handed to the workers. That
        costs the one training and one validation batch nnU-Net draws to start its augmenters, once per stage."""
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            return super().get_dataloaders()
        with nnunet_env(nnUNet_n_proc_DA="0"):
            in_process_train, in_process_val = super().get_dataloaders()
        val_workers = max(1, workers // 2)
        pin = self.device.type == "cuda"
        train = MultiThreadedAugmenter(
            SeededBatches(in_process_train.data_loader, (self.seed, self.stage.index, 0),
                          self.num_iterations_per_epoch, self.current_epoch * self.num_iterations_per_epoch, workers),
            None, workers, num_cached_per_queue=max(2, -(-6 // workers)), pin_memory=pin, wait_time=0.002)
        val = MultiThreadedAugmenter(
            SeededBatches(in_process_val.data_loader, (self.seed, self.stage.index, 1),
                          self.num_val_iterations_per_epoch,
                          self.current_epoch * self.num_val_iterations_per_epoch, val_workers),
            None, val_workers, num_cached_per_queue=max(2, -(-3 // val_workers)), pin_memory=pin, wait_time=0.002)
        return train, val

    def _ensure_loaders(self) -> None:
        """Loaders for `training_batches` and `validation_batches`: the training loop's while they run (in-process
        ones serve batches at any time, worker ones until `on_train_end` stops them), else new in-process ones.
        Batches outside the training loop (importances after a stage, ...) are few, and a generator that nobody
        finishes would leave its worker processes behind; in this process they draw from its seeded generators."""
        loader = self.dataloader_train
        usable = loader.was_initialized if isinstance(loader, MultiThreadedAugmenter) else \
            loader is not None and hasattr(loader, "data_loader")
        if not usable:
            with nnunet_env(nnUNet_n_proc_DA="0"):
                self.dataloader_train, self.dataloader_val = self.get_dataloaders()

    def get_tr_and_val_datasets(self):
        cls = infer_dataset_class(str(self.sources[0].folder))
        train = MultiSourceDataset({s.task: (cls, s.folder, s.train_keys) for s in self.sources},
                                   {s.task: s.weight for s in self.sources})
        val = MultiSourceDataset({s.task: (cls, s.folder, s.val_keys) for s in self.sources})
        return train, val

    # ---- the training step with the method's hooks ---------------------------------------------------------
    def on_epoch_start(self):
        # nnU-Net's case sampling and augmentation draw from the global numpy/torch generators of the process that
        # augments: this one with 0 workers; with workers, each batch is seeded in its worker (`SeededBatches`)
        seed_everything(self.seed, self.stage.index, self.current_epoch)
        super().on_epoch_start()

    # ---- network changes by the method (extra heads, frozen parts) -----------------------------------------
    def set_network(self, network: torch.nn.Module) -> None:
        """Swap in the method's network and rebuild nnU-Net's optimizer and LR schedule for it. Frozen parameters
        (requires_grad False) never get a gradient, so SGD leaves them bitwise unchanged."""
        if network is self.network:
            return
        self.network = network.to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def set_deep_supervision_enabled(self, enabled: bool):
        set_deep_supervision(self.network, enabled)  # also reaches decoders inside multi-head wrappers

    def training_batches(self, n: int):
        """``n`` augmented training batches of this stage's sources (for importance estimates after training),
        targets mapped like in training (class scenario: global IDs, the channels the loss compares with)."""
        self._ensure_loaders()
        for _ in range(n):
            yield self.map_targets(next(self.dataloader_train))

    def map_targets(self, batch: dict) -> dict:
        return map_targets(batch, self.target_luts)

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self.map_targets(batch))

    def validation_batches(self, n: int) -> list[dict]:
        """``n`` (un-augmented) validation batches of this stage's sources, targets mapped like in training."""
        self._ensure_loaders()
        return [self.map_targets(next(self.dataloader_val)) for _ in range(n)]

    def train_step(self, batch: dict) -> dict:
        batch = self.map_targets(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            task_loss = self.loss(output, target)
            extra = self.method.loss_terms(self, data, target, output)
            loss = task_loss + sum(extra.values()) if extra else task_loss
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.method.after_backward(self)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.method.after_step(self)
        out = {"loss": loss.detach().cpu().numpy(), "task_loss": task_loss.detach().cpu().numpy()}
        out.update({k: v.detach().cpu().numpy() for k, v in extra.items()})
        if self.on_iteration is not None:
            self.on_iteration(float(out["loss"]))
        return out

    def on_validation_epoch_end(self, val_outputs):
        # a class no validation patch contains and none is predicted as gives 0/0: nnU-Net then records NaN (its
        # nanmean ignores it); the division warning is noise in the class scenario
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return super().on_validation_epoch_end(val_outputs)

    def on_epoch_end(self):
        epoch = self.current_epoch
        if epoch + 1 < self.num_epochs:  # nnU-Net redraws progress.png every epoch; once per stage is enough
            self.logger.plot_progress_png = lambda *args, **kw: None
        try:
            super().on_epoch_end()
        finally:
            self.logger.__dict__.pop("plot_progress_png", None)
        if self.on_epoch is not None:
            log = self.logger.local_logger.my_fantastic_logging
            self.on_epoch(epoch + 1, self.num_epochs, {"train_loss": float(log["train_losses"][-1]),
                                                       "val_loss": float(log["val_losses"][-1]),
                                                       "pseudo_dice": float(log["mean_fg_dice"][-1])})

    # ---- checkpoints: atomic, weights_only-loadable, with the method's state ---------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if Path(filename).name == "checkpoint_best.pth":
            return  # continual evaluation uses the final model of each stage; 'best' would only cost I/O
        checkpoint = {
            "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": _plain(self.logger.get_checkpoint()),
            "_best_ema": None if self._best_ema is None else float(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "method_state": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }
        atomic_write(filename, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        if not self.was_initialized:
            self.initialize()
        ckpt = filename_or_checkpoint
        if not isinstance(ckpt, dict):
            ckpt = torch.load(ckpt, map_location=self.device, weights_only=True)
        self.network.load_state_dict(ckpt["network_weights"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.current_epoch = ckpt["current_epoch"]
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt["_best_ema"]
        self.method.load_state_dict(ckpt["method_state"])

    def resume_checkpoint(self) -> Path | None:
        """The newest checkpoint of an interrupted stage: the latest epoch, or the final one when only
        after-stage work (importances, ...) was cut off."""
        for name in (LATEST, "checkpoint_final.pth"):
            if (Path(self.output_folder) / name).is_file():
                return Path(self.output_folder) / name
        return None

    # ---- quiet ---------------------------------------------------------------------------------------------
    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    def plot_network_architecture(self):
        pass  # needs hiddenlayer and prints warnings without it

    def _save_debug_information(self):
        pass  # nnU-Net dumps every attribute as strings, including our method objects


def map_targets(batch: dict, target_luts: dict[str, torch.Tensor]) -> dict:
    """Targets of each sample through its task's lookup table (identifiers are ``task/case``), so a batch of one
    task's local labels trains the channels of their global IDs. Negative values (nnU-Net's padding) stay; a task
    without a table (and every task, when there are none) keeps its values."""
    if not target_luts:
        return batch
    tasks = [k.split("/", 1)[0] for k in batch["keys"]]
    width = max(len(t) for t in target_luts.values())
    table = torch.stack([torch.nn.functional.pad(target_luts[t], (0, width - len(target_luts[t])))
                         if t in target_luts else torch.arange(width) for t in tasks])

    def apply(target: torch.Tensor) -> torch.Tensor:
        values = target.long()
        index = values.clamp(0, width - 1).reshape(len(tasks), -1)
        mapped = torch.gather(table, 1, index).reshape(values.shape)
        return torch.where(values < 0, values, mapped).to(target.dtype)

    target = batch["target"]
    return {**batch, "target": [apply(t) for t in target] if isinstance(target, list) else apply(target)}


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, so the checkpoint loads with weights_only=True."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def build_trainer(plans: dict, configuration: str, dataset_json: dict, device: torch.device, resume: bool,
                  results_dir: Path) -> ContinualTrainer:
    """Construct the trainer class directly (nnU-Net's lookup by name imports torchvision and breaks on CPU)."""
    plans = dict(plans, continue_training=resume)
    with nnunet_env(results=results_dir):
        trainer = ContinualTrainer(plans, configuration, 0, dataset_json, device)
    return trainer


def build_network(plans: dict, configuration: str, dataset_json: dict, deep_supervision: bool = False):
    """The network nnU-Net would build for these plans (He-initialised), without a trainer."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, deep_supervision)


def read_preprocessed_image(folder: Path, case: str) -> np.ndarray:
    """One case's preprocessed image (channels first) from nnU-Net's preprocessed ``folder``, in whatever format
    nnU-Net wrote it; the same array `predictor.Segmenter.preprocess` makes of a raw image."""
    dataset = infer_dataset_class(str(folder))(str(folder), [case])
    data = dataset.load_case(case)[0]
    return np.asarray(data[:], dtype=np.float32)
