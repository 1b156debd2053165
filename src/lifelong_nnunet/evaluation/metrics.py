"""Per-case metrics computed with MONAI, one row per (label, metric).

Overlap metrics (Dice, IoU) count voxels; boundary metrics (normalised surface Dice at a tolerance, HD95)
measure distances in millimetres, so they need the voxel spacing in the array's axis order. Conventions and
formulas: docs/metrics.md.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserInputError


@dataclass(frozen=True)
class MetricSpec:
    """What the rest of the code needs to know about a metric, in one place: its display name, its direction
    (continual metrics such as forgetting, BWT and FWT are oriented with it, see continual.py), its unit ("" for
    unitless metrics, which lie in 0..1 so plots use a fixed scale) and whether it measures distances (and so needs
    the voxel spacing)."""
    name: str
    display: str
    higher_is_better: bool = True
    unit: str = ""
    boundary: bool = False

    @property
    def bounded(self) -> bool:
        """Lies in 0..1 (a fixed plot scale compares runs by eye)."""
        return not self.unit

    @property
    def label(self) -> str:
        """``HD95 (mm)``: the display name with its unit, for table rows and axes."""
        return self.display + (f" ({self.unit})" if self.unit else "")


# Every metric score_case can compute, in the order its rows come out.
METRIC_SPECS = {spec.name: spec for spec in (
    MetricSpec("dice", "Dice"),
    MetricSpec("iou", "IoU"),
    MetricSpec("nsd", "NSD", boundary=True),
    MetricSpec("hd95", "HD95", higher_is_better=False, unit="mm", boundary=True),
)}
METRICS = tuple(METRIC_SPECS)
BOUNDARY_METRICS = tuple(m for m, spec in METRIC_SPECS.items() if spec.boundary)
# Distances a results.csv written elsewhere may hold without a spec here: lower is better.
_OTHER_DISTANCES = ("hd", "assd", "asd", "masd")
DEFAULT_NSD_TOLERANCE_MM = 2.0


def metric_spec(name: str) -> MetricSpec:
    """The spec of ``name``; a metric this version does not compute (a results.csv or summary from elsewhere) is
    shown under its own name, lower-is-better when it is a known distance."""
    return METRIC_SPECS.get(name) or MetricSpec(name, name, higher_is_better=name not in _OTHER_DISTANCES)


def score_case(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: dict[str, int],
    metrics: Sequence[str] = ("dice", "iou"),
    spacing: Sequence[float] | None = None,
    nsd_tolerance_mm: float | Mapping[str, float] = DEFAULT_NSD_TOLERANCE_MM,
) -> list[dict]:
    """Score one predicted label map against its reference, per foreground label.

    ``pred`` and ``ref`` are integer label maps of the same shape; ``labels`` maps a label name to its
    integer value (an nnU-Net ``dataset.json`` "labels" entry works: the value 0, background, is skipped
    because continual metrics are over foreground structures only). ``metrics`` picks from ``METRICS``; the
    default stays the two overlap metrics, which need no spacing.

    ``spacing`` is the voxel size in mm *per array axis, in the array's axis order* (nnU-Net's SimpleITKIO
    gives arrays as z, y, x and its ``properties["spacing"]`` in that same order). It is required for "nsd"
    and "hd95": a distance in voxels silently reported as mm would be wrong on every anisotropic image.
    ``nsd_tolerance_mm`` is one tolerance for every label, or a mapping of label name to tolerance that may
    hold a "default" key (see ``nsd_tolerances``).

    Empty-label convention (documented in docs/metrics.md): a label absent from both prediction and reference
    scores Dice = IoU = NSD = 1 and HD95 = 0 (predicting nothing was correct). A label present in only one of
    them scores Dice = IoU = NSD = 0 and HD95 = NaN: there is no finite distance to an empty surface, and a
    made-up penalty in mm would depend on the image size. NaN HD95 rows are excluded from means and counted.

    Returns dicts with keys ``label`` (name), ``metric`` and ``value`` (float), label by label.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known are {list(METRICS)}")
    boundary = [m for m in BOUNDARY_METRICS if m in metrics]
    if boundary:
        spacing = _check_spacing(spacing, pred.ndim, boundary)
    fg = [(name, value) for name, value in labels.items() if value != 0]
    if not fg:
        return []
    # imported here: importing MONAI takes seconds, which validating a spec (experiment.py) need not pay
    from monai.metrics import compute_dice, compute_iou

    y_pred, y = _one_hot(pred, [v for _, v in fg]), _one_hot(ref, [v for _, v in fg])
    scores: dict[str, list[float]] = {}
    if "dice" in metrics:
        scores["dice"] = compute_dice(y_pred, y, include_background=False, ignore_empty=False)[0].tolist()
    if "iou" in metrics:
        scores["iou"] = compute_iou(y_pred, y, include_background=False, ignore_empty=False)[0].tolist()
    if boundary:
        tolerance = nsd_tolerances(nsd_tolerance_mm, [name for name, _ in fg]) if "nsd" in metrics else {}
        scores.update(_boundary_scores(y_pred, y, [name for name, _ in fg], boundary, spacing, tolerance))
    return [
        {"label": name, "metric": metric, "value": float(scores[metric][c])}
        for c, (name, _) in enumerate(fg)
        for metric in METRICS
        if metric in metrics
    ]


def nsd_tolerances(
    tolerance_mm: float | Mapping[str, float], label_names: Sequence[str], known_labels: Sequence[str] | None = None
) -> dict[str, float]:
    """The NSD tolerance in mm of each label in ``label_names``.

    A number applies to every label. A mapping gives label name -> mm, with an optional "default" for the
    labels it does not name. A label with neither is an error rather than a silent fallback, and so is a key
    that names no label of ``known_labels`` (all tasks' label names, when given): a misspelt label would
    otherwise quietly get the default tolerance.
    """
    if not isinstance(tolerance_mm, Mapping):
        return {name: float(tolerance_mm) for name in label_names}
    if known_labels is not None:
        stray = sorted(set(tolerance_mm) - set(known_labels) - {"default"})
        if stray:
            raise UserInputError(
                f"evaluation.nsd_tolerance_mm names label(s) {stray} that no task has (labels: "
                f"{sorted(set(known_labels) - {'background'})}). Fix the spelling or remove them.")
    missing = [name for name in label_names if name not in tolerance_mm and "default" not in tolerance_mm]
    if missing:
        raise UserInputError(
            f"evaluation.nsd_tolerance_mm gives no tolerance for label(s) {missing}. Add them, or a 'default' key "
            f"for every label not named.")
    return {name: float(tolerance_mm.get(name, tolerance_mm.get("default"))) for name in label_names}


def _boundary_scores(y_pred: torch.Tensor, y: torch.Tensor, names: list[str], metrics: list[str],
                     spacing: tuple[float, ...], tolerance: dict[str, float]) -> dict[str, list[float]]:
    """NSD and HD95 per label with MONAI; labels empty on either side get the documented convention values
    directly, so MONAI is only asked where both surfaces exist (it would warn and return NaN/inf otherwise)."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    in_pred = y_pred[0, 1:].flatten(1).any(1).tolist()
    in_ref = y[0, 1:].flatten(1).any(1).tolist()
    scores = {"nsd": [1.0 if not (p or r) else 0.0 for p, r in zip(in_pred, in_ref)],
              "hd95": [0.0 if not (p or r) else math.nan for p, r in zip(in_pred, in_ref)]}
    both = [c for c, (p, r) in enumerate(zip(in_pred, in_ref)) if p and r]
    if both:
        channels = [0] + [c + 1 for c in both]  # keep the background channel: include_background=False drops it
        sub_pred, sub_ref = y_pred[:, channels], y[:, channels]
        flat = [a for a, n in enumerate(sub_pred.shape[2:]) if n == 1]
        if flat and sub_pred.ndim - 2 - len(flat) >= 2:
            # a 2D image as nnU-Net reads it (1, y, x): in 3D every pixel of a one-slice mask would be surface,
            # so measure contours in the plane instead
            sub_pred, sub_ref = (t.squeeze(tuple(a + 2 for a in flat)) for t in (sub_pred, sub_ref))
            spacing = tuple(s for a, s in enumerate(spacing) if a not in flat)
        with warnings.catch_warnings():  # MONAI 1.6 calls its own deprecated argument; nothing for users to fix
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            if "nsd" in metrics:
                nsd = compute_surface_dice(sub_pred, sub_ref, class_thresholds=[tolerance[names[c]] for c in both],
                                           include_background=False, spacing=spacing)[0].tolist()
                for c, value in zip(both, nsd):
                    scores["nsd"][c] = value
            if "hd95" in metrics:
                hd = compute_hausdorff_distance(sub_pred, sub_ref, include_background=False, percentile=95,
                                                spacing=spacing)[0].tolist()
                for c, value in zip(both, hd):
                    scores["hd95"][c] = value
    return {m: scores[m] for m in metrics}


def _check_spacing(spacing: Sequence[float] | None, ndim: int, needed_by: list[str]) -> tuple[float, ...]:
    if spacing is None:
        raise ValueError(f"{needed_by} are distances in mm and need the voxel spacing (one value per array axis)")
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers, one per array axis; got {list(spacing)}")
    return values


def _one_hot(seg: np.ndarray, values: list[int]) -> torch.Tensor:
    """[1, 1 + len(values), ...] uint8 one-hot; channel 0 is background so MONAI's multi-channel path is used
    even for a single foreground label (its one-channel path reads the channel as class indices)."""
    fg = np.stack([seg == v for v in values])
    return torch.from_numpy(np.concatenate([~fg.any(axis=0, keepdims=True), fg]).astype(np.uint8))[None]
