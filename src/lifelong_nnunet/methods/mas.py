"""Memory Aware Synapses (Aljundi et al. 2018): label-free importance from the sensitivity of the output.

Omega_i = mean over samples of |d mean_v ||f(x)_v||^2 / d theta_i| (highest-resolution logits, squared L2 norm
averaged over voxels and channels), accumulated over tasks (Omega <- Omega + Omega_new) and anchored at the latest
weights; penalty lambda * sum_i Omega_i (theta_i - theta*_i)^2. See docs/methods/mas.md.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Stage, TrainerView
from .importance import Quadratic, QuadraticMethod, gradient_importance, highest_resolution, snapshot
from .params import integer, number


def output_sensitivity_objective(output: Any, target: Any) -> torch.Tensor:
    """MAS's objective: the squared L2 norm of the highest-resolution logits, averaged over voxels and channels
    (so Omega does not scale with the patch size). Labels are ignored."""
    return highest_resolution(output).float().square().mean()


class MAS(QuadraticMethod):
    name = "mas"
    term = "mas"
    params = {
        "lambda": number(1.0, min=0),              # Aljundi et al. 2018 use lambda = 1 in their experiments
        "importance_batches": integer(20, min=1),  # as ewc's fisher_batches: many batches, never one
    }

    def coefficient(self) -> float:
        return float(self.config["lambda"])  # MAS's penalty has no 1/2 (Aljundi et al. 2018, eq. 10)

    def importance(self, trainer: TrainerView) -> dict:
        return gradient_importance(trainer, self.config["importance_batches"], output_sensitivity_objective,
                                   transform="abs", description="MAS importance")

    def after_stage(self, trainer: TrainerView, stage: Stage) -> None:
        omega, anchor = self.importance(trainer), snapshot(trainer.network)
        quadratic = Quadratic(omega, anchor, 0.0) if self.quadratic is None \
            else self.quadratic.decayed_with_new_anchor(1.0, omega, anchor)
        self.set_quadratic(quadratic)
        self.tasks_seen += 1
