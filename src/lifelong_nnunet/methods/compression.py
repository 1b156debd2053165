"""Decoder compression: distil a trained full-size decoder (the teacher) into the smallest adequate student.

A small architecture search over candidate widths and depths (`CompactDecoder`) under a parameter budget: candidates
are tried from the smallest up; each starts from the teacher's most important channels (`init_from_teacher`, when
its depth is the teacher's), is trained by knowledge distillation on the frozen encoder's features (softened logits
of the teacher plus nnU-Net's own task loss) and is accepted when its Dice on the task's validation patches is
within ``tolerance`` of the teacher's. If none is, or the validation patches cannot
tell (the teacher's Dice is undefined), there is no student: the caller keeps the teacher, and the record says why.
A decoder is never replaced by a worse one. Everything here runs on the trainer's data loaders, seeded, so a rerun
picks the same student.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..console import no_progress
from ..networks.encoder_decoders import CompactDecoder, parameter_count
from .distillation import as_list, softened_kl, weighted_over_outputs


@dataclass
class Candidate:
    width: float
    n_conv: int
    parameters: int
    dice: float | None = None
    accepted: bool = False
    init: str = "scratch"  # "teacher": started from the teacher's channels (`init_from_teacher`); else He's


def patch_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per foreground class: (2 TP, 2 TP + FP + FN) of the argmax over a batch, to be summed over batches."""
    pred = logits.argmax(1)
    target = target[:, 0] if target.ndim == logits.ndim else target
    num, den = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        tp = int((p & t).sum())
        num[c - 1] = 2 * tp
        den[c - 1] = int(p.sum()) + int(t.sum())
    return num, den


def mean_dice(num: np.ndarray, den: np.ndarray) -> float:
    """Mean over the classes present in the prediction or the target (nnU-Net's pseudo-Dice convention)."""
    present = den > 0
    return float((num[present] / den[present]).mean()) if present.any() else float("nan")


def evaluate_decoder(encoder: nn.Module, decoder: nn.Module, batches: Sequence[dict], num_classes: int,
                     device: torch.device) -> float:
    """Pseudo-Dice of ``decoder`` on fixed validation patches (highest-resolution output)."""
    num, den = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
    decoder.eval()
    with torch.no_grad():
        for batch in batches:
            out = as_list(decoder(encoder(batch["data"].to(device))))[0]
            target = as_list(batch["target"])[0].to(device)
            n, d = patch_dice(out, target, num_classes)
            num, den = num + n, den + d
    return mean_dice(num, den)


def distil_decoder(encoder: nn.Module, teacher: nn.Module, student: nn.Module, batches: Callable[[], dict],
                   task_loss: Callable, iterations: int, lr: float, temperature: float, kd_weight: float,
                   device: torch.device, on_step: Callable[[], None] = lambda: None) -> list[float]:
    """Train ``student`` on the frozen encoder's features: nnU-Net's task loss + kd_weight * T^2 * KL(teacher_T ||
    student_T) summed over the deep-supervision outputs with nnU-Net's weights. SGD with nnU-Net's settings
    (Nesterov momentum 0.99, weight decay 3e-5, poly learning rate, gradient clipping at 12). ``on_step()`` after
    every iteration (a progress bar). Returns the losses."""
    optimizer = torch.optim.SGD(student.parameters(), lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    teacher.eval()
    student.train()
    losses = []
    for step in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / iterations) ** 0.9
        batch = batches()
        data = batch["data"].to(device)
        target = [t.to(device) for t in batch["target"]] if isinstance(batch["target"], list) \
            else batch["target"].to(device)
        with torch.no_grad():
            skips = encoder(data)
            teacher_out = as_list(teacher(skips))
        student_out = student(skips)
        loss = task_loss(student_out, target)
        if kd_weight > 0:
            kd = weighted_over_outputs(lambda s, t, k: softened_kl(s, t, temperature), as_list(student_out),
                                       teacher_out)
            loss = loss + kd_weight * temperature ** 2 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
        on_step()
    return losses


# ---- a student cut from its teacher -----------------------------------------------------------------------------
def _strongest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending order (so a student as wide as the teacher is the teacher)."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _output_importance(block: nn.Module) -> torch.Tensor:
    """How much each output channel of a conv-norm-nonlinearity block matters: the magnitude of its affine norm
    scale (network slimming, Liu et al. 2017: after instance normalisation a channel's filter scale is normalised
    away and the norm's scale is what the next layer sees), or the L1 norm of its filter without an affine norm."""
    norm = getattr(block, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        return norm.weight.detach().abs()
    return block.conv.weight.detach().abs().flatten(1).sum(1)


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")  # per channel (affine, batch statistics)


def _layers(decoder: nn.Module, s: int) -> list[nn.Module]:
    return [decoder.transpconvs[s], *(b.conv for b in decoder.stages[s].convs), decoder.seg_layers[s]]


def inherits_teacher(student: CompactDecoder, teacher: nn.Module) -> bool:
    """Whether ``student`` can start from ``teacher``'s channels (`init_from_teacher`): nnU-Net's decoder layout
    (transposed convolution, stacked conv blocks, segmentation layer per stage) with as many stages and convolutions
    per stage, the same layer types, kernels and strides, the same skips and classes, and no stage wider than the
    teacher's. A student of another depth has no teacher layer for each of its own, so it starts from He's
    initialisation (the candidate's record says which)."""
    parts = ("transpconvs", "stages", "seg_layers")
    if not all(isinstance(getattr(teacher, p, None), nn.ModuleList) for p in parts) or \
            len(teacher.stages) != len(student.stages):
        return False
    for s in range(len(student.stages)):
        t_blocks, s_blocks = getattr(teacher.stages[s], "convs", None), student.stages[s].convs
        if t_blocks is None or len(t_blocks) != len(s_blocks):
            return False
        for a, b in zip(_layers(student, s), _layers(teacher, s)):
            if type(a) is not type(b) or a.kernel_size != b.kernel_size or a.stride != b.stride \
                    or (a.bias is None) != (b.bias is None) or a.out_channels > b.out_channels:
                return False
        for a, b in zip(s_blocks, t_blocks):
            norm, t_norm = getattr(a, "norm", None), getattr(b, "norm", None)
            present = [(getattr(norm, n, None) is None) == (getattr(t_norm, n, None) is None) for n in _NORM_TENSORS]
            if type(norm) is not type(t_norm) or not all(present):
                return False
        up, t_up = student.transpconvs[s], teacher.transpconvs[s]
        if s_blocks[0].conv.in_channels - up.out_channels != t_blocks[0].conv.in_channels - t_up.out_channels or \
                student.seg_layers[s].out_channels != teacher.seg_layers[s].out_channels:
            return False
    return teacher.transpconvs[0].in_channels == student.transpconvs[0].in_channels


def _copy_norm(norm: nn.Module | None, t_norm: nn.Module | None, kept: torch.Tensor) -> None:
    if norm is None:
        return
    for name in _NORM_TENSORS:
        value, t_value = getattr(norm, name, None), getattr(t_norm, name, None)
        if value is not None:
            value.copy_(t_value[kept])


@torch.no_grad()
def init_from_teacher(student: CompactDecoder, teacher: nn.Module) -> None:
    """Set ``student``'s weights to the teacher's most important channels (structured pruning of the teacher).

    Stage by stage from the bottleneck: the transposed convolution keeps the output channels the first conv reads
    most (the L1 norm of the weights reading each), every conv block keeps its outputs of largest norm scale
    (`_output_importance`), each layer reads exactly the channels kept in the layer before it (and every skip
    channel: the encoder is shared and whole), and each segmentation layer reads its stage's kept channels. A
    student as wide as the teacher is then the teacher. Why: a freshly initialised student learns too little in
    a student's budget (on synthetic-structures, 2d, 50 iterations: validation Dice 0.31 against the teacher's 0.76;
    cut from the teacher, 0.78; docs/methods/frozen_encoder_decoders.md). Needs `inherits_teacher`."""
    if not inherits_teacher(student, teacher):
        raise ValueError("the student's layout does not fit the teacher's; check inherits_teacher first")
    below = None  # the teacher channels the next transposed convolution reads (None: the whole bottleneck)
    for s in range(len(student.stages)):
        up, t_up = student.transpconvs[s], teacher.transpconvs[s]
        blocks, t_blocks = student.stages[s].convs, teacher.stages[s].convs
        first = t_blocks[0].conv.weight.detach().abs()
        read = first.transpose(0, 1).flatten(1).sum(1)[:t_up.out_channels]
        kept = _strongest(read, up.out_channels)
        weight = t_up.weight if below is None else t_up.weight[below]  # transposed: (in, out, *kernel)
        up.weight.copy_(weight[:, kept])
        if up.bias is not None:
            up.bias.copy_(t_up.bias[kept])
        skip = t_blocks[0].conv.in_channels - t_up.out_channels
        inputs = torch.cat([kept, t_up.out_channels + torch.arange(skip, device=kept.device)])
        for block, t_block in zip(blocks, t_blocks):
            kept = _strongest(_output_importance(t_block), block.conv.out_channels)
            block.conv.weight.copy_(t_block.conv.weight[kept][:, inputs])
            if block.conv.bias is not None:
                block.conv.bias.copy_(t_block.conv.bias[kept])
            _copy_norm(getattr(block, "norm", None), getattr(t_block, "norm", None), kept)
            inputs = kept
        student.seg_layers[s].weight.copy_(teacher.seg_layers[s].weight[:, inputs])
        student.seg_layers[s].bias.copy_(teacher.seg_layers[s].bias)
        below = inputs


def candidates(encoder: nn.Module, num_classes: int, widths: Sequence[float], convs: Sequence[int],
               max_parameters: float) -> list[Candidate]:
    """Every (width, convolutions per stage) pair whose decoder fits ``max_parameters``, smallest first."""
    found = []
    for w in widths:
        for n in convs:
            size = parameter_count(CompactDecoder(encoder, num_classes, w, n, deep_supervision=False))
            if size <= max_parameters:
                found.append(Candidate(float(w), int(n), size))
    return sorted(found, key=lambda c: (c.parameters, c.width, c.n_conv))


@dataclass(frozen=True)
class StudentSearch:
    """The settings of one student search: the candidate grid and its budget, and the distillation recipe.

    - ``widths`` x ``convs``: the candidate decoders (`CompactDecoder` width and convolutions per stage), of which
      only those with at most ``max_parameters`` parameters are tried, smallest first;
    - ``tolerance``: a candidate is accepted when its validation Dice is at least the teacher's minus this;
    - ``iterations``, ``lr``, ``temperature``, ``kd_weight``: how each candidate is distilled (`distil_decoder`);
    - ``deep_supervision``: whether the students return one output per resolution, like the teacher in training;
    - ``init``: ``"teacher"``: a candidate of the teacher's depth starts from its most important channels
      (`init_from_teacher`), any other from He's initialisation; ``"scratch"``: every candidate from He's.
    """
    widths: tuple[float, ...]
    convs: tuple[int, ...]
    max_parameters: float
    tolerance: float
    iterations: int
    lr: float
    temperature: float
    kd_weight: float
    deep_supervision: bool
    init: Literal["teacher", "scratch"] = "teacher"

def search_student(encoder: nn.Module, teacher: nn.Module, num_classes: int, search: StudentSearch,
                   val_batches: Sequence[dict], train_batches: Callable[[], dict], task_loss: Callable,
                   device: torch.device, seed: Callable[[int], None], log: Callable[[str], None] = lambda s: None,
                   progress: Callable[[str, int], Callable[[], None]] = no_progress):
    """The smallest candidate within ``search.tolerance`` Dice of the teacher, distilled on ``train_batches()`` and
    judged on ``val_batches``; ``seed(i)`` is called before candidate ``i`` is built, and each candidate's
    distillation gets a bar from ``progress(description, iterations)`` (`TrainerView.progress`). Returns a
    `SearchResult`; its ``student`` is None (keep the teacher) when no candidate fits the size budget or comes within
    the tolerance, or when the validation patches hold none of the task's structures (a Dice that cannot judge a
    student)."""
    teacher_dice = evaluate_decoder(encoder, teacher, val_batches, num_classes, device)
    grid = candidates(encoder, num_classes, search.widths, search.convs, search.max_parameters)
    if np.isnan(teacher_dice):
        return SearchResult(None, teacher_dice, [], "the validation patches hold none of the task's structures, so "
                                                    "no student can be judged against the teacher")
    if not grid:
        return SearchResult(None, teacher_dice, [], "no candidate student fits the size budget")
    tried = []
    for i, cand in enumerate(grid):
        seed(i)
        student = CompactDecoder(encoder, num_classes, cand.width, cand.n_conv, search.deep_supervision).to(device)
        if search.init == "teacher" and inherits_teacher(student, teacher):
            init_from_teacher(student, teacher)
            cand.init = "teacher"
        bar = progress(f"student {i + 1}/{len(grid)} (width {cand.width:g} x{cand.n_conv} conv) distillation",
                       search.iterations)
        distil_decoder(encoder, teacher, student, train_batches, task_loss, search.iterations, search.lr,
                       search.temperature, search.kd_weight, device, on_step=bar)
        cand.dice = evaluate_decoder(encoder, student, val_batches, num_classes, device)
        cand.accepted = bool(cand.dice >= teacher_dice - search.tolerance)
        tried.append(cand)
        log(f"student width {cand.width:g} x{cand.n_conv} conv ({cand.parameters} parameters, started from "
            f"{'the teacher' if cand.init == 'teacher' else 'scratch'}): Dice {cand.dice:.3f} "
            f"(teacher {teacher_dice:.3f})" + (" accepted" if cand.accepted else ""))
        if cand.accepted:
            return SearchResult(student, teacher_dice, [asdict(c) for c in tried], None)
    best = max(c.dice for c in tried)
    return SearchResult(None, teacher_dice, [asdict(c) for c in tried],
                        f"no student came within {search.tolerance:g} Dice of the teacher's {teacher_dice:.3f} "
                        f"(best {best:.3f})")


@dataclass
class SearchResult:
    """What `search_student` found: the accepted ``student`` (None: keep the teacher, for the ``kept_teacher``
    reason), the teacher's validation Dice and every candidate tried."""
    student: CompactDecoder | None
    teacher_dice: float
    tried: list[dict]
    kept_teacher: str | None


def validation_logits(encoder: nn.Module, decoder: nn.Module, batches: Sequence[dict],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's highest-resolution logits and the targets on fixed validation patches (for calibration)."""
    logits, targets = [], []
    decoder.eval()
    with torch.no_grad():
        for batch in batches:
            logits.append(as_list(decoder(encoder(batch["data"].to(device))))[0].float().cpu())
            target = as_list(batch["target"])[0]
            targets.append((target[:, 0] if target.ndim == logits[-1].ndim else target).long())
    return torch.cat(logits), torch.cat(targets)
