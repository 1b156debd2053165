"""nnU-Net's training loss with another ignore label, pinned to nnunetv2 2.8.1.

nnU-Net's loss leaves voxels out only through its ignore label: ``DC_and_CE_loss`` drops the voxels whose target
equals ``ignore_label`` from both the cross-entropy (``ignore_index``) and the soft Dice (``loss_mask``), so they
get neither loss nor gradient. A method that must leave voxels out (PLOP's uncertain pseudo-labels) marks them with
a value of its own and uses a copy of the trainer's loss that ignores that value. The copy is a shallow copy of the
trainer's own loss object (``nnUNetTrainer._build_loss``: Dice settings, CE/Dice weights, deep-supervision weights)
with only its ignore label changed, so the two never differ in anything else.
"""
from __future__ import annotations

import copy

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn

from ..networks.shallow import shallow_copy


def loss_with_ignore_label(loss: nn.Module, label: int) -> nn.Module:
    """A copy of nnU-Net's training loss ``loss`` (``DC_and_CE_loss``, bare or in nnU-Net's
    ``DeepSupervisionWrapper``) whose target voxels of value ``label`` count for nothing.

    ``loss`` must not have an ignore label of its own other than ``label``: the copy can ignore one value only,
    and voxels of the dropped one would then be read as a class. Region-based losses (``DC_and_BCE_loss``) keep
    their ignore channel in the target and are refused.
    """
    inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
    if not isinstance(inner, DC_and_CE_loss):
        raise ValueError(f"an ignore label can be set only on nnU-Net's DC_and_CE_loss, not on {type(inner).__name__} "
                         f"(region-based training is not supported here)")
    if inner.ignore_label is not None and inner.ignore_label != label:
        raise ValueError(f"the loss already ignores label {inner.ignore_label}; it cannot ignore {label} instead")
    if inner.ignore_label == label:
        return loss
    # shallow copies: the Dice module (torch.compile'd when nnUNet_compile is on) is shared, as it holds nothing that
    # depends on the ignore label (DC_and_CE_loss passes the mask to it per call); only the CE and the flag change
    changed = shallow_copy(inner)
    changed.ignore_label = int(label)  # masks the soft Dice (DC_and_CE_loss.forward)
    ce = copy.copy(inner.ce)  # RobustCrossEntropyLoss is an nn.CrossEntropyLoss without children
    ce.ignore_index = int(label)
    changed._modules["ce"] = ce
    if not isinstance(loss, DeepSupervisionWrapper):
        return changed
    wrapper = shallow_copy(loss)
    wrapper._modules["loss"] = changed
    return wrapper
