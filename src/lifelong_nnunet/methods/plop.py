"""PLOP, Pseudo-label and LOcal POD (Douillard et al., CVPR 2021), for nnU-Net (3D and 2D), following the authors'
published code (its ``features_distillation`` / ``_local_pod`` and its pseudo-labelling with ignore index 255).

- Local POD: features of the student and of the teacher (the previous stage's model) are captured by forward
  hooks at ``pod_layers`` during their forwards on the same batch; each map is squared, pooled into its Local POD
  embedding (unnormalised), and the L2 distance of the embeddings is the loss. The final logits are distilled the
  same way with a factor of their own, and the whole term is scaled by sqrt(classes seen / new classes). The
  student features are the live ones of the trainer's forward pass (one teacher forward per step, no extra
  student forward).
- Pseudo-labels: background voxels get the teacher's class where the teacher is confident and are left out of the
  loss (nnU-Net's ignore label) where it is not; only in the class scenario, where old classes are not annotated.

See docs/methods/plop.md for the formulas, the choices made and what `loss_terms` adds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from .distillation import DistillationMethod, FeatureCapture, as_list
from .params import Param, flag, names, number, numbers


def _part_means(n: int, s: int, device) -> torch.Tensor:
    """Averaging matrix [parts, n] that splits an axis of length n into min(s, n) contiguous parts (sizes differ by
    at most one) and averages each: row i holds 1/size_i over part i."""
    s = max(1, min(int(s), n))
    edges = [(i * n) // s for i in range(s + 1)]
    seg = torch.cat([torch.full((edges[i + 1] - edges[i],), i, dtype=torch.long) for i in range(s)]).to(device)
    onehot = F.one_hot(seg, s).T.float()
    return onehot / onehot.sum(1, keepdim=True)


def _apply_on_axis(x: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract ``x`` along ``axis`` with ``matrix`` [m, n] (n = x.shape[axis]); the axis becomes length m."""
    return torch.movedim(torch.movedim(x, axis, -1) @ matrix.T, -1, axis)


def local_pod_embedding(x: torch.Tensor, scales: Sequence[int] = (1, 2, 4), normalize: bool = False) -> torch.Tensor:
    """PLOP's Local POD embedding of features ``x`` [B, C, *spatial] (2D or 3D), as a [B, E] float32 tensor.

    The features are squared first (the reference's default ``pod_prepro="pow"``: the pooled values are then the
    energy of each channel, which cannot cancel between positive and negative activations). For each scale s every
    spatial axis is split into s contiguous parts (fewer when the axis is shorter), giving s^d sub-regions. In each
    sub-region and for each spatial axis a, the squared features are averaged over the other axes within the
    sub-region, leaving a profile C x (length of the sub-region along a): width-, height- and depth-pooling. All
    profiles of all sub-regions of all scales are concatenated, unnormalised as in the reference; ``normalize``
    (the reference's ``norm`` switch, off for PLOP) divides the whole embedding by its L2 norm.
    """
    x = x.float().square()
    spatial = x.shape[2:]
    nd = len(spatial)
    parts = []
    for s in scales:
        means = [_part_means(n, s, x.device) for n in spatial]
        for a in range(nd):
            p = x
            for b in range(nd):
                if b != a:
                    p = _apply_on_axis(p, 2 + b, means[b])  # mean over the positions of each part along b
            parts.append(p.flatten(1))  # [B, C, ...]: axis a full length, every other axis one entry per part
    emb = torch.cat(parts, dim=1)
    return F.normalize(emb, dim=1) if normalize else emb


def local_pod_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                   factors: Sequence[float], scales: Sequence[int] = (1, 2, 4),
                   normalize: bool = False) -> torch.Tensor:
    """(1/L) sum_l factor_l mean_batch || POD(student_l) - POD(teacher_l) ||_2 over the L feature maps, as the
    reference sums its layers' weighted distances and divides by their number (a map with factor 0 still counts)."""
    if not (len(student_features) == len(teacher_features) == len(factors)) or not student_features:
        raise ValueError("Local POD needs the same, non-zero number of student and teacher feature maps and factors")
    per_map = [f * torch.linalg.vector_norm(local_pod_embedding(s, scales, normalize)
                                            - local_pod_embedding(t, scales, normalize), dim=1).mean()
               for s, t, f in zip(student_features, teacher_features, factors) if f > 0]
    if not per_map:
        return student_features[0].new_zeros((), dtype=torch.float32)
    return torch.stack(per_map).sum() / len(factors)


def logits_in_teacher_classes(student_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """The student's logits on the teacher's ``n_old`` classes, for POD on the logits: the logits of the channels the
    teacher does not have (classes added since) are summed into the background channel, as the reference does
    (its ``extra_channels="sum"``), since the teacher saw those structures as background."""
    if student_logits.shape[1] < n_old:
        raise ValueError(f"student has {student_logits.shape[1]} output channels, fewer than the teacher's {n_old}")
    if student_logits.shape[1] == n_old:
        return student_logits
    background = student_logits[:, :1] + student_logits[:, n_old:].sum(1, keepdim=True)
    return torch.cat([background, student_logits[:, 1:n_old]], dim=1)


def pod_schedule(n_classes: int, n_new: int) -> float:
    """The reference's POD schedule sqrt(n_classes / n_new): classes the student has (background included) over the
    classes added in this stage, so the more the model already knows, the more it is held to it. A stage that adds
    no class (the domain scenario) counts every class as new, as the reference does for its domain benchmark
    (Cityscapes domains: ``nb_new_classes = nb_current_classes``): factor 1."""
    return math.sqrt(n_classes / n_new) if n_new > 0 else 1.0


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along dim 1 divided by log(C): in [0, 1]. Shape [B, *spatial]."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])


def median_entropy_thresholds(teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per class c: the median normalised entropy of the voxels (those of ``mask`` [B, *spatial], all without it)
    the teacher assigns to c; 1.0 for a class it assigns none of them, which then labels no voxel anyway. PLOP takes
    this median over the background voxels of the whole training set; here it is taken over the background voxels
    of the current batch (see docs/methods/plop.md)."""
    pred = teacher_logits.argmax(1)
    ent = normalized_entropy(teacher_logits)
    if mask is not None:
        pred, ent = pred[mask], ent[mask]
    out = torch.ones(teacher_logits.shape[1], device=teacher_logits.device)
    for c in pred.unique().tolist():
        out[c] = ent[pred == c].median()
    return out


def background_of(target: torch.Tensor, teacher_logits: torch.Tensor, background: int = 0) -> torch.Tensor:
    """The voxels labelled ``background`` in ``target`` ([B, 1, *spatial] or [B, *spatial]), as [B, *spatial]."""
    labels = target[:, 0] if target.ndim == teacher_logits.ndim else target
    return labels == background


@torch.no_grad()
def pseudo_labels(target: torch.Tensor, teacher_logits: torch.Tensor, thresholds: torch.Tensor,
                  pseudo_classes: Sequence[int], ignore: int, background: int = 0) -> torch.Tensor:
    """PLOP's pseudo-labels for a voxel labelled ``background``, with the teacher's argmax class c and its
    normalised entropy H there:

    - c in ``pseudo_classes`` (old classes not annotated in the current task) and H < ``thresholds[c]``: c;
    - c background or in ``pseudo_classes`` and H >= ``thresholds[c]``: ``ignore`` (the reference marks these
      255, its ignore index: the teacher is unsure what the voxel is, and its background label may hide an old
      structure, so neither is trained on);
    - otherwise (c a class the current task annotates, whose background label is authoritative): background.

    Every voxel not labelled background keeps its label. No ``pseudo_classes`` (the domain scenario): nothing is
    hidden under the background, the target is returned unchanged. ``target`` is [B, 1, *spatial] (nnU-Net) or
    [B, *spatial]; the result has its shape and dtype."""
    if not len(pseudo_classes):
        return target
    squeeze = target.ndim == teacher_logits.ndim
    labels = target[:, 0] if squeeze else target
    pred = teacher_logits.argmax(1)
    allowed = torch.zeros(teacher_logits.shape[1], dtype=torch.bool, device=pred.device)
    allowed[torch.as_tensor(list(pseudo_classes), device=pred.device)] = True
    confident = normalized_entropy(teacher_logits) < thresholds.to(pred.device)[pred]
    unannotated = labels == background
    new = torch.where(unannotated & allowed[pred] & confident, pred.to(labels.dtype), labels)
    uncertain = unannotated & (allowed[pred] | (pred == background)) & ~confident
    new = torch.where(uncertain, torch.full_like(new, ignore), new)
    return new.unsqueeze(1) if squeeze else new


def adaptive_factor(target: torch.Tensor, pseudo: torch.Tensor, ignore: int, background: int = 0) -> torch.Tensor:
    """The reference's ``classif_adaptive_factor``: the share of the voxels labelled ``background`` in ``target``
    that the pseudo-labels do not ignore (1 when there is no background voxel). The fewer background voxels the
    teacher is sure about, the less the batch's classification loss counts, so a stage does not learn mostly from
    the new classes' voxels. The reference takes it per image on its per-pixel CE; nnU-Net's loss has a Dice over
    the whole batch, so it is taken over the batch here."""
    unannotated = target == background
    total = unannotated.sum()
    if total == 0:
        return torch.ones((), device=target.device)
    return (unannotated & (pseudo != ignore)).sum().float() / total.float()


class PLOP(DistillationMethod):
    """PLOP as in the authors' code (its ``--method PLOP`` options): Local POD with factor ``pod_lambda`` on the
    encoder stages and ``pod_logits_lambda`` on the final logits, times the POD schedule; entropy-thresholded
    pseudo-labels with the uncertain voxels ignored."""
    name = "plop"
    #: pod_lambda 0.01 and pod_logits_lambda 0.0005: the reference's ``pod_factor`` and the factor of its last map
    #: (the logits, ``pod_options.switch.after.factor``) for PLOP. Kept after a check on a tiny 2d nnU-Net that, with
    #: unnormalised features, they do not swamp nnU-Net's task loss: the POD gradient is 2-11x the task loss's, and
    #: the new task is learned as well as without POD (docs/methods/plop.md, "Default factors";
    #: benchmarks/plop_pod_scale.py). A tune on synthetic-sites (2d, one seed) preferred pod_lambda 0.3 (75% less
    #: forgetting); on the demo 0.3 did no better than 0.01 (final average 0.251 against 0.275), so the authors'
    #: value is kept (docs/benchmarks.md, "Defaults chosen with tune").
    #: pod_schedule: the reference's schedule sqrt(classes / new classes) (on unless its ``--no_pod_schedule``).
    #: pod_normalize: the reference's ``norm`` switch, off for PLOP. classif_adaptive_factor: the reference's switch of
    #: that name, on for PLOP: the task loss on the pseudo-labels is multiplied by the share of background voxels not
    #: ignored. scales [1, 2, 4]: the reference's ``spp_scales`` (each spatial axis in 1, 2, 4 parts). pod_layers:
    #: every encoder stage (the reference distils the output of every backbone block).
    params: ClassVar[dict[str, Param]] = {
        "pod_lambda": number(0.01, min=0),
        "pod_logits_lambda": number(0.0005, min=0),
        "pod_schedule": flag(True),
        "pod_normalize": flag(False),
        "classif_adaptive_factor": flag(True),
        "pod_layers": names(["encoder.stages.*"], "module names ('name.*': all children of 'name')"),
        "scales": numbers([1, 2, 4], min=1, whole=True),
    }

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.student_capture: FeatureCapture | None = None
        self.teacher_capture: FeatureCapture | None = None
        self.n_old = 0  # the teacher's output channels

    def before_stage(self, trainer, stage) -> None:
        super().before_stage(trainer, stage)  # snapshot first: deepcopy would copy hooks registered earlier
        if self.teacher is not None:
            layers = list(self.config["pod_layers"])
            self.student_capture = FeatureCapture(trainer.network, layers, only_with_grad=True)
            self.teacher_capture = FeatureCapture(self.teacher, layers)
            self.n_old = int(self.teacher.decoder.seg_layers[0].out_channels)

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
        if (not needs_teacher_logits and float(self.config["pod_logits_lambda"]) == 0
                and all(n.startswith("encoder.") for n in self.student_capture.names)):
            # every class is annotated (no pseudo-labels), no POD on the logits and POD reads encoder features only:
            # the teacher's decoder would be wasted work (measured: ~0.15x of a training step on CPU)
            with torch.no_grad():
                self.teacher.encoder(data)
            return {"plop_pod": self.pod_term(n_student)}
        return super().loss_terms(trainer, data, target, output)

    def pod_term(self, n_student: int, student_logits: torch.Tensor | None = None,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Local POD between the features both networks produced in this step (factor ``pod_lambda`` each) and,
        when given, their final logits (factor ``pod_logits_lambda``), times the POD schedule."""
        student_feats, teacher_feats = self.student_capture.pop(), self.teacher_capture.pop()
        names = self.student_capture.names
        missing = [n for n in names if n not in student_feats or n not in teacher_feats]
        if missing:
            raise RuntimeError(f"plop: no features captured at {missing}; the student's forward hooks did not run "
                               f"(is the network compiled? set nnUNet_compile=f)")
        students = [student_feats[n] for n in names]
        teachers = [teacher_feats[n] for n in names]
        factors = [float(self.config["pod_lambda"])] * len(names)
        if student_logits is not None:
            students.append(logits_in_teacher_classes(student_logits, teacher_logits.shape[1]))
            teachers.append(teacher_logits)
            factors.append(float(self.config["pod_logits_lambda"]))
        if self.config["pod_schedule"]:
            schedule = pod_schedule(n_student, n_student - self.n_old)
            factors = [f * schedule for f in factors]
        return local_pod_loss(students, teachers, factors, [int(s) for s in self.config["scales"]],
                              bool(self.config["pod_normalize"]))

    def distill(self, trainer, data, target, output, teacher_output):
        student = as_list(output)
        n_old, n_student = teacher_output[0].shape[1], student[0].shape[1]
        with_logits = float(self.config["pod_logits_lambda"]) > 0
        terms = {"plop_pod": self.pod_term(n_student, student[0] if with_logits else None,
                                           teacher_output[0] if with_logits else None)}
        annotated = set(self.annotated_classes(trainer, n_student))
        pseudo_classes = [c for c in range(1, n_old) if c not in annotated]
        if pseudo_classes:
            # class-incremental: nnU-Net's loss on the pseudo-labelled targets, uncertain voxels ignored, replaces the
            # one on the given targets. The dataset's ignore label serves if it has one (its voxels are ignored
            # already); else the first value past the classes, which no target holds.
            ignore = trainer.ignore_label if trainer.ignore_label is not None else n_student
            targets = as_list(target)
            pseudo = [pseudo_labels(t, tl, median_entropy_thresholds(tl, background_of(t, tl)), pseudo_classes,
                                    ignore)
                      for t, tl in zip(targets, teacher_output)]
            if not isinstance(target, (list, tuple)):
                pseudo = pseudo[0]
            pseudo_loss = trainer.loss_ignoring(ignore)(output, pseudo)
            if self.config["classif_adaptive_factor"]:
                pseudo_loss = adaptive_factor(targets[0], as_list(pseudo)[0], ignore) * pseudo_loss
            terms["plop_pseudo_correction"] = pseudo_loss - trainer.loss(output, target)
        return terms
