"""Growing (or shrinking) the output layer of an nnU-Net network: the "expanded segmentation head" of class-incremental
single-head methods.

nnU-Net's decoder ends in one 1x1x1 convolution per deep-supervision resolution (``decoder.seg_layers``). Resizing
to ``n`` classes keeps the first ``min(old, n)`` output channels bitwise (global label IDs are appended in order of
appearance, so old classes keep their channel) and gives new channels nnU-Net's own initialisation (He, a=1e-2, zero
bias). The result is a new network object that shares every other module, so the trainer rebuilds its optimizer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nnunet.network import he_initialise
from .shallow import shallow_copy


def num_outputs(network: nn.Module) -> int:
    return int(network.decoder.seg_layers[0].out_channels)


def resized_conv(conv: nn.Module, n: int) -> nn.Module:
    """A copy of the 1x1 convolution ``conv`` with ``n`` output channels; kept channels are copied exactly."""
    new = type(conv)(conv.in_channels, n, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    new = he_initialise(new.to(device=conv.weight.device, dtype=conv.weight.dtype))  # nnU-Net's initialisation
    keep = min(n, conv.out_channels)
    with torch.no_grad():
        new.weight[:keep] = conv.weight[:keep]
        if new.bias is not None:
            new.bias.zero_()
            new.bias[:keep] = conv.bias[:keep]
    return new


def resize_output(network: nn.Module, n: int) -> nn.Module:
    """``network`` itself when it already has ``n`` output channels, else a new network object (sharing all other
    modules) whose segmentation layers have ``n`` channels."""
    if num_outputs(network) == n:
        return network
    decoder = shallow_copy(network.decoder)
    decoder._modules["seg_layers"] = nn.ModuleList(resized_conv(c, n) for c in network.decoder.seg_layers)
    if hasattr(decoder, "num_classes"):
        decoder.num_classes = n
    net = shallow_copy(network)
    net._modules["decoder"] = decoder
    return net
