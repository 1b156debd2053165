"""nnU-Net's folder variables, set in-process so users never export them.

nnunetv2 2.8 reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` lazily from ``os.environ``, so a
context manager is enough. The CPU-friendly worker settings are set here too. ``nnUNet_n_proc_DA`` stays >= 1 outside
training: nnunetv2 2.8.1's experiment planner calls ``torch.set_num_threads`` with it, and 0 threads breaks it
(measured); training sets 0 itself, to augment in the main process (``runner.StageContext.stage_env``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. An explicit ``cuda`` without a GPU is a user error upstream."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
