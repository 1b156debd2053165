"""Frozen body: multi-head, but after the first stage the shared body is frozen and only the new task's head trains.

Stage 1 trains everything (body and head 1), as nnU-Net does. From stage 2 on the body's parameters get no
gradient (``requires_grad`` False, so nnU-Net's SGD with momentum and weight decay leaves them bitwise unchanged)
and the body runs in eval mode; earlier tasks' predictions cannot change at all (zero forgetting by construction),
at the price of plasticity. Default split ``decoder``: a frozen encoder with one decoder per task, so each new task
still trains a full decoder. See docs/methods/frozen_body.md.
"""
from __future__ import annotations

from ..networks.multihead import SPLITS, MultiHeadNetwork, unwrap
from .base import Stage
from .multihead import MultiHead
from .params import one_of


class FrozenBody(MultiHead):
    name = "frozen_body"
    params = {"split": one_of("decoder", SPLITS)}

    def before_stage(self, trainer, stage: Stage) -> None:
        super().before_stage(trainer, stage)
        network = unwrap(trainer.network)
        if isinstance(network, MultiHeadNetwork):
            trained_before = [t for t in network.tasks if t not in stage.train_tasks]
            network.freeze_body(bool(trained_before))
