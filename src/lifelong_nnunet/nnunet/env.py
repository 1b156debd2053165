"""nnU-Net's folder variables, set in-process so users never export them.

nnunetv2 2.8 reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` lazily from ``os.environ``, so a
context manager is enough. The CPU-friendly worker settings are set here too. ``nnUNet_n_proc_DA`` stays >= 1 outside
training: nnunetv2 2.8.1's experiment planner calls ``torch.set_num_threads`` with it, and 0 threads breaks it
(measured); training sets its own count (`augmentation_workers`, used by ``stages.training.StageTraining.stage_env``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserInputError

DEFAULTS = {"nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f"}


@contextlib.contextmanager
def nnunet_env(raw: Path | None = None, preprocessed: Path | None = None, results: Path | None = None,
               **extra: str) -> Iterator[None]:
    """Temporarily point nnU-Net at our folders (and set worker counts); restore the caller's environment after."""
    wanted = {k: os.environ.get(k, v) for k, v in DEFAULTS.items()}  # the user's own settings win
    for name, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", preprocessed), ("nnUNet_results", results)):
        if value is not None:
            wanted[name] = str(value)
    wanted.update(extra)
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Augmentation workers for training on CPU when the user sets none: the count measured fastest per training
# iteration on 2 idle cores (benchmarks/results/augmentation_workers.md: 0 workers 0.35 s, 1 worker 0.41 s, 2
# workers 0.35 s per iteration of the demo, medians of 2 interleaved rounds), so augmentation stays in the main
# process. (On a machine loaded by other jobs 1 worker measured faster: a second process takes a larger share of a
# contended CPU.)
CPU_AUGMENTATION_WORKERS = 0


def augmentation_workers(device: torch.device) -> str:
    """``nnUNet_n_proc_DA`` for training: the user's own setting if any; else on CUDA nnU-Net's default for the
    machine (its table by host name, 12 elsewhere, at most the CPU count), where augmentation is the bottleneck and
    a GPU fed by the main process alone would wait; else `CPU_AUGMENTATION_WORKERS`. Every count is reproducible
    (``nnunet.trainer.SeededBatches``)."""
    user = os.environ.get("nnUNet_n_proc_DA")
    if user is not None:
        if not user.strip().isdigit():
            raise UserInputError(f"The environment variable nnUNet_n_proc_DA is {user!r}; it must be a whole "
                                 "number >= 0 (the data-augmentation worker processes; 0 augments in the main "
                                 "process). Set it to a number, or unset it for the default.")
        return user.strip()
    if device.type == "cuda":
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        return str(get_allowed_n_proc_DA())
    return str(CPU_AUGMENTATION_WORKERS)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. An explicit ``cuda`` without a GPU is a user error upstream."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
