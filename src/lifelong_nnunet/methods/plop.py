"""PLOP, Pseudo-label and LOcal POD (Douillard et al., CVPR 2021), for nnU-Net (3D and 2D).

- Local POD: features of the student and of the teacher (the previous stage's model) are captured by forward
  hooks at ``pod_layers`` during their forwards on the same batch; each is turned into its Local POD embedding
  and the L2 distance of the embeddings is the loss. The student features are the live ones of the trainer's
  forward pass (one teacher forward per step, no extra student forward).
- Pseudo-labels: background voxels get the teacher's class where the teacher is confident; only classes the
  teacher knows and the current task does not annotate are used, so in the domain scenario nothing changes.

See docs/methods/plop.md for the formulas, the choices made and what `loss_terms` adds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from .distillation import DistillationMethod, FeatureCapture, as_list
from .params import Param, names, number, numbers

_EPS = 1e-8


def _bins(n: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an axis of length n into min(s, n) contiguous parts: (part index per position [n],
    indicator matrix [s, n], averaging matrix [s, n])."""
    s = max(1, min(int(s), n))
    edges = [(i * n) // s for i in range(s + 1)]
    seg = torch.cat([torch.full((edges[i + 1] - edges[i],), i, dtype=torch.long) for i in range(s)]).to(device)
    onehot = F.one_hot(seg, s).T.float()
    return seg, onehot, onehot / onehot.sum(1, keepdim=True)


def _apply_on_axis(x: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract ``x`` along ``axis`` with ``matrix`` [m, n] (n = x.shape[axis]); the axis becomes length m."""
    return torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)


def local_pod_embedding(x: torch.Tensor, scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Local POD embedding of features ``x`` [B, C, *spatial] (2D or 3D), as a [B, E] float32 tensor.

    For each scale s every spatial axis is split into s contiguous parts (fewer when the axis is shorter), giving
    s^d sub-regions. In each sub-region and for each spatial axis a, the features are averaged over the other axes
    within the sub-region, leaving a profile C x (length of the sub-region along a): width-, height- and
    depth-pooling. A sub-region's profiles are concatenated and L2-normalised; all sub-regions of all scales are
    concatenated.
    """
    x = x.float()
    spatial = x.shape[2:]
    nd = len(spatial)
    parts = []
    for s in scales:
        bins = [_bins(n, s, x.device) for n in spatial]
        profiles = []
        for a in range(nd):
            p = x
            for b in range(nd):
                if b != a:
                    p = _apply_on_axis(p, 2 + b, bins[b][2])  # mean over positions of each part along b
            profiles.append(p)  # [B, C, ...]: axis a full length, every other axis one entry per part
        sq = 0
        for a, p in enumerate(profiles):  # squared norm of every sub-region's concatenated profiles
            sq = sq + _apply_on_axis((p * p).sum(1), 1 + a, bins[a][1])
        norm = sq.clamp_min(_EPS ** 2).sqrt()  # [B, parts_0, ..., parts_{d-1}]
        for a, p in enumerate(profiles):
            parts.append((p / norm.index_select(1 + a, bins[a][0]).unsqueeze(1)).flatten(1))
    return torch.cat(parts, dim=1)


def local_pod_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                   scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """(1/L) sum_l mean_batch || POD(student_l) - POD(teacher_l) ||_2 over the L captured layers."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError("Local POD needs the same, non-zero number of student and teacher feature maps")
    per_layer = [torch.linalg.vector_norm(local_pod_embedding(s, scales) - local_pod_embedding(t, scales),
                                          dim=1).mean()
                 for s, t in zip(student_features, teacher_features)]
    return torch.stack(per_layer).mean()


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along dim 1 divided by log(C): in [0, 1]. Shape [B, *spatial]."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])


def median_entropy_thresholds(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per class c: the median normalised entropy of the voxels the teacher assigns to c (1.0 when it assigns
    none; such a class produces no pseudo-label anyway). PLOP takes this median over the whole dataset; here it
    is taken over the current batch (see docs/methods/plop.md)."""
    pred = teacher_logits.argmax(1)
    ent = normalized_entropy(teacher_logits)
    out = torch.ones(teacher_logits.shape[1], device=teacher_logits.device)
    for c in pred.unique().tolist():
        out[c] = ent[pred == c].median()
    return out


@torch.no_grad()
def pseudo_labels(target: torch.Tensor, teacher_logits: torch.Tensor, thresholds: torch.Tensor,
                  pseudo_classes: Sequence[int], background: int = 0) -> torch.Tensor:
    """PLOP's pseudo-labels: a voxel labelled ``background`` takes the teacher's argmax class c when c is in
    ``pseudo_classes`` (old classes not annotated in the current task) and the teacher's normalised entropy
    there is below ``thresholds[c]``. Every other voxel, annotated ones included, keeps its label.
    ``target`` is [B, 1, *spatial] (nnU-Net) or [B, *spatial]; the result has its shape and dtype."""
    squeeze = target.ndim == teacher_logits.ndim
    labels = target[:, 0] if squeeze else target
    pred = teacher_logits.argmax(1)
    allowed = torch.zeros(teacher_logits.shape[1], dtype=torch.bool, device=pred.device)
    if len(pseudo_classes):
        allowed[torch.as_tensor(list(pseudo_classes), device=pred.device)] = True
    confident = normalized_entropy(teacher_logits) < thresholds.to(pred.device)[pred]
    replace = (labels == background) & allowed[pred] & confident
    new = torch.where(replace, pred.to(labels.dtype), labels)
    return new.unsqueeze(1) if squeeze else new


class PLOP(DistillationMethod):
    name = "plop"
    #: pod_lambda 0.01 (Douillard et al. 2021, Sec. 4 implementation details); scales [1, 2, 4]: the paper's
    #: Local POD scales 1/1, 1/2, 1/4 (here each spatial axis in 1, 2, 4 parts); pod_layers: every encoder stage
    #: (the paper distils the output of every backbone block).
    params: ClassVar[dict[str, Param]] = {
        "pod_lambda": number(0.01, min=0),
        "pod_layers": names(["encoder.stages.*"], "module names ('name.*': all children of 'name')"),
        "scales": numbers([1, 2, 4], min=1, whole=True),
    }

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.student_capture: FeatureCapture | None = None
        self.teacher_capture: FeatureCapture | None = None

    def before_stage(self, trainer, stage) -> None:
        super().before_stage(trainer, stage)  # snapshot first: deepcopy would copy hooks registered earlier
        if self.teacher is not None:
            layers = list(self.config["pod_layers"])
            self.student_capture = FeatureCapture(trainer.network, layers, only_with_grad=True)
            self.teacher_capture = FeatureCapture(self.teacher, layers)

    def release(self) -> None:
        for capture in (self.student_capture, self.teacher_capture):
            if capture is not None:
                capture.remove()
        self.student_capture = self.teacher_capture = None
        super().release()

    def loss_terms(self, trainer, data, target, output) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        n_student = as_list(output)[0].shape[1]
        needs_teacher_logits = set(range(1, n_student)) - set(self.annotated_classes(trainer, n_student))
        if not needs_teacher_logits and all(n.startswith("encoder.") for n in self.student_capture.names):
            # every class is annotated (no pseudo-labels) and POD reads encoder features only: the teacher's
            # decoder would be wasted work (measured: ~0.15x of a training step on CPU)
            with torch.no_grad():
                self.teacher.encoder(data)
            return {"plop_pod": self.pod_term()}
        return super().loss_terms(trainer, data, target, output)

    def pod_term(self) -> torch.Tensor:
        """pod_lambda x Local POD distance between the features both networks produced in this step."""
        student_feats, teacher_feats = self.student_capture.pop(), self.teacher_capture.pop()
        names = self.student_capture.names
        missing = [n for n in names if n not in student_feats or n not in teacher_feats]
        if missing:
            raise RuntimeError(f"plop: no features captured at {missing}; the student's forward hooks did not run "
                               f"(is the network compiled? set nnUNet_compile=f)")
        scales = [int(s) for s in self.config["scales"]]
        return float(self.config["pod_lambda"]) * local_pod_loss(
            [student_feats[n] for n in names], [teacher_feats[n] for n in names], scales)

    def distill(self, trainer, data, target, output, teacher_output):
        terms = {"plop_pod": self.pod_term()}
        student = as_list(output)
        n_old = teacher_output[0].shape[1]
        annotated = set(self.annotated_classes(trainer, student[0].shape[1]))
        pseudo_classes = [c for c in range(1, n_old) if c not in annotated]
        if pseudo_classes:
            # class-incremental: nnU-Net's loss on the pseudo-labelled targets replaces the one on the given targets
            targets = as_list(target)
            pseudo = [pseudo_labels(t, tl[:, :n_old], median_entropy_thresholds(tl), pseudo_classes)
                      for t, tl in zip(targets, teacher_output)]
            if not isinstance(target, (list, tuple)):
                pseudo = pseudo[0]
            terms["plop_pseudo_correction"] = trainer.loss(output, pseudo) - trainer.loss(output, target)
        return terms
