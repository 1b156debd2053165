"""Per-case overlap metrics (Dice, IoU) computed with MONAI, one row per (label, metric)."""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

METRICS = ("dice", "iou")


def score_case(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int]) -> list[dict]:
    """Score one predicted label map against its reference, per foreground label.

    ``pred`` and ``ref`` are integer label maps of the same shape; ``labels`` maps a label name to its
    integer value (an nnU-Net ``dataset.json`` "labels" entry works: the value 0, background, is skipped
    because continual metrics are over foreground structures only).

    Empty-label convention (MONAI ``ignore_empty=False``; its default ``True`` would give NaN instead):
    a label absent from both prediction and reference scores Dice = IoU = 1.0, since predicting nothing
    is correct there; a label absent from the reference but predicted scores 0.0. This keeps every row a
    number, so a model that hallucinates a structure on a case without it is penalised rather than ignored.

    Returns dicts with keys ``label`` (name), ``metric`` ("dice" | "iou") and ``value`` (float).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    fg = [(name, value) for name, value in labels.items() if value != 0]
    if not fg:
        return []
    y_pred, y = _one_hot(pred, [v for _, v in fg]), _one_hot(ref, [v for _, v in fg])
    scores = {
        "dice": compute_dice(y_pred, y, include_background=False, ignore_empty=False)[0],
        "iou": compute_iou(y_pred, y, include_background=False, ignore_empty=False)[0],
    }
    return [
        {"label": name, "metric": metric, "value": float(scores[metric][c])}
        for c, (name, _) in enumerate(fg)
        for metric in METRICS
    ]


def _one_hot(seg: np.ndarray, values: list[int]) -> torch.Tensor:
    """[1, 1 + len(values), ...] uint8 one-hot; channel 0 is background so MONAI's multi-channel path is used
    even for a single foreground label (its one-channel path reads the channel as class indices)."""
    fg = np.stack([seg == v for v in values])
    return torch.from_numpy(np.concatenate([~fg.any(axis=0, keepdims=True), fg]).astype(np.uint8))[None]
