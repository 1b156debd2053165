"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), for nnU-Net.

Term added to nnU-Net's loss in every step of stage t > 1 (see docs/methods/lwf.md):

    lwf = lambda * T^2 * sum_k w_k * mean_voxels KL(softmax(z_teacher_k / T) || softmax(z_student_k / T))

over the deep-supervision outputs k with nnU-Net's own weights w_k. The teacher is the previous stage's model
(snapshotted in `before_stage`), run once per step under no_grad on the same augmented batch; the student logits
are the trainer's live output, so the term back-propagates into every student parameter.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .distillation import (
    DistillationMethod,
    as_list,
    old_class_logits,
    softened_kl,
    weighted_over_outputs,
)
from .params import Param, number


def lwf_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float,
             weight: float) -> torch.Tensor:
    """weight * T^2 * sum_k w_k KL_T(teacher_k || student_k); the student restricted to the teacher's channels."""
    kl = weighted_over_outputs(
        lambda s, t, k: softened_kl(old_class_logits(s, t.shape[1]), t, temperature), student, teacher)
    return weight * temperature ** 2 * kl


class LwF(DistillationMethod):
    name = "lwf"
    #: lambda (lambda_o in the paper): 1, the paper's default loss balance; temperature T = 2, the paper's choice
    #: following Hinton et al. 2015 (Li & Hoiem, Sec. 3). lambda checked on validation data with `lifelong-nnunet
    #: tune` (synthetic-sites, 2d): the best final average of 1..16, tied with 2 (docs/benchmarks.md).
    params: ClassVar[dict[str, Param]] = {"lambda": number(1.0, min=0),
                                          "temperature": number(2.0, min=0, min_open=True)}

    def distill(self, trainer, data, target, output, teacher_output):
        return {"lwf": lwf_loss(as_list(output), teacher_output, float(self.config["temperature"]),
                                float(self.config["lambda"]))}
