"""Shared machinery of the quadratic-penalty methods (`ewc`, `mas`, `rw`).

All three add a penalty of the form ``c * sum_i W_i (theta_i - a_i)^2`` to nnU-Net's loss, where ``W`` is a
per-parameter importance and ``a`` an anchor (earlier weights). What differs is how ``W`` is estimated. This module
holds what they share:

- parameter bookkeeping keyed by ``named_parameters()`` names (deduplicated: nnU-Net's decoder holds a reference to
  the encoder, so ``state_dict()`` repeats the encoder's weights, ``named_parameters()`` does not); a stored tensor
  of a segmentation head that grew since (class scenario) is zero-padded to the new shape (`grown`);
- `gradient_importance`: the mean, over several augmented training batches, of a transform (square or absolute
  value) of per-sample gradients of an objective (EWC's task loss, MAS's output norm);
- `Quadratic`: a sum of per-task quadratics stored as one (weight, anchor, constant) triple, exactly:
  ``sum_k F_k (theta - a_k)^2 = W (theta - m)^2 + c`` with ``W = sum_k F_k``, ``m = sum_k F_k a_k / W`` and
  ``c = sum_k F_k (a_k - m)^2``; the per-step cost and the checkpoint size do not grow with the number of tasks;
- `BoundPenalty`: the quadratic bound once per stage to the live parameters as flat lists, evaluated with a handful
  of ``torch._foreach_*`` kernels per step (no per-parameter Python dict lookups);
- `QuadraticMethod`: a `Method` base class with the hooks, the binding and ``state_dict`` / ``load_state_dict``
  (tensors and plain Python data only, loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .base import Method, Stage, TrainerView

Tensors = dict[str, torch.Tensor]


# ---- parameters -------------------------------------------------------------------------------------------------
def trainable_parameters(network: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every trainable parameter, once each. ``torch.compile``'s ``_orig_mod.`` prefix is
    dropped so the names match between compiled and plain networks."""
    return [(n.replace("_orig_mod.", ""), p) for n, p in network.named_parameters() if p.requires_grad]


def snapshot(network: torch.nn.Module) -> Tensors:
    """Detached fp32 copies of the trainable parameters (on their device)."""
    return {n: p.detach().float().clone() for n, p in trainable_parameters(network)}


def grown(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``stored`` zero-padded at the end of each dimension to the shape of ``like``: a stored importance or anchor of a
    layer that grew since, i.e. the segmentation head of the class scenario, whose new output channels are appended
    after the old ones (`networks.output_head.resize_output`). The old channels keep their values; the new ones get
    importance 0, so they start unpenalised. Anything else than growth is a different layer: a ValueError."""
    if stored.shape == like.shape:
        return stored
    if stored.ndim != like.ndim or any(a > b for a, b in zip(stored.shape, like.shape)):
        raise ValueError(f"a stored tensor of shape {tuple(stored.shape)} cannot grow to {tuple(like.shape)}")
    out = stored.new_zeros(like.shape)
    out[tuple(slice(0, n) for n in stored.shape)] = stored
    return out


def to_cpu(tensors: Tensors | None) -> Tensors | None:
    return None if tensors is None else {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in batch]
    return batch.to(device, non_blocking=True)


def _sample(x: Any, i: int) -> Any:
    return [t[i:i + 1] for t in x] if isinstance(x, (list, tuple)) else x[i:i + 1]


def highest_resolution(output: Any) -> torch.Tensor:
    """With deep supervision nnU-Net's network returns a list of logits, highest resolution first."""
    return output[0] if isinstance(output, (list, tuple)) else output


# ---- importance from gradients ----------------------------------------------------------------------------------
def gradient_importance(trainer: TrainerView, n_batches: int, objective: Callable[[Any, Any], torch.Tensor],
                        transform: str = "square", description: str = "importance") -> Tensors:
    """Mean over all samples of ``n_batches`` training batches of ``transform(d objective / d theta)``, with a
    progress bar ``description`` over the batches (one backward pass per sample: minutes on a CPU).

    ``objective(output, target)`` is evaluated per sample (batch split along dim 0; nnU-Net's InstanceNorm is
    per sample, so the outputs equal the batched ones) so that signs cannot cancel between samples: this is the
    empirical Fisher for ``square`` and MAS's per-data-point importance for ``abs``. The network runs in eval mode
    (identical to train mode for nnU-Net's InstanceNorm networks without dropout; it keeps BatchNorm running
    statistics untouched otherwise) and in fp32 without autocast, GradScaler or gradient clipping, so the
    gradients are the true, unscaled ones. ``torch.autograd.grad`` leaves the parameters' ``.grad`` alone.
    """
    if n_batches < 1:
        raise ValueError("the importance needs at least one batch")
    network = trainer.network
    named = trainable_parameters(network)
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    was_training = network.training
    advance = trainer.progress(f"{description} batches", n_batches)
    network.eval()
    try:
        with torch.enable_grad():
            for batch in trainer.training_batches(n_batches):
                data = _to_device(batch["data"], trainer.device)
                target = _to_device(batch["target"], trainer.device)
                for i in range(data.shape[0]):
                    value = objective(network(data[i:i + 1]), _sample(target, i))
                    grads = torch.autograd.grad(value, params, allow_unused=True)
                    for a, g in zip(acc, grads):
                        if g is not None:
                            a.add_(g.float().square() if transform == "square" else g.float().abs())
                    count += 1
                advance()
    finally:
        network.train(was_training)
    if count == 0:
        raise RuntimeError("trainer.training_batches yielded no batches")
    return {n: a / count for (n, _), a in zip(named, acc)}


# ---- the stored quadratic -------------------------------------------------------------------------------------
@dataclass
class Quadratic:
    """``sum_i weight_i (theta_i - anchor_i)^2 + const`` (without the method's coefficient)."""
    weight: Tensors
    anchor: Tensors
    const: float = 0.0

    def add(self, weight: Tensors, anchor: Tensors) -> "Quadratic":
        """Exactly ``self + sum_i weight_i (theta_i - anchor_i)^2`` as one quadratic (computed in float64)."""
        w_new, a_new, const = {}, {}, self.const
        for n, f in weight.items():
            if n not in self.weight:
                w_new[n], a_new[n] = f.clone(), anchor[n].clone()
                continue
            w0, m0 = grown(self.weight[n], f).double(), grown(self.anchor[n], f).double()
            f64, a64 = f.double().to(w0.device), anchor[n].double().to(w0.device)
            w = w0 + f64
            m = torch.where(w > 0, (w0 * m0 + f64 * a64) / torch.where(w > 0, w, 1.0), a64)
            const += float((w0 * (m0 - m) ** 2 + f64 * (a64 - m) ** 2).sum())
            w_new[n], a_new[n] = w.float(), m.float()
        return Quadratic(w_new, a_new, const)

    def decayed_with_new_anchor(self, decay: float, weight: Tensors, anchor: Tensors) -> "Quadratic":
        """Online form (Schwarz et al. 2018; MAS with decay 1): ``(decay * W + weight)(theta - anchor)^2``."""
        w = {n: (decay * grown(self.weight[n], f).to(f.device) + f if n in self.weight else f.clone())
             for n, f in weight.items()}
        return Quadratic(w, {n: a.clone() for n, a in anchor.items()}, 0.0)

    def state(self) -> dict[str, Any]:
        return {"weight": to_cpu(self.weight), "anchor": to_cpu(self.anchor), "const": float(self.const)}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Quadratic | None":
        if not state:
            return None
        return cls(dict(state["weight"]), dict(state["anchor"]), float(state["const"]))


class BoundPenalty:
    """``coefficient * sum W (theta - a)^2 + coefficient * const`` on a network's live parameters.

    Built once per stage: flat lists of (parameter, anchor, sqrt(coefficient * W)) on the parameters' device, so a
    step costs three foreach kernels (sub, mul, norm) plus a stack and a sum, whatever the number of tensors.
    The norm is zero-safe: at the anchor both the value and the gradient are exactly 0.
    """

    def __init__(self, network: torch.nn.Module, quadratic: Quadratic, coefficient: float):
        self.network = network
        self.names, self.params, self.anchors, self.root_weights = [], [], [], []
        for n, p in trainable_parameters(network):
            if n not in quadratic.weight:
                continue
            self.names.append(n)
            self.params.append(p)
            self.anchors.append(grown(quadratic.anchor[n], p).to(p.device, p.dtype))
            self.root_weights.append((coefficient * grown(quadratic.weight[n], p).to(p.device, torch.float32)).sqrt()
                                     .to(p.dtype))
        self.const = coefficient * quadratic.const

    def __call__(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(())
        diff = torch._foreach_sub(self.params, self.anchors)
        scaled = torch._foreach_mul(diff, self.root_weights)
        value = torch.stack(torch._foreach_norm(scaled)).square().sum()
        return value + self.const if self.const else value

    @torch.no_grad()
    def gradient(self) -> list[torch.Tensor]:
        """The analytic gradient ``2 * coefficient * W * (theta - a)`` per bound parameter."""
        diff = torch._foreach_sub(self.params, self.anchors)
        torch._foreach_mul_(diff, self.root_weights)
        torch._foreach_mul_(diff, self.root_weights)
        torch._foreach_mul_(diff, 2.0)
        return diff


# ---- the method base class ------------------------------------------------------------------------------------
class QuadraticMethod(Method):
    """A `Method` whose loss term is a quadratic penalty around earlier weights (no ``name``: not registered).

    Subclasses set ``term`` (the loss-term name), implement `coefficient` and update ``self.quadratic`` in
    ``after_stage``. The penalty is bound to ``trainer.network`` in ``before_stage`` and rebound lazily whenever
    the state was reloaded (resume) or the network object changed.
    """
    term: ClassVar[str] = ""
    learns_state_from_task_data = True  # the importances are estimated on each task's own training batches

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.quadratic: Quadratic | None = None
        self.tasks_seen: int = 0
        self._bound: BoundPenalty | None = None

    def coefficient(self) -> float:
        raise NotImplementedError

    def _penalty(self, network: torch.nn.Module) -> BoundPenalty | None:
        if self.quadratic is None:
            return None
        if self._bound is None or self._bound.network is not network:
            self._bound = BoundPenalty(network, self.quadratic, self.coefficient())
        return self._bound

    def before_stage(self, trainer: TrainerView, stage: Stage) -> None:
        self._bound = None
        self._penalty(trainer.network)

    def loss_terms(self, trainer: TrainerView, data: torch.Tensor, target: Any, output: Any) -> dict[str, torch.Tensor]:
        penalty = self._penalty(trainer.network)
        return {} if penalty is None else {self.term: penalty()}

    def penalty_value(self, network: torch.nn.Module) -> torch.Tensor:
        """The current penalty on ``network`` (0 before the first task has finished)."""
        penalty = self._penalty(network)
        return torch.zeros(()) if penalty is None else penalty()

    def set_quadratic(self, quadratic: Quadratic) -> None:
        self.quadratic = quadratic
        self._bound = None

    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "tasks_seen": self.tasks_seen,
                "quadratic": None if self.quadratic is None else self.quadratic.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.tasks_seen = int(state["tasks_seen"])
        self.quadratic = Quadratic.from_state(state["quadratic"])
        self._bound = None


__all__ = ["Tensors", "trainable_parameters", "snapshot", "grown", "to_cpu", "highest_resolution",
           "gradient_importance", "Quadratic", "BoundPenalty", "QuadraticMethod"]
