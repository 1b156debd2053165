"""One nnU-Net network with one output head per task, sharing a body.

`MultiHeadNetwork` wraps an nnU-Net ``PlainConvUNet`` (or any network with ``.encoder`` and a ``UNetDecoder``-like
``.decoder`` with ``.stages``, ``.transpconvs``, ``.seg_layers``). Where the network splits into body and head is
set by ``split``:

- ``"seg_layers"``: the heads are the decoder's 1x1x1 segmentation layers (one per deep-supervision resolution);
  encoder and decoder convolutions are shared.
- ``"decoder"``: the heads are whole decoders (transposed convolutions, convolution blocks and segmentation
  layers); only the encoder is shared. nnU-Net's decoder holds a reference to the encoder; a head does not keep it
  (so the encoder's weights exist once per head-less body, not once per head).

The heads live in ``heads`` (an ``nn.ModuleDict`` keyed by `head_key`, a dot-free form of the task name); ``active``
names the task whose head ``forward`` uses. `single_head_view` returns a module of the wrapped network's own class
whose submodules are the body plus one head (parameters shared, nothing copied), so its ``state_dict()`` has
exactly the keys of a stock nnU-Net network: nnU-Net's predictor and a stock ``checkpoint_final.pth`` accept it.

Views are built with shallow copies of the modules (a new module object with its own table of children that point
to the same submodules and parameters). ``forward`` builds a fresh view per call, so flags the trainer sets on the
wrapper's modules (``deep_supervision``, ``training``) always reach it.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .shallow import shallow_copy

SPLITS = ("seg_layers", "decoder")
_RESERVED = nn.ModuleDict()


def head_key(task: str) -> str:
    """The ``heads`` key of a task: the name with every character outside [A-Za-z0-9_] replaced by ``_``
    (``state_dict`` keys are dot-separated), prefixed with ``task_`` where it would clash with a module attribute."""
    key = re.sub(r"[^0-9A-Za-z_]", "_", str(task))
    if not key or hasattr(_RESERVED, key):
        key = "task_" + key
    return key


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` (``._orig_mod``; nnU-Net compiles the network when nnUNet_compile is
    on) and DDP (``.module``) wrappers, however they are nested."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        else:
            return network


class MultiHeadNetwork(nn.Module):
    """A shared body and one head per task (see the module docstring).

    ``MultiHeadNetwork(base, tasks, split)`` splits ``base`` (not modified; parameters are shared, not copied): the
    first task's head is ``base``'s own head, every further task's head starts as an exact copy of the previous one.
    """

    def __init__(self, base: nn.Module, tasks: Sequence[str], split: str = "seg_layers") -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        tasks = list(dict.fromkeys(tasks))
        if not tasks:
            raise ValueError("a MultiHeadNetwork needs at least one task")
        base = unwrap(base)
        if not (hasattr(base, "encoder") and hasattr(getattr(base, "decoder", None), "seg_layers")):
            raise TypeError(f"{type(base).__name__} has no .encoder and .decoder.seg_layers; MultiHeadNetwork wraps "
                            f"nnU-Net's U-Net architectures (PlainConvUNet, ResidualEncoderUNet)")
        body = shallow_copy(base)
        if split == "seg_layers":
            decoder = shallow_copy(base.decoder)
            first = decoder._modules.pop("seg_layers")
            body._modules["decoder"] = decoder
        else:
            first = shallow_copy(body._modules.pop("decoder"))
            first._modules.pop("encoder", None)  # the shared encoder stays in the body only
        self._init_parts(body, split)
        self._register(tasks[0], first)
        for task in tasks[1:]:
            self.add_head(task)

    # ---- construction ---------------------------------------------------------------------------------------
    def _init_parts(self, body: nn.Module, split: str) -> None:
        self.split = split
        self.body = body
        self.heads = nn.ModuleDict()
        self.tasks: list[str] = []
        self.active: str | None = None
        self.body_frozen = False

    def _register(self, task: str, head: nn.Module) -> None:
        key = head_key(task)
        if task in self.tasks:
            raise ValueError(f"task {task!r} already has a head")
        if key in self.heads:
            raise ValueError(f"task names {task!r} and {self._task_of(key)!r} map to the same head key {key!r}")
        self.heads[key] = head
        self.tasks.append(task)
        if self.active is None:
            self.active = task

    def _task_of(self, key: str) -> str:
        return next(t for t in self.tasks if head_key(t) == key)

    def add_head(self, task: str, copy_from: str | None = None) -> nn.Module:
        """Add a head for ``task`` (in place), an exact copy of ``copy_from``'s head (default: the last head)."""
        source = self.head(copy_from if copy_from is not None else self.tasks[-1])
        head = copy.deepcopy(source)
        self._register(task, head)
        return head

    def with_tasks(self, tasks: Sequence[str]) -> MultiHeadNetwork:
        """A network with exactly one head per task in ``tasks``: ``self`` when it already is one, else a new wrapper
        sharing the body and the existing heads, where each new task's head is a copy of the head before it (the
        new object lets the trainer rebuild its optimizer over the new parameters)."""
        tasks = list(dict.fromkeys(tasks))
        if tasks == self.tasks or not tasks:
            return self
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new._init_parts(self.body, self.split)
        new.training = self.training
        for task in tasks:
            if task in self.tasks:
                new._register(task, self.head(task))
            elif new.tasks:
                new.add_head(task)
            else:
                new._register(task, copy.deepcopy(self.head(self.tasks[-1])))
        new.active = self.active if self.active in new.tasks else new.tasks[-1]
        new.body_frozen = self.body_frozen
        return new

    # ---- access ---------------------------------------------------------------------------------------------
    def head(self, task: str) -> nn.Module:
        if task not in self.tasks:
            raise KeyError(f"no head for task {task!r}; heads: {self.tasks}")
        return self.heads[head_key(task)]

    def set_active(self, task: str) -> None:
        self.head(task)
        self.active = task

    def single_head_view(self, task: str | None = None) -> nn.Module:
        """The wrapped network's class with the body and ``task``'s head (default: the active one), parameters
        shared: a stock nnU-Net network as far as ``forward`` and ``state_dict`` go."""
        head = self.head(task if task is not None else self.active)
        view = shallow_copy(self.body)
        if self.split == "seg_layers":
            decoder = shallow_copy(self.body.decoder)
            decoder._modules["seg_layers"] = head
        else:
            decoder = shallow_copy(head)
            decoder._modules = type(head._modules)({"encoder": self.body.encoder, **head._modules})
        view._modules["decoder"] = decoder
        return view

    def forward(self, x: torch.Tensor):
        return self.single_head_view(self.active)(x)

    # ---- frozen body ----------------------------------------------------------------------------------------
    def body_parameters(self):
        return self.body.parameters()

    def freeze_body(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) everything but the heads: no gradients, and the body in eval mode (normalisation
        statistics and dropout fixed; nnU-Net's InstanceNorm keeps no running statistics, so that part only
        matters for other norm layers)."""
        for p in self.body.parameters():
            p.requires_grad_(not frozen)
        self.body_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.body_frozen:
            self.body.train(False)
        return self

    def extra_repr(self) -> str:
        return f"split={self.split!r}, tasks={self.tasks}, active={self.active!r}, body_frozen={self.body_frozen}"


# ---- automatic head choice -----------------------------------------------------------------------------------
def _entropy_and_foreground(probabilities, channel_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(probabilities) if not torch.is_tensor(probabilities) else probabilities).float()
    n = p.shape[channel_axis]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(channel_axis) / math.log(max(n, 2))
    return entropy, p.argmax(channel_axis) > 0


def mean_entropy(probabilities: Sequence, channel_axis: int = 0) -> list[float]:
    """Mean normalised predictive entropy (0: certain, 1: uniform) of each head's class probabilities, over the
    voxels that any head labels foreground (the whole image when none does).

    The common region makes the heads comparable (each is judged on the same voxels) and keeps the easy background,
    which every head predicts confidently, from diluting the difference."""
    maps = [_entropy_and_foreground(p, channel_axis) for p in probabilities]
    return _scores(maps)


def _scores(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    region = maps[0][1].clone()
    for _, fg in maps[1:]:
        region |= fg
    if not bool(region.any()):
        region = torch.ones_like(region)
    return [float(entropy[region].mean()) for entropy, _ in maps]


def choose_head(network: MultiHeadNetwork, segment_with: Callable[[nn.Module], object],
                tasks: Sequence[str] | None = None, channel_axis: int = 0) -> tuple[str, dict[str, float]]:
    """The task whose head is least uncertain about one image (see `mean_entropy`), and every candidate's score.

    ``segment_with(module)`` returns that module's class probabilities for the image (channels first; numpy or
    torch). Candidates: the heads of ``tasks`` (default: all heads). Only one entropy map and foreground mask per
    head are kept, not the probabilities."""
    candidates = [t for t in (tasks if tasks is not None else network.tasks) if t in network.tasks] \
        or list(network.tasks)
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return candidates[0], {candidates[0]: float("nan")}
    maps = [_entropy_and_foreground(segment_with(network.single_head_view(t)), channel_axis) for t in candidates]
    scores = dict(zip(candidates, _scores(maps)))
    return min(candidates, key=lambda t: (scores[t], candidates.index(t))), scores


class AutoHeadNetwork(nn.Module):
    """Chooses the head by itself on every forward call: runs every head and returns the output of the one with the
    lowest `mean_entropy` on that input (for nnU-Net's sliding window: per tile). ``last_choice`` records the pick.

    Per-case choice (one head for the whole image, as ``predict`` does) is `choose_head`; this module is the
    fallback for code that only takes a network."""

    def __init__(self, network: MultiHeadNetwork, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.network = network
        self.tasks = [t for t in (tasks or network.tasks) if t in network.tasks] or list(network.tasks)
        self.last_choice: str | None = None

    def forward(self, x: torch.Tensor):
        outputs = [self.network.single_head_view(t)(x) for t in self.tasks]
        maps = [_entropy_and_foreground(torch.softmax((o[0] if isinstance(o, (list, tuple)) else o).float(), 1), 1)
                for o in outputs]
        scores = _scores(maps)
        best = int(np.argmin(scores))
        self.last_choice = self.tasks[best]
        return outputs[best]
