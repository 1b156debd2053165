"""Multi-head: a shared nnU-Net body and one output head per task (domain-specific heads, Li & Hoiem 2017 style).

Stage t trains the body and task t's head, which starts as a copy of head t-1; the other heads are untouched. A task
is segmented by its own head; a task not trained yet by the newest head; with no task given, `predict` infers the task
from the stages' image descriptions (`task_inference`), or with ``--task-choice entropy`` `choose_task` picks the head
that is least uncertain about the image. See docs/methods/multihead.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..networks.multihead import (
    SPLITS,
    AutoHeadNetwork,
    MultiHeadNetwork,
    choose_head,
    unwrap,
)
from ..task_inference import TaskChoice, entropy_choice
from .base import Method, Stage
from .params import one_of


class MultiHead(Method):
    name = "multihead"
    scenarios = ("domain",)  # one head per domain; for new structures use frozen_encoder_decoders
    params = {"split": one_of("seg_layers", SPLITS)}
    infers_task = True

    # ---- architecture ---------------------------------------------------------------------------------------
    def adapt_network(self, network: torch.nn.Module, tasks_so_far: list[str]) -> torch.nn.Module:
        """One head per task in ``tasks_so_far`` (no tasks: nnU-Net's plain network). Idempotent; a new head is a
        copy of the last one; a changed head set comes back as a new object so the trainer rebuilds its optimizer."""
        tasks = list(dict.fromkeys(tasks_so_far))
        network = unwrap(network)
        if isinstance(network, MultiHeadNetwork):
            if network.split != self.config["split"]:
                raise ValueError(f"network is split at {network.split!r}, the method at {self.config['split']!r}")
            return network.with_tasks(tasks)
        if not tasks:
            return network
        return MultiHeadNetwork(network, tasks, self.config["split"])

    def network_for_task(self, network: torch.nn.Module, task: str | None) -> torch.nn.Module:
        """Task ``task``'s head as a stock-shaped network; the newest head for a task not trained yet; for ``None``
        a module that picks the head by itself on each call (`AutoHeadNetwork`)."""
        network = unwrap(network)
        if not isinstance(network, MultiHeadNetwork):
            return network
        if task is None:
            return AutoHeadNetwork(network) if len(network.tasks) > 1 else network.single_head_view(network.tasks[0])
        return network.single_head_view(task if task in network.tasks else network.tasks[-1])

    def choose_task(self, network: torch.nn.Module, segment_with: Callable[[torch.nn.Module], object],
                    tasks: Sequence[str] | None = None) -> TaskChoice:
        """The entropy rule (the baseline of `task_inference`): the task whose head is least uncertain about one
        image, lowest mean normalised entropy of its softmax probabilities over the voxels any head labels foreground
        (`networks.multihead.mean_entropy`), with every candidate's entropy as its scores.

        ``segment_with(module)`` returns the class probabilities (channels first) that ``module`` gives for the
        image, e.g. through nnU-Net's sliding-window predictor. Only ``tasks`` (default: all heads) compete."""
        network = unwrap(network)
        if isinstance(network, AutoHeadNetwork):
            network = network.network
        if not isinstance(network, MultiHeadNetwork):
            task = list(tasks)[-1] if tasks else ""
            return entropy_choice(task, {task: float("nan")})
        return entropy_choice(*choose_head(network, segment_with, tasks))

    # ---- training -------------------------------------------------------------------------------------------
    def before_stage(self, trainer, stage: Stage) -> None:
        network = unwrap(trainer.network)
        if isinstance(network, MultiHeadNetwork):
            network.set_active(stage.train_tasks[0])


def selection_accuracy(chosen: Sequence[str], true: Sequence[str]) -> float:
    """Fraction of cases whose chosen head is their own task (``chosen[i]`` vs ``true[i]``)."""
    chosen, true = list(chosen), list(true)
    if len(chosen) != len(true):
        raise ValueError(f"{len(chosen)} choices for {len(true)} cases")
    if not chosen:
        raise ValueError("no cases")
    return sum(c == t for c, t in zip(chosen, true)) / len(chosen)
