"""Riemannian Walk (Chaudhry et al. 2018), without its exemplar memory: EWC++ plus a path-integral score.

During training, every `update_interval`-th step: the online Fisher F <- alpha * g^2 + (1 - alpha) * F (EWC++) from
the task-loss gradient g (the penalty's analytic gradient is subtracted), and the path integral
s += -g * dtheta / (0.5 * F * dtheta^2 + eps) with dtheta that step's parameter change. After the stage: s is clipped
at 0 and divided by its maximum, averaged with the earlier tasks' score, F is divided by its maximum, and the next
stages are penalised with lambda * sum_i (F_i + s_i) (theta_i - theta*_i)^2. See docs/methods/rw.md.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Stage, TrainerView
from .importance import Quadratic, QuadraticMethod, Tensors, grown, snapshot, to_cpu, trainable_parameters
from .params import integer, number


def _max(tensors: Tensors) -> float:
    return max((float(t.max()) for t in tensors.values() if t.numel()), default=0.0)


class RWalk(QuadraticMethod):
    name = "rw"
    term = "rw"
    params = {
        # Lifelong nnU-Net (Gonzalez et al. 2023) default rw_lambda; importances are in [0, 2]. Checked on validation
        # data with `lifelong-nnunet tune` (synthetic-sites, 2d): the best final average of 0.4..400 (benchmarks.md)
        "lambda": number(0.4, min=0),
        # EWC++ moving-average weight (Chaudhry et al. 2018; also Lifelong nnU-Net's default)
        "alpha": number(0.9, min=0, max=1, min_open=True),
        # steps between Fisher / score updates (Lifelong nnU-Net's update_after default)
        "update_interval": integer(10, min=1),
        "eps": number(1e-8, min=0, min_open=True),  # damping of the score's denominator
    }

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.fisher: Tensors | None = None  # EWC++ running Fisher, carried across tasks
        self.score: Tensors | None = None   # normalised path-integral score, averaged over finished tasks
        self.path: Tensors | None = None    # raw path integral of the current task
        self.step = 0
        self._tracked: torch.nn.Module | None = None
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def coefficient(self) -> float:
        return float(self.config["lambda"])  # Chaudhry et al. 2018, eq. 9: lambda, no 1/2

    # ---- per-step tracking ----------------------------------------------------------------------------------
    def _track(self, network: torch.nn.Module) -> None:
        if self._tracked is network:
            return
        named = trainable_parameters(network)
        old_f, old_p = self.fisher or {}, self.path or {}
        # a grown segmentation head (class scenario): its new channels start with zero Fisher and path integral
        self.fisher = {n: (grown(old_f[n], p).to(p.device, torch.float32) if n in old_f else
                           torch.zeros_like(p, dtype=torch.float32)) for n, p in named}
        self.path = {n: (grown(old_p[n], p).to(p.device, torch.float32) if n in old_p else
                         torch.zeros_like(p, dtype=torch.float32)) for n, p in named}
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._fisher_list = [self.fisher[n] for n in self._names]
        self._path_list = [self.path[n] for n in self._names]
        self._tracked = network
        self._pending = None

    def before_stage(self, trainer: TrainerView, stage: Stage) -> None:
        super().before_stage(trainer, stage)
        self._tracked = None
        self._track(trainer.network)

    @torch.no_grad()
    def after_backward(self, trainer: TrainerView) -> None:
        network = trainer.network
        self._track(network)
        self.step += 1
        self._pending = None
        if self.step % int(self.config["update_interval"]):
            return
        grads = [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                 for p in self._params]
        penalty = self._penalty(network)
        if penalty is not None:  # keep the task-loss gradient only: subtract the penalty's analytic gradient
            pen = dict(zip(penalty.names, penalty.gradient()))
            grads = [g - pen[n] if n in pen else g for n, g in zip(self._names, grads)]
        else:
            grads = [g.clone() for g in grads]
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())):
            return  # an overflowing fp16 step (GradScaler skips it): no update
        alpha = float(self.config["alpha"])
        torch._foreach_mul_(self._fisher_list, 1.0 - alpha)
        torch._foreach_addcmul_(self._fisher_list, grads, grads, value=alpha)
        self._pending = (grads, [p.detach().float().clone() for p in self._params])

    @torch.no_grad()
    def after_step(self, trainer: TrainerView) -> None:
        if self._pending is None:
            return
        grads, before = self._pending
        self._pending = None
        delta = torch._foreach_sub([p.detach().float() for p in self._params], before)
        num = torch._foreach_mul(grads, delta)
        den = torch._foreach_mul(delta, delta)
        torch._foreach_mul_(den, self._fisher_list)
        torch._foreach_mul_(den, 0.5)
        torch._foreach_add_(den, float(self.config["eps"]))
        torch._foreach_div_(num, den)
        torch._foreach_sub_(self._path_list, num)

    # ---- end of a task --------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_stage(self, trainer: TrainerView, stage: Stage) -> None:
        self._track(trainer.network)
        s_task = {n: t.clamp(min=0) for n, t in self.path.items()}
        top = _max(s_task)
        if top > 0:
            s_task = {n: t / top for n, t in s_task.items()}
        if self.score is None:
            self.score = s_task
        else:
            self.score = {n: 0.5 * (grown(self.score[n], t).to(t.device) + t) if n in self.score else t
                          for n, t in s_task.items()}
        f_top = _max(self.fisher)
        f_norm = {n: (f / f_top if f_top > 0 else f.clone()) for n, f in self.fisher.items()}
        self.set_quadratic(Quadratic({n: f_norm[n] + self.score[n] for n in f_norm}, snapshot(trainer.network)))
        for t in self._path_list:
            t.zero_()
        self.tasks_seen += 1

    # ---- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fisher": to_cpu(self.fisher), "score": to_cpu(self.score),
                "path": to_cpu(self.path), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        super().load_state_dict(state)
        self.fisher = None if state["fisher"] is None else dict(state["fisher"])
        self.score = None if state["score"] is None else dict(state["score"])
        self.path = None if state["path"] is None else dict(state["path"])
        self.step = int(state["step"])
        self._tracked = None
        self._pending = None
