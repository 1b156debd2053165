"""Shared code of the distillation methods (`lwf`, `mib`, `plop`): the teacher, softened KL, feature hooks.

Design rules that make these methods *provably* distil (the nnU-Net v1 framework's LwF / PLOP terms carried no
gradient because the student outputs were detached or computed under ``no_grad``):

- the teacher is a deep copy of the student at the start of the stage, in ``eval()`` mode with
  ``requires_grad_(False)``, and its forward runs under ``torch.no_grad()``;
- the student side of every term is the live ``output`` of the trainer's forward pass (and, for feature terms,
  the live features captured by forward hooks during that same pass): never detached, never recomputed;
- every term is computed in float32, also under CUDA autocast.

Everything here is a pure function of tensors, except `Teacher` and `FeatureCapture`, which hold modules.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..networks.multihead import unwrap
from ..nnunet.network import deep_supervision_weights, set_deep_supervision
from .base import Method, Stage, TrainerView


# ---- networks -----------------------------------------------------------------------------------------------------
def snapshot_teacher(network: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``network``: deep copy, ``eval()``, ``requires_grad_(False)``, no gradients carried over.

    Take the snapshot *before* registering forward hooks on the student: ``deepcopy`` copies hook dictionaries.
    (`FeatureCapture` also ignores calls from modules it was not registered on, as a second guard.)
    """
    teacher = copy.deepcopy(unwrap(network))
    teacher.eval()
    teacher.requires_grad_(False)
    for p in teacher.parameters():
        p.grad = None
    return teacher


def as_list(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


# ---- losses (pure functions of logits) ----------------------------------------------------------------------------
def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                dim: int = 1) -> torch.Tensor:
    """Mean over voxels (and batch) of KL(softmax(teacher/T) || softmax(student/T)) along the class axis ``dim``.

    Computed in float32. It is 0 when the logits are equal; its gradient w.r.t. the student logits is
    (softmax(student/T) - softmax(teacher/T)) / T per voxel, divided by the number of voxels.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=dim)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=dim)
    return (log_t.exp() * (log_t - log_s)).sum(dim).mean()


def old_class_logits(student_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """The student's logits of the teacher's classes: the first ``n_old`` channels (labels are appended when the
    output layer grows, so old classes keep their channel index)."""
    if student_logits.shape[1] < n_old:
        raise ValueError(f"student has {student_logits.shape[1]} output channels, fewer than the teacher's {n_old}")
    return student_logits if student_logits.shape[1] == n_old else student_logits[:, :n_old]


def weighted_over_outputs(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                          student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k w_k fn(student_k, teacher_k, k) with nnU-Net's deep-supervision weights; weight-0 outputs skipped."""
    weights = deep_supervision_weights(len(student))
    if len(teacher) != len(student):
        raise ValueError(f"teacher returned {len(teacher)} outputs, the student {len(student)}")
    terms = [w * fn(s, t, k) for k, (w, s, t) in enumerate(zip(weights, student, teacher)) if w > 0]
    return torch.stack(terms).sum()


# ---- feature capture ----------------------------------------------------------------------------------------------
def resolve_layers(network: torch.nn.Module, specs: Sequence[str]) -> list[str]:
    """Module names for layer specs: an exact module name (``"decoder.stages.1"``), or ``"<name>.*"`` for all
    direct children of ``<name>`` (``"encoder.stages.*"``: every encoder stage). Order kept, duplicates dropped."""
    net = unwrap(network)
    names: list[str] = []
    for spec in specs:
        base, star = (spec[:-2], True) if spec.endswith(".*") else (spec, False)
        try:
            module = net.get_submodule(base) if base else net
        except AttributeError:
            tops = ", ".join(n for n, _ in net.named_children())
            raise UserInputError(f"layer '{spec}' does not exist in the network (its top-level modules: {tops}); "
                                 f"fix pod_layers in method_params, e.g. ['encoder.stages.*']") from None
        found = [f"{base}.{n}" if base else n for n, _ in module.named_children()] if star else [base]
        if not found:
            raise UserInputError(f"layer spec '{spec}' matches no module; fix pod_layers in method_params")
        names += [n for n in found if n not in names]
    return names


class FeatureCapture:
    """Forward hooks that keep the outputs of named modules of ONE network (register one capture per network).

    With ``only_with_grad`` the hooks record only forwards run with autograd enabled (the training forward), so
    validation and inference forwards of the student store nothing. The stored tensors are the live outputs, so
    a loss on them back-propagates into the network.
    """

    def __init__(self, network: torch.nn.Module, layers: Sequence[str], only_with_grad: bool = False) -> None:
        net = unwrap(network)
        self.names = resolve_layers(net, layers)
        self.only_with_grad = only_with_grad
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in self.names:
            module = net.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))

    def _make_hook(self, name: str, owner: torch.nn.Module):
        def hook(module, inputs, output):
            # a deep copy of a hooked module shares this closure: never record a copy's output
            if module is not owner or (self.only_with_grad and not torch.is_grad_enabled()):
                return
            self.features[name] = output[0] if isinstance(output, (list, tuple)) else output
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the last recorded forward (then forgotten, so no graph outlives its step)."""
        out, self.features = self.features, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}


# ---- the base class of the distillation methods -------------------------------------------------------------------
class DistillationMethod(Method):
    """A `Method` with a teacher: the previous stage's model, snapshotted in `before_stage`.

    Subclasses implement `distill(trainer, data, target, output, teacher_output)`. `loss_terms` returns ``{}``
    while there is no teacher (stage 1, or a stage that starts from the initial weights).
    """

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.teacher: torch.nn.Module | None = None

    def before_stage(self, trainer, stage: Stage) -> None:
        """The runner has loaded the previous stage's weights into ``trainer.network`` (also on a resume, before the
        checkpoint is read), so the snapshot here is the previous stage's model, rebuilt identically on resume."""
        self.release()
        if stage.index > 1 and stage.init == "previous":
            self.teacher = snapshot_teacher(trainer.network).to(trainer.device)
            if self.labels is not None and self.labels.is_class_incremental:
                # the runner has already grown the output layer for this stage's new structures: the teacher is the
                # previous model, so it keeps only the channels it was trained with (old channels are bitwise kept)
                from ..networks.output_head import resize_output
                self.teacher = resize_output(self.teacher,
                                             self.labels.num_outputs(trainer.stage_state.tasks_before))
                self.teacher.eval().requires_grad_(False)

    def after_stage(self, trainer, stage: Stage) -> None:
        self.release()

    def release(self) -> None:
        self.teacher = None

    def teacher_forward(self, data: torch.Tensor, output: Any) -> list[torch.Tensor]:
        """The teacher's outputs on the same (augmented) batch, under no_grad, with the student's deep-supervision
        setting (a list when the student returned a list)."""
        assert self.teacher is not None
        set_deep_supervision(self.teacher, isinstance(output, (list, tuple)))
        with torch.no_grad():
            return as_list(self.teacher(data))

    @staticmethod
    def annotated_classes(trainer: TrainerView, n_student: int) -> list[int]:
        """Output channels annotated in this stage's data: the stage state's (class scenario), or every one of the
        student's ``n_student`` channels (domain scenario, where the state records ``None``: all annotated)."""
        classes = trainer.stage_state.annotated_classes
        return list(range(n_student)) if classes is None else [int(c) for c in classes]

    def loss_terms(self, trainer, data, target, output) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        return self.distill(trainer, data, target, output, self.teacher_forward(data, output))

    def distill(self, trainer, data, target, output, teacher_output: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # the teacher is rebuilt by before_stage (also on resume); only plain data is kept
    def state_dict(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # configuration comes from the spec; the teacher from before_stage
