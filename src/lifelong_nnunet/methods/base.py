"""The plugin interface every continual method implements, and the contract between method and trainer.

The runner and the trainer only call these hooks; they never name a method. A new method is one file in this
package with a subclass of `Method` that sets `name` (discovered automatically, see `methods/__init__.py`).
Hooks follow the spirit of Avalanche's strategy plugins: the defaults do nothing, a method overrides what it needs.

What a hook may use of the trainer it is given is `TrainerView`, nothing else (Avalanche's
``strategy_mixin_protocol``). What a stage is about (its tasks, the tasks before it, its folder, the classes its data
annotates) is one frozen `StageState`, read as ``trainer.stage_state`` (MONAI's ``engine.state``): nobody patches
attributes onto the trainer and no method probes for them. A method's parameters are declared once with their checks
(`methods.params`) and validated in `Method.__init__` only.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch

from ..errors import MethodParamError, PluginContractError
from .params import Param, closest

if TYPE_CHECKING:  # pragma: no cover
    from ..experiment import Scenario
    from ..labels import LabelSpace
    from ..task_inference import TaskChoice

#: Where a stage's weights come from: the previous stage's final model, or the untrained stage-0 model.
StageInit = Literal["previous", "initial"]
STAGE_INITS: tuple[str, ...] = get_args(StageInit)


@dataclass(frozen=True)
class Stage:
    """One training stage of a run: which tasks' training data it sees and which weights it starts from.

    ``init`` is ``"previous"`` (the last stage's final weights) or ``"initial"`` (the untrained stage-0 weights).
    ``budget`` multiplies the spec's epochs, so a stage that stands for several tasks (joint) gets their compute.
    ``epochs`` / ``iterations_per_epoch``, when set, replace the spec's for this stage only (``extend --epochs``).
    """
    index: int  # 1-based; stage 0 is the untrained model
    train_tasks: tuple[str, ...]
    init: StageInit = "previous"
    budget: float = 1.0
    epochs: int | None = None
    iterations_per_epoch: int | None = None

    @property
    def plan(self) -> tuple:
        """What the method's schedule decides (tasks, start, budget), without the per-stage budget overrides."""
        return self.index, tuple(self.train_tasks), self.init, self.budget

    def __post_init__(self) -> None:
        if self.init not in STAGE_INITS:
            raise PluginContractError(f"stage {self.index} has init {self.init!r}; a schedule's stages start from one "
                                      f"of {list(STAGE_INITS)}")

    @property
    def label(self) -> str:
        return "+".join(self.train_tasks)


@dataclass(frozen=True)
class StageState:
    """What one training stage is about, fixed before the trainer is built and the same for every hook of the stage.

    - ``stage``: the stage itself;
    - ``tasks_before``: the tasks trained into the weights the stage starts from (none for a stage that starts from
      the initial model), in training order;
    - ``stage_dir``: the stage's folder in the run; a method may write its own records there;
    - ``annotated_classes``: in the class scenario, the output channels (global label IDs, background 0 included)
      that this stage's training data annotates, so every other known class is hidden in its background (the
      background shift of MiB and PLOP). ``None`` in the domain scenario: every output channel is annotated.
    """
    stage: Stage
    tasks_before: tuple[str, ...] = ()
    stage_dir: Path | None = None
    annotated_classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StockNetwork:
    """One task's part of a method's network as nnU-Net's own network, for `export` (`Method.stock_network`).

    - ``weights``: a ``state_dict`` in the layout of the network nnU-Net builds from the run's plans (PlainConvUNet,
      with its duplicated ``decoder.encoder.*`` keys); `export` checks every key and shape against that network;
    - ``labels``: nnU-Net's ``labels`` entry for it (name -> output channel, which is the label value the exported
      model writes), background 0 included;
    - ``task``: the task whose structures it segments (the exported plans name it as their dataset).
    """
    weights: dict[str, torch.Tensor]
    labels: dict[str, int]
    task: str


@runtime_checkable
class TrainerView(Protocol):
    """Exactly what a method may read or call on the trainer its hooks receive (`nnunet.trainer.ContinualTrainer`
    implements it; tests use ``tests/fakes.FakeTrainer``). A method reads these, and may change the *module*
    ``network`` in place (freeze parts, initialise new channels); it never reassigns trainer attributes: a new
    architecture comes from `Method.adapt_network`, which the runner applies."""

    @property
    def network(self) -> torch.nn.Module:
        """The network being trained (the method's architecture, from `Method.adapt_network`)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def stage_state(self) -> StageState:
        """The stage being trained (see `StageState`)."""

    @property
    def loss(self) -> Callable[[Any, Any], torch.Tensor]:
        """nnU-Net's training loss (Dice + CE, deep supervision): ``loss(output, target)``."""

    def loss_ignoring(self, label: int) -> Callable[[Any, Any], torch.Tensor]:
        """``loss`` with ``label`` as its ignore label: target voxels of that value get neither loss nor gradient
        (nnU-Net leaves voxels out of its loss only this way). ``label`` must be the dataset's ignore label, or any
        value when the dataset has none."""

    @property
    def seed(self) -> int:
        """The run's seed (with `seeding.seed_everything`, for random draws a method makes itself)."""

    @property
    def initial_lr(self) -> float: ...

    @property
    def num_epochs(self) -> int:
        """Epochs of this stage."""

    @property
    def num_iterations_per_epoch(self) -> int: ...

    @property
    def patch_size(self) -> tuple[int, ...]:
        """nnU-Net's training patch size (voxels per spatial axis)."""

    @property
    def num_input_channels(self) -> int: ...

    @property
    def ignore_label(self) -> int | None:
        """nnU-Net's ignore label of the dataset, or None when it has none."""

    def training_batches(self, n: int) -> Iterator[dict]:
        """``n`` augmented training batches of this stage's data (``{"data", "target", "keys"}``), targets as in
        training (`Method.training_label_map` applied)."""

    def validation_batches(self, n: int) -> list[dict]:
        """``n`` un-augmented validation batches of this stage's data, targets as in training."""

    def print_to_log_file(self, *args: Any) -> None:
        """Append a line to the stage's nnU-Net training log."""

    def progress(self, description: str, total: int) -> Callable[[], None]:
        """A progress bar for a long step of the method's own (an importance pass, a student's distillation), shown
        on the run's display under the stage's epoch bar and silent when the run is quiet: ``total`` units, and the
        returned ``advance()`` is called once per unit done."""


class Method:
    """Base class: sequential fine-tuning semantics and no extra loss terms.

    Subclasses declare their parameters in ``params`` as `Param` objects (default and check, see `methods.params`);
    ``Method(**values)`` validates the given values against them, and ``self.config`` holds every parameter's value.
    ``labels`` (the run's label space) is given once, at construction, by whoever builds the method for a run.
    """
    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    #: True when the method keeps (some) earlier-task training data; all others must never write image data.
    keeps_old_data: ClassVar[bool] = False
    #: True when ``after_stage`` computes the method's state from the stage's training data (importances, a
    #: calibration): a model imported with ``run --start-from`` was trained elsewhere, so the method cannot start
    #: from it without that data.
    learns_state_from_task_data: ClassVar[bool] = False
    #: True when the method has per-task parts to choose between at prediction time (one head per task): each stage
    #: then stores a description of its images (`task_inference`), and `predict` without --task infers the task.
    infers_task: ClassVar[bool] = False
    #: True when each stage stores a description of its images (`task_inference`) that the method uses at prediction
    #: time without choosing one task: `gate_parts` then keeps an image's parts to the tasks whose images it fits.
    #: Methods with ``infers_task`` are described too.
    describes_images: ClassVar[bool] = False
    #: Scenarios the method is defined for ("domain": same labels, new appearance; "class": new structures).
    scenarios: ClassVar[tuple[Scenario, ...]] = ("domain", "class")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A malformed declaration is the method author's error, caught when the class is defined."""
        super().__init_subclass__(**kwargs)
        for key, param in cls.params.items():
            if key == "labels":
                raise PluginContractError(f"{cls.__qualname__}.params: 'labels' is the run's label space, given to "
                                          f"every method; name the parameter otherwise")
            if not isinstance(param, Param):
                raise PluginContractError(f"{cls.__qualname__}.params[{key!r}] is {param!r}, not a Param; declare "
                                          f"it with lifelong_nnunet.methods.params (number, integer, flag, one_of...)")
            if not param.accepts(param.default):
                raise PluginContractError(f"{cls.__qualname__}.params[{key!r}]: the default {param.default!r} is not "
                                          f"{param.allowed}")

    def __init__(self, *, labels: LabelSpace | None = None, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise MethodParamError(self.name, unknown[0], None, tuple(sorted(self.params)),
                                   closest(unknown[0], list(self.params)), unknown=True)
        for key, value in values.items():
            self.params[key].check(self.name, key, value)
        self.config: dict[str, Any] = {**self.defaults(), **values}
        self._labels = labels

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every parameter's default value (copies, so a method cannot change another's defaults)."""
        return {key: copy.deepcopy(param.default) for key, param in cls.params.items()}

    @property
    def labels(self) -> LabelSpace | None:
        """The run's label space (None only where no run is known, e.g. a method built to list its parameters)."""
        return self._labels

    # ---- the stage plan ------------------------------------------------------------------------------------
    def schedule(self, tasks: list[str]) -> list[Stage]:
        """Default: one stage per task, each starting from the previous stage's weights."""
        return [Stage(i + 1, (t,), "previous") for i, t in enumerate(tasks)]

    # ---- hooks called by the trainer -----------------------------------------------------------------------
    def before_stage(self, trainer: TrainerView, stage: Stage) -> None:
        """After the network is built and initialised, before the first epoch (snapshot a teacher, ...)."""

    def loss_terms(self, trainer: TrainerView, data: torch.Tensor, target: Any,
                   output: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms added to nnU-Net's task loss in each training step (name -> scalar tensor)."""
        return {}

    def after_backward(self, trainer: TrainerView) -> None:
        """Gradients are available here, before clipping and the optimizer step."""

    def after_step(self, trainer: TrainerView) -> None:
        """After the optimizer step."""

    def after_stage(self, trainer: TrainerView, stage: Stage) -> None:
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

    def notes(self) -> list[str]:
        """What the method could not do as configured, one sentence each, for the record and the report (e.g. a
        decoder kept at full size because no compressed student was good enough). Stored in every stage model's
        ``info``; the report lists them under "Notes". Default: none."""
        return []

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

    def stock_network(self, network: torch.nn.Module, task: str | None) -> StockNetwork | None:
        """For ``export``: ``task``'s part of ``network`` as nnU-Net's own network with its own labels, for a method
        whose network is not one (``task`` is a full task name, or ``None`` when the user named none). Raise
        `UserInputError` when that part cannot be a stock network faithfully; never return another network.

        Default ``None``: ``network_for_task(network, task)`` is nnU-Net's network as it is, exported with the
        run's labels (export refuses it when its weights do not fit nnU-Net's network)."""
        return None

    def choose_task(self, network: torch.nn.Module, segment_with: Callable[[torch.nn.Module], Any],
                    tasks: Sequence[str]) -> TaskChoice | None:
        """The method's own rule for ``predict --task-choice entropy`` (no ``--task``): the task whose part of
        ``network`` segments this image, with its scores, or ``None`` when one module serves every image
        (``network_for_task(network, None)``), which is the default. By default ``predict`` infers the task from
        the stages' image descriptions instead (`task_inference`, for methods with ``infers_task``).

        ``segment_with(module)`` returns the class probabilities ``module`` gives for the image (channels first,
        through nnU-Net's sliding-window predictor); ``tasks`` are the candidates (the tasks the model was trained
        on). ``predict`` records every choice in its per-case file (`PredictionFolder.task_choices`)."""
        return None

    def gate_parts(self, network: torch.nn.Module, fits: Mapping[str, bool]) -> list[str] | None:
        """Before each image, for a method with ``describes_images``: restrict ``network`` to the parts of the tasks
        whose stages' images this image fits (``fits``: task -> within that task's threshold, `deploy.part_gate`) and
        return the tasks kept, or ``None`` when the method does not gate (the default). Called with an empty
        mapping to lift the gate."""
        return None

    # ---- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the method must carry across a restart (tensors and plain Python data only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
