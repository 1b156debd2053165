"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), optionally online (Schwarz et al. 2018).

Penalty on stage t: lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 over every earlier task k (or, online,
lambda/2 * sum_i F*_i (theta_i - theta*_t-1,i)^2 with F* <- gamma F* + F_new). F is the empirical Fisher: the mean
over `fisher_batches` augmented training batches (every sample separately) of squared gradients of nnU-Net's own
Dice+CE deep-supervision loss, computed in `after_stage`. See docs/methods/ewc.md.
"""
from __future__ import annotations


from .base import Stage, TrainerView
from .importance import Quadratic, QuadraticMethod, gradient_importance, snapshot
from .params import flag, integer, number


class EWC(QuadraticMethod):
    name = "ewc"
    term = "ewc"
    params = {
        # Penalty strength. Our Fisher is a per-sample (mean-loss) Fisher, so lambda plays the role of the number of
        # training samples in the Laplace approximation; 1e3 is also the middle of the range used with CE losses
        # (1e2..1e4) and keeps lr * lambda * max(F) well inside SGD's stable range. See docs/methods/ewc.md. Checked on
        # validation data with `lifelong-nnunet tune` (synthetic-sites, 2d): the best final average of 1e3..1e5,
        # cutting forgetting by 50% (docs/benchmarks.md, "Defaults chosen with tune").
        "lambda": number(1000.0, min=0),
        # Batches for the Fisher (x batch size samples). nnU-Net v1's Lifelong nnU-Net used one batch; 20 batches
        # (40 patches at nnU-Net's usual batch size 2) cover many cases and foreground-oversampled patches.
        "fisher_batches": integer(20, min=1),
        # Online EWC (Schwarz et al. 2018): one running Fisher with decay gamma, anchored at the latest weights.
        "online": flag(False),
        # Schwarz et al. 2018 use gamma <= 1; 1.0 keeps every earlier task at full weight
        "gamma": number(1.0, min=0, max=1),
    }

    def coefficient(self) -> float:
        return float(self.config["lambda"]) / 2.0

    def fisher(self, trainer: TrainerView) -> dict:
        """Empirical Fisher of the finished task: mean squared per-sample gradient of trainer.loss."""
        return gradient_importance(trainer, self.config["fisher_batches"], trainer.loss, transform="square",
                                   description="EWC Fisher")

    def after_stage(self, trainer: TrainerView, stage: Stage) -> None:
        fisher, anchor = self.fisher(trainer), snapshot(trainer.network)
        if self.quadratic is None:
            quadratic = Quadratic(fisher, anchor, 0.0)
        elif self.config["online"]:
            quadratic = self.quadratic.decayed_with_new_anchor(float(self.config["gamma"]), fisher, anchor)
        else:
            quadratic = self.quadratic.add(fisher, anchor)
        self.set_quadratic(quadratic)
        self.tasks_seen += 1
