"""One shared encoder and one decoder per task, merged by calibrated confidence: the class-incremental architecture.

`EncoderDecoders` holds nnU-Net's encoder and, per task, a `TaskDecoder`: a decoder over (background, the task's own
structures), the map from its channels to global label IDs, and its calibration temperature (buffers, so one
``state_dict`` carries everything). ``forward`` runs the encoder once per patch; with ``active`` set (training) it
returns that task's decoder output as nnU-Net's loss expects it, otherwise every decoder runs on the same features and
`networks.merge.merge_decoders` turns their outputs into scores over the global labels, which nnU-Net's sliding-window
predictor averages and argmaxes like logits.

`CompactDecoder` is nnU-Net's decoder layout (transposed convolution, concatenation with the skip, stacked
convolutions, a 1x1 segmentation layer per resolution) with ``width`` times the encoder's features per stage and
``n_conv`` convolutions per stage: the student a new task's full-size decoder is compressed into.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..nnunet.network import StackedConvBlocks, he_initialise, set_deep_supervision, transposed_conv_for
from .merge import merge_decoders
from .multihead import head_key
from .shallow import shallow_copy


class CompactDecoder(nn.Module):
    """nnU-Net's U-Net decoder with ``width`` x the encoder's features per stage and ``n_conv`` convolutions per stage.

    Takes the encoder's skips (bottleneck last) and returns the segmentation outputs highest resolution first
    (a list with deep supervision, else one tensor), exactly like nnU-Net's ``UNetDecoder``."""

    def __init__(self, encoder: nn.Module, num_classes: int, width: float, n_conv: int, deep_supervision: bool,
                 min_features: int = 4) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.width, self.n_conv = float(width), int(n_conv)
        channels = list(encoder.output_channels)
        features = [max(min_features, int(round(width * c))) for c in channels]
        transpconv = transposed_conv_for(encoder.conv_op)
        stages, transpconvs, seg_layers = [], [], []
        below = channels[-1]
        for s in range(1, len(channels)):
            skip, out = channels[-(s + 1)], features[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(transpconv(below, out, stride, stride, bias=encoder.conv_bias))
            stages.append(StackedConvBlocks(n_conv, encoder.conv_op, out + skip, out, encoder.kernel_sizes[-(s + 1)], 1,
                                            encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs,
                                            encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin,
                                            encoder.nonlin_kwargs))
            seg_layers.append(encoder.conv_op(out, num_classes, 1, 1, 0, bias=True))
            below = out
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)
        he_initialise(self)

    def forward(self, skips: Sequence[torch.Tensor]):
        x, outputs = skips[-1], []
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == len(self.stages) - 1:
                outputs.append(self.seg_layers[s](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


def without_encoder(decoder: nn.Module) -> nn.Module:
    """nnU-Net's ``UNetDecoder`` keeps a reference to the encoder (only for size bookkeeping); a decoder stored next
    to the shared encoder must not carry a second copy of its weights in the ``state_dict``."""
    return shallow_copy(decoder, drop=("encoder",))


def fresh_segmentation_layers(decoder: nn.Module, num_classes: int) -> nn.Module:
    """A deep copy of ``decoder`` with new (He-initialised) 1x1 segmentation layers for ``num_classes`` classes."""
    new = copy.deepcopy(decoder)
    new.seg_layers = nn.ModuleList(type(c)(c.in_channels, num_classes, 1, 1, 0, bias=True) for c in decoder.seg_layers)
    he_initialise(new.seg_layers)
    if hasattr(new, "num_classes"):
        new.num_classes = num_classes
    return new


class TaskDecoder(nn.Module):
    """A decoder for one task with its channel -> global label map and its calibration temperature (buffers)."""

    def __init__(self, decoder: nn.Module, class_map: Sequence[int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("class_map", torch.tensor(list(class_map), dtype=torch.long))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, skips):
        return self.decoder(skips)


class EncoderDecoders(nn.Module):
    """A shared encoder and one `TaskDecoder` per task (see the module docstring)."""

    def __init__(self, encoder: nn.Module, num_classes: int, min_confidence: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleDict()
        self.tasks: list[str] = []
        self.num_classes = int(num_classes)
        self.min_confidence = float(min_confidence)
        self.active: str | None = None
        #: the merge's decoders for the next images (None: all); `FrozenEncoderDecoders.gate_parts` sets it per image
        self.allowed: list[str] | None = None
        self.encoder_frozen = False

    def add(self, task: str, decoder: TaskDecoder) -> None:
        if task in self.tasks:
            raise ValueError(f"task {task!r} already has a decoder")
        self.decoders[head_key(task)] = decoder
        self.tasks.append(task)

    def decoder(self, task: str) -> TaskDecoder:
        if task not in self.tasks:
            raise KeyError(f"no decoder for task {task!r}; decoders: {self.tasks}")
        return self.decoders[head_key(task)]

    def replace(self, task: str, decoder: TaskDecoder) -> None:
        self.decoder(task)
        self.decoders[head_key(task)] = decoder

    def extended(self, num_classes: int) -> EncoderDecoders:
        """A new wrapper sharing the encoder and the decoders (so the trainer rebuilds its optimizer after `add`)."""
        new = EncoderDecoders(self.encoder, num_classes, self.min_confidence)
        for task in self.tasks:
            new.add(task, self.decoder(task))
        new.encoder_frozen = self.encoder_frozen
        new.train(self.training)
        return new

    def forward(self, x: torch.Tensor):
        skips = self.encoder(x)
        if self.active is not None:
            return self.decoder(self.active)(skips)
        tasks = self.merged_tasks()
        outputs = []
        for task in tasks:
            out = self.decoder(task)(skips)
            outputs.append(out[0] if isinstance(out, (list, tuple)) else out)
        return merge_decoders(outputs, [self.decoder(t).class_map.tolist() for t in tasks],
                              [float(self.decoder(t).temperature) for t in tasks], self.num_classes,
                              self.min_confidence)

    def merged_tasks(self) -> list[str]:
        """The decoders the merge uses: every task's, or those ``allowed`` (a gate that leaves none is a bug)."""
        if self.allowed is None:
            return list(self.tasks)
        tasks = [t for t in self.tasks if t in self.allowed]
        if not tasks:
            raise ValueError(f"the gate allows none of the decoders {self.tasks} (allowed: {self.allowed})")
        return tasks

    def freeze(self, frozen_tasks: Sequence[str], freeze_encoder: bool) -> None:
        """No gradients (so SGD leaves them bitwise unchanged) for the encoder and the given tasks' decoders."""
        self.encoder.requires_grad_(not freeze_encoder)
        self.encoder_frozen = freeze_encoder
        for task in self.tasks:
            self.decoder(task).requires_grad_(task not in frozen_tasks)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.train(False)
        return self

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, active={self.active!r}, num_classes={self.num_classes}"


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_flops(encoder: nn.Module, decoder: nn.Module, patch_size: Sequence[int], in_channels: int) -> int:
    """Floating-point operations of one decoder forward on one patch (torch's FLOP counter; the encoder's skips are
    computed outside the count)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(encoder.parameters()).device
    with torch.no_grad():
        skips = encoder(torch.zeros(1, in_channels, *patch_size, device=device))
        was = getattr(decoder, "deep_supervision", False)
        set_deep_supervision(decoder, False)
        with FlopCounterMode(display=False) as counter:
            decoder(skips)
        set_deep_supervision(decoder, was)
    return int(counter.get_total_flops())


def encoder_flops(encoder: nn.Module, patch_size: Sequence[int], in_channels: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    device = next(encoder.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, in_channels, *patch_size, device=device))
    return int(counter.get_total_flops())

