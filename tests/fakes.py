"""The one test double of the trainer a method sees: `FakeTrainer` implements `methods.base.TrainerView` and nothing
more, so a method that reaches for anything else fails in the tests as it would be refused by the contract."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lifelong_nnunet.methods import Stage, StageState
from lifelong_nnunet.nnunet.loss import loss_with_ignore_label


class FakeTrainer:
    """A `TrainerView` around a real (tiny) network.

    ``batches``: what `training_batches` and `validation_batches` cycle through (``drawn`` counts the training
    batches handed out). ``bars`` records each `progress` bar a method opened: its units done and its total.
    The stage state is a plain attribute here, so a test can swap in another state with
    ``dataclasses.replace``; the real trainer's is read-only.
    """

    def __init__(self, network: torch.nn.Module, *, stage: Stage | None = None, tasks_before: Sequence[str] = (),
                 annotated_classes: Sequence[int] | None = None, stage_dir: Path | None = None,
                 loss: Callable[[Any, Any], torch.Tensor] | None = None, batches: Sequence[dict] = (),
                 device: torch.device = torch.device("cpu"), seed: int = 0, initial_lr: float = 1e-2,
                 num_epochs: int = 1, num_iterations_per_epoch: int = 1, patch_size: Sequence[int] = (8, 8, 8),
                 num_input_channels: int = 1, ignore_label: int | None = None) -> None:
        self.network = network
        self.device = device
        self.stage_state = StageState(stage or Stage(1, ("task1",)), tuple(tasks_before), stage_dir,
                                      None if annotated_classes is None else tuple(annotated_classes))
        self.loss = loss
        self.seed = seed
        self.initial_lr = initial_lr
        self.num_epochs = num_epochs
        self.num_iterations_per_epoch = num_iterations_per_epoch
        self.patch_size = tuple(patch_size)
        self.num_input_channels = num_input_channels
        self.ignore_label = ignore_label
        self.batches = list(batches)
        self.drawn = 0
        self.logged: list[str] = []
        self.bars: dict[str, list[int]] = {}  # description -> [units done, total] of each `progress` bar

    def loss_ignoring(self, label: int) -> Callable[[Any, Any], torch.Tensor]:
        """As the real trainer: ``loss`` (then nnU-Net's own loss object) with another ignore label."""
        return loss_with_ignore_label(self.loss, label)

    def training_batches(self, n: int) -> Iterator[dict]:
        for i in range(n):
            self.drawn += 1
            yield self.batches[i % len(self.batches)]

    def validation_batches(self, n: int) -> list[dict]:
        return [self.batches[i % len(self.batches)] for i in range(n)]

    def print_to_log_file(self, *args: Any) -> None:
        self.logged.append(" ".join(map(str, args)))

    def progress(self, description: str, total: int) -> Callable[[], None]:
        bar = self.bars.setdefault(description, [0, total])

        def advance() -> None:
            bar[0] += 1
        return advance
