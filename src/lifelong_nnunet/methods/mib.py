"""MiB, Modeling the Background (Cermelli et al., CVPR 2020), for nnU-Net: unbiased CE and unbiased KD.

Class sets are lists of the student's output channels (background = channel 0). ``old_classes`` are the
teacher's classes, in the teacher's channel order (all of its output channels); ``new_classes`` are the classes
annotated in the current task's data. See docs/methods/mib.md for the formulas and what `loss_terms` adds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..networks.multihead import unwrap
from .distillation import DistillationMethod, as_list, weighted_over_outputs
from .params import Param, number, one_of


def _merge_background(log_probs: torch.Tensor, merged: Sequence[int], background: int) -> torch.Tensor:
    """log p with channel ``background`` replaced by log(sum of p over ``background`` and ``merged``)."""
    idx = [background, *[c for c in merged if c != background]]
    if len(idx) == 1:
        return log_probs
    bg = torch.logsumexp(log_probs[:, idx], dim=1, keepdim=True)
    return torch.cat([log_probs[:, :background], bg, log_probs[:, background + 1:]], dim=1)


def unbiased_cross_entropy(logits: torch.Tensor, target: torch.Tensor, old_classes: Sequence[int],
                           new_classes: Sequence[int], background: int = 0,
                           ignore_index: int | None = None) -> torch.Tensor:
    """MiB's unbiased cross-entropy, mean over (non-ignored) voxels.

    For every voxel the probability of ``background`` becomes p(background) + sum_{c in U} p(c), with
    U = old_classes \\ new_classes \\ {background} (old classes not annotated in the current task, which the
    current labels call background). Labels of other classes use their own probability. With U empty (domain
    scenario) this is exactly the cross-entropy. ``target``: class indices, [B, ...] or [B, 1, ...].
    """
    unannotated = [c for c in old_classes if c not in set(new_classes) and c != background]
    log_p = _merge_background(F.log_softmax(logits.float(), dim=1), unannotated, background)
    target = target.long()
    if target.ndim == logits.ndim:
        target = target[:, 0]
    return F.nll_loss(log_p, target, ignore_index=-100 if ignore_index is None else int(ignore_index))


def unbiased_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, old_classes: Sequence[int],
                new_classes: Sequence[int], background: int = 0) -> torch.Tensor:
    """MiB's unbiased knowledge distillation, mean over voxels, in KL form (0 when the student equals the teacher).

    Teacher channel j is class ``old_classes[j]``. The student's probability of background becomes the sum of its
    probabilities over background and the classes new to the teacher, N = new_classes \\ old_classes; every other
    old class c keeps q(c):  1/|C_old| sum_j p_t(j) [log p_t(j) - log q_hat(old_classes[j])].
    The division by the number of old classes (background included) is the authors' code's (Cermelli et al.'s
    UnbiasedKnowledgeDistillationLoss divides by the teacher's channel count); it keeps lambda = 10 at the weight
    the paper tuned whatever the number of classes. The paper writes the cross-entropy -sum_j p_t(j) log q_hat(.):
    it differs by the teacher's entropy, a constant for the student, so the gradient is the same. With N empty it is
    the plain KD, KL(p_t || q|old classes), divided by |C_old|.
    """
    old = [int(c) for c in old_classes]
    if teacher_logits.shape[1] != len(old):
        raise ValueError(f"teacher has {teacher_logits.shape[1]} channels but {len(old)} old classes were given")
    if background not in old:
        raise ValueError("the background class must be one of the old classes")
    new_to_teacher = [c for c in new_classes if c not in set(old)]
    log_q = _merge_background(F.log_softmax(student_logits.float(), dim=1), new_to_teacher, background)[:, old]
    log_p = F.log_softmax(teacher_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() / len(old)


def init_new_from_background(network: torch.nn.Module, n_old: int, background: int = 0) -> None:
    """MiB's initialisation of the channels ``n_old..`` of every segmentation layer of ``network`` (in place)."""
    with torch.no_grad():
        for conv in network.decoder.seg_layers:
            n_new = conv.out_channels - n_old
            if n_new <= 0:
                continue
            conv.weight[n_old:] = conv.weight[background]
            shift = torch.log(torch.tensor(float(n_new + 1)))
            conv.bias[n_old:] = conv.bias[background] - shift
            conv.bias[background] -= shift


class MiB(DistillationMethod):
    name = "mib"
    #: lambda: weight of the unbiased KD term (itself divided by the number of old classes, as in the authors' code),
    #: 10 as in Cermelli et al. 2020 (Sec. 5, implementation details).
    #: init_new: "background" initialises new classes' output channels from the background channel (Cermelli et al.
    #: 2020, Sec. 3.4): w_c = w_b, b_c = b_b - log(|N| + 1), and b_b gets the same shift, so at the start of the
    #: stage the new classes share the old background probability equally and the model's old predictions are
    #: unchanged; "random" keeps nnU-Net's He initialisation of the grown channels.
    #: lambda 10 kept although a domain-scenario tune (synthetic-sites, 2d) preferred 1 (final average 0.690 against
    #: 0.644): MiB is a class-incremental method and 10 its authors' value; a class-scenario tune decides
    #: (docs/benchmarks.md, "Defaults chosen with tune").
    params: ClassVar[dict[str, Param]] = {"lambda": number(10.0, min=0),
                                          "init_new": one_of("background", ("background", "random"))}

    def before_stage(self, trainer, stage) -> None:
        super().before_stage(trainer, stage)
        if self.teacher is not None and self.config["init_new"] == "background":
            init_new_from_background(unwrap(trainer.network), self.teacher.decoder.seg_layers[0].out_channels)

    def distill(self, trainer, data, target, output, teacher_output):
        student = as_list(output)
        n_old, n_student = teacher_output[0].shape[1], student[0].shape[1]
        old = list(range(n_old))
        new = self.annotated_classes(trainer, n_student)
        terms = {"mib_kd": float(self.config["lambda"]) * weighted_over_outputs(
            lambda s, t, k: unbiased_kd(s, t, old, new), student, teacher_output)}
        if any(c not in set(new) and c != 0 for c in old):
            # class-incremental: swap the CE inside nnU-Net's Dice+CE (weight 1, same deep-supervision weights)
            # for the unbiased CE by adding sum_k w_k (UCE_k - CE_k); nothing is added in the domain scenario.
            ignore = trainer.ignore_label
            targets = as_list(target)
            terms["mib_unce_correction"] = weighted_over_outputs(
                lambda s, t, k: unbiased_cross_entropy(s, targets[k], old, new, ignore_index=ignore)
                - unbiased_cross_entropy(s, targets[k], [], [], ignore_index=ignore), student, student)
        return terms
