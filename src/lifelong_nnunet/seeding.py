"""Seeding of every random generator a stage draws from, in one place.

nnU-Net seeds neither its case sampling nor its augmentation nor the network's initialisation (measured: three
identical runs from the same weights differed by up to 0.1 Dice). Reproducible and bitwise-resumable runs therefore
reseed Python's, numpy's and torch's global generators from a tuple of integers that names the point in the run
(seed, stage, epoch, ...), so the same point always draws the same numbers, reached in one go or after a restart.
Nothing here is specific to nnU-Net: the trainer, the run loop and the methods all seed through this module.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(*parts: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` from ``parts`` (mixed by numpy's SeedSequence, so (0, 1) and (1, 0)
    give unrelated streams)."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
