"""The plugin interface every continual method implements.

The runner and the trainer only call these hooks; they never name a method. A new method is one file in this
package with a subclass of `Method` that sets `name` (discovered automatically, see `methods/__init__.py`).
Hooks follow the spirit of Avalanche's strategy plugins: the defaults do nothing, a method overrides what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from ..labels import LabelSpace
    from ..nnunet.trainer import ContinualTrainer


@dataclass(frozen=True)
class Stage:
    """One training stage of a run: which tasks' training data it sees and which weights it starts from.

    ``init`` is ``"previous"`` (the last stage's final weights) or ``"initial"`` (the untrained stage-0 weights).
    ``budget`` multiplies the spec's epochs, so a stage that stands for several tasks (joint) gets their compute.
    ``epochs`` / ``iterations_per_epoch``, when set, replace the spec's for this stage only (``extend --epochs``).
    """
    index: int  # 1-based; stage 0 is the untrained model
    train_tasks: tuple[str, ...]
    init: str = "previous"
    budget: float = 1.0
    epochs: int | None = None
    iterations_per_epoch: int | None = None

    @property
    def plan(self) -> tuple:
        """What the method's schedule decides (tasks, start, budget), without the per-stage budget overrides."""
        return self.index, tuple(self.train_tasks), self.init, self.budget

    @property
    def label(self) -> str:
        return "+".join(self.train_tasks)


class Method:
    """Base class: sequential fine-tuning semantics and no extra loss terms.

    Subclasses declare their parameters with defaults in ``params``; unknown parameters are user errors.
    """
    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    #: True when the method keeps (some) earlier-task training data; all others must never write image data.
    keeps_old_data: ClassVar[bool] = False
    #: True when ``after_stage`` computes the method's state from the stage's training data (importances, a
    #: calibration): a model imported with ``run --start-from`` was trained elsewhere, so the method cannot start
    #: from it without that data.
    learns_state_from_task_data: ClassVar[bool] = False
    #: Scenarios the method is defined for ("domain": same labels, new appearance; "class": new structures).
    scenarios: ClassVar[tuple[str, ...]] = ("domain", "class")
    #: The run's label space (set by the runner and by ``predict`` before any hook is called).
    labels: "LabelSpace | None" = None

    def __init__(self, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise UserInputError(f"method '{self.name}' has no parameter(s) {unknown}; its parameters are: "
                                 f"{allowed}. Fix method_params in the spec.")
        self.config: dict[str, Any] = {**self.params, **overrides}

    # ---- the stage plan ------------------------------------------------------------------------------------
    def schedule(self, tasks: list[str]) -> list[Stage]:
        """Default: one stage per task, each starting from the previous stage's weights."""
        return [Stage(i + 1, (t,), "previous") for i, t in enumerate(tasks)]

    # ---- hooks called by the trainer -----------------------------------------------------------------------
    def before_stage(self, trainer: "ContinualTrainer", stage: Stage) -> None:
        """After the network is built and initialised, before the first epoch (snapshot a teacher, ...)."""

    def loss_terms(self, trainer: "ContinualTrainer", data: torch.Tensor, target: Any,
                   output: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms added to nnU-Net's task loss in each training step (name -> scalar tensor)."""
        return {}

    def after_backward(self, trainer: "ContinualTrainer") -> None:
        """Gradients are available here, before clipping and the optimizer step."""

    def after_step(self, trainer: "ContinualTrainer") -> None:
        """After the optimizer step."""

    def after_stage(self, trainer: "ContinualTrainer", stage: Stage) -> None:
        """After the last epoch of a stage (importances, teacher snapshots for the next stage, ...)."""

    def replay_buffer(self, stage: Stage, earlier: dict[str, list[str]]) -> dict[str, list[str]]:
        """Earlier tasks' training cases (task -> case IDs) to mix into this stage; ``earlier`` lists all of them.

        Only methods with ``keeps_old_data = True`` may return anything (the runner enforces it)."""
        return {}

    def keep_for_replay(self, task: str, train_cases: list[str]) -> dict[str, list[str]]:
        """Called when a stage that trained ``task`` ends (only for ``keeps_old_data`` methods): the whole memory
        afterwards (task -> case IDs). The runner keeps copies of exactly these cases in the run folder, so later
        stages, and ``extend`` after the originals are deleted, replay without the raw data or the cache."""
        return {}

    def replay_share(self, stage: Stage) -> float:
        """Fraction of each training batch drawn from the replay buffer (when there is one)."""
        return 0.0

    # ---- architecture (multi-head, frozen parts) ------------------------------------------------------------
    def adapt_network(self, network: torch.nn.Module, tasks_so_far: list[str]) -> torch.nn.Module:
        """Extend or wrap nnU-Net's network (extra heads, frozen parts). Must be deterministic in its arguments (and
        the method's state): it rebuilds the same architecture for evaluation and ``predict`` from stored weights.

        Default: in the class scenario one output channel per structure known after ``tasks_so_far`` (the expanded
        segmentation head: new structures get new channels, old channels are kept); otherwise unchanged."""
        if self.labels is not None and self.labels.is_class_incremental:
            from ..networks.output_head import resize_output
            return resize_output(network, self.labels.num_outputs(tasks_so_far))
        return network

    def training_label_map(self, task: str) -> list[int] | None:
        """Lookup table applied to ``task``'s training targets (``table[local value]``), or None for none.

        Default: in the class scenario the task's local values become global label IDs, the channels of the
        expanded head; a method whose network predicts task-local classes (one decoder per task) returns None."""
        if self.labels is not None and self.labels.is_class_incremental:
            return self.labels.lut(task)
        return None

    def network_for_task(self, network: torch.nn.Module, task: str | None) -> torch.nn.Module:
        """The module that segments ``task`` (e.g. with that task's head). ``None``: the method chooses."""
        return network

    # ---- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the method must carry across a restart (tensors and plain Python data only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
