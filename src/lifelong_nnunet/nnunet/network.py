"""nnU-Net's network conventions that our own networks and methods build on, pinned to nnunetv2 2.8.1 and
dynamic-network-architectures (the package nnU-Net builds its U-Nets from).

- the ``deep_supervision`` flag: nnU-Net's decoders return one output per resolution (highest first) while it is
  set, and nnU-Net's trainer flips it on the decoder only; our wrappers hold decoders deeper down, so the toggle
  walks the whole module tree;
- the deep-supervision loss weights of ``nnUNetTrainer._build_loss``, which the distillation terms reuse so that
  they weight the resolutions exactly as nnU-Net's own loss does;
- the building blocks and the initialisation of nnU-Net's decoders, for decoders of our own layout
  (`networks.encoder_decoders.CompactDecoder`).
"""
from __future__ import annotations

from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

__all__ = ["StackedConvBlocks", "deep_supervision_weights", "he_initialise", "set_deep_supervision",
           "transposed_conv_for"]


def set_deep_supervision(network: nn.Module, enabled: bool) -> None:
    """Set ``deep_supervision`` on every module of ``network`` that has the flag (also decoders inside multi-head
    and multi-decoder wrappers, and compact student decoders)."""
    for module in network.modules():
        if hasattr(module, "deep_supervision"):
            module.deep_supervision = enabled


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net 2.8.1's deep-supervision weights (``nnUNetTrainer._build_loss``, single GPU): 1/2^i for output i
    (highest resolution first), the lowest resolution set to 0, normalised to sum 1. One output: [1.0]."""
    if n == 1:
        return [1.0]
    w = [1 / 2 ** i for i in range(n)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def he_initialise(module: nn.Module) -> nn.Module:
    """nnU-Net's initialisation of its networks (He, negative slope 1e-2, zero biases), in place; returns ``module``."""
    return module.apply(InitWeights_He(1e-2))


def transposed_conv_for(conv_op: type[nn.Module]) -> type[nn.Module]:
    """The transposed convolution class matching ``conv_op`` (``nn.Conv3d`` -> ``nn.ConvTranspose3d``)."""
    return get_matching_convtransp(conv_op=conv_op)
