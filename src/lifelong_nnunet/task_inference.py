"""Task inference: which stage's data does an image look like, and does it look like any of them?

A deployed multi-head model is not told the site an image comes from. After each stage this module keeps a compact
description of what that stage's images look like, and at prediction time picks the stage whose description explains
the image best (the idea of UNEG's per-stage autoencoders, González et al. 2023, with cheaper statistics: a Gaussian
per stage scored by the Mahalanobis distance, as Lee et al. 2018 do for out-of-distribution detection).

What is described: statistics of the image *after nnU-Net's preprocessing* (the normalised, resampled array the
network sees): per channel, nine intensity quantiles and the mean absolute difference between neighbouring voxels
along each axis (noise, blur, slice thickness). Why these and not the encoder's features: they need no network, so
they stay valid whatever later stages do to a shared body (``multihead`` keeps training it, so an earlier stage's
feature statistics would describe a body that no longer exists), and they cost one pass over the image instead of a
sliding-window forward pass per head. The contrast of a site survives nnU-Net's z-scoring in the shape of the
histogram (an inverted contrast swaps the tails), which is what the quantiles see.

What is stored: a `StageDescription` per task of a stage, parameters only (a mean vector, a covariance matrix, a
threshold, counts), as JSON in the stage's folder (`RunFolder.task_description`): a few kilobytes, never an image or
an array of voxels.

The out-of-distribution threshold is calibrated on held-out cases of the stage's training split, by leave-one-out:
each training case is scored by the Gaussian fitted on the others, so every calibration distance comes from a case
the fit it is scored against never saw (`fit_description`, `calibrate_threshold`). A stage has few cases (nnU-Net's
own validation split of the demo holds two per task, which gave a threshold that flagged a third of the new cases);
leave-one-out makes every training case a validation case once. Test cases are never used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Intensity quantiles per channel (of the normalised image).
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: Version of the feature definition: a description made with other features cannot score today's.
FEATURES_VERSION = 1
#: Images larger than this many voxels are strided before the statistics (they are smooth in the voxel count).
MAX_VOXELS = 2_000_000
#: Threshold = this factor times the largest validation distance (see `calibrate_threshold`).
THRESHOLD_FACTOR = 1.5
#: The rules `predict` offers without --task: the stage descriptions (default) and the heads' entropy (baseline).
TASK_CHOICES = ("description", "entropy")


def feature_names(n_channels: int, n_axes: int = 3) -> list[str]:
    names = []
    for c in range(n_channels):
        names += [f"c{c}_q{q:g}" for q in QUANTILES] + [f"c{c}_diff_axis{a}" for a in range(n_axes)]
    return names


def image_features(image: np.ndarray) -> np.ndarray:
    """The description's features of one preprocessed image (channels first, any number of spatial axes).

    Per channel: the `QUANTILES` of its voxels, and the mean absolute difference of neighbouring voxels along each
    spatial axis. Large images are strided to at most about `MAX_VOXELS` voxels first (the statistics barely move)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim < 2:
        raise ValueError(f"image of shape {image.shape}: expected channels first and at least one spatial axis")
    spatial = image.shape[1:]
    stride = max(1, int(np.ceil((np.prod(spatial) / MAX_VOXELS) ** (1 / len(spatial)))))
    if stride > 1:
        image = image[(slice(None), *(slice(None, None, stride),) * len(spatial))]
    out = []
    for channel in image:
        out.extend(np.quantile(channel, QUANTILES))
        out.extend(float(np.abs(np.diff(channel, axis=a)).mean()) if channel.shape[a] > 1 else 0.0
                   for a in range(channel.ndim))
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class StageDescription:
    """What one task's preprocessed training images look like: a Gaussian over `image_features`.

    ``mean`` and ``covariance`` are fitted on ``n_fit`` training cases; ``threshold`` is the Mahalanobis distance
    beyond which an image fits this task no better than an outlier, calibrated on ``n_calibration`` held-out
    distances (leave-one-out over the training cases, `fit_description`)."""
    task: str
    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    threshold: float
    n_fit: int
    n_calibration: int
    features_version: int = FEATURES_VERSION

    def distance(self, features: np.ndarray) -> float:
        """Mahalanobis distance of one image's features to this task's training images."""
        diff = np.asarray(features, dtype=np.float64) - np.asarray(self.mean)
        return float(np.sqrt(max(0.0, diff @ np.linalg.solve(np.asarray(self.covariance), diff))))

    def to_json(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "covariance": [list(r) for r in self.covariance]}

    @classmethod
    def from_json(cls, data: Mapping) -> StageDescription:
        return cls(task=str(data["task"]), mean=tuple(float(v) for v in data["mean"]),
                   covariance=tuple(tuple(float(v) for v in r) for r in data["covariance"]),
                   threshold=float(data["threshold"]), n_fit=int(data["n_fit"]),
                   n_calibration=int(data["n_calibration"]), features_version=int(data["features_version"]))


def shrunk_covariance(features: np.ndarray) -> np.ndarray:
    """Covariance of ``features`` (cases x features) shrunk towards its diagonal.

    A stage has tens of training cases for a few dozen features, so the sample covariance is singular or close to
    it. Weight ``d / (n + d)`` on the diagonal (``n`` cases, ``d`` features) keeps it invertible and tends to the
    sample covariance as cases grow; a variance floor relative to the mean variance keeps a constant feature (an
    empty channel) from dividing by zero."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    sample = np.cov(x, rowvar=False, ddof=1) if n > 1 else np.zeros((d, d))
    sample = np.atleast_2d(sample)
    diag = np.diag(np.diag(sample))
    weight = d / (n + d)
    floor = 1e-6 * (float(np.mean(np.diag(sample))) + 1e-12) + 1e-12
    return (1 - weight) * sample + weight * diag + floor * np.eye(d)


def calibrate_threshold(distances: Sequence[float]) -> float:
    """The OOD threshold from held-out distances: `THRESHOLD_FACTOR` times the largest one.

    ``distances`` are Mahalanobis distances of cases held out from the Gaussian that scores them (training cases
    left out one at a time; never test cases). The largest of ``n`` in-distribution distances is exceeded by a new
    in-distribution case with probability about 1/(n+1); with the few cases a stage has, the factor 1.5 leaves
    room for the spread the sample has not shown, while an image unlike every site lies many times further away
    (measured: docs/deploy.md)."""
    distances = [float(d) for d in distances]
    if not distances:
        raise ValueError("no validation distances to calibrate the threshold on")
    return THRESHOLD_FACTOR * max(distances)


def _gaussian(task: str, features: np.ndarray) -> StageDescription:
    cov = shrunk_covariance(features)
    return StageDescription(task, tuple(features.mean(axis=0)), tuple(map(tuple, cov)), float("inf"), len(features), 0)


def fit_description(task: str, features: Iterable[np.ndarray]) -> StageDescription:
    """A task's description from the features of its training cases (never its test cases): the Gaussian fitted on
    all of them, and the threshold calibrated by leave-one-out (each case's distance to the Gaussian of the others,
    `calibrate_threshold`). Needs 3 cases at least (two to fit, one held out)."""
    x = np.stack(list(features)).astype(np.float64)
    if len(x) < 3:
        raise ValueError(f"{task}: {len(x)} training case(s); a description needs 3 at least")
    held_out = [_gaussian(task, np.delete(x, i, axis=0)).distance(x[i]) for i in range(len(x))]
    full = _gaussian(task, x)
    return StageDescription(task, full.mean, full.covariance, calibrate_threshold(held_out), len(x), len(x))


@dataclass(frozen=True)
class TaskChoice:
    """The task chosen for one image, and how sure the choice is.

    ``margin``: the runner-up's score minus the winner's (Mahalanobis distances for the description rule, mean
    normalised entropies for the entropy rule): near 0 the two were almost tied. ``ood``: the image is further from
    the chosen task than that task's threshold (description rule only; None for the entropy rule, which has none)."""
    task: str
    rule: str
    margin: float
    scores: dict[str, float]
    ood: bool | None = None
    threshold: float | None = None

    def record(self, case: str) -> dict:
        """One row of the per-case file `predict` writes."""
        return {"case": case, "chosen_task": self.task, "rule": self.rule, "margin": self.margin,
                "score": self.scores.get(self.task), "threshold": self.threshold, "ood": self.ood,
                **{f"score_{t}": v for t, v in self.scores.items()}}


def choose(descriptions: Mapping[str, StageDescription], features: np.ndarray,
           tasks: Sequence[str] | None = None) -> TaskChoice:
    """The task whose description is nearest to ``features`` (ties: the earlier task), among ``tasks``
    (default: every described task)."""
    candidates = [t for t in (tasks if tasks is not None else descriptions) if t in descriptions]
    if not candidates:
        raise ValueError(f"no description for any of {list(tasks or [])}")
    scores = {t: descriptions[t].distance(features) for t in candidates}
    ranked = sorted(candidates, key=lambda t: (scores[t], candidates.index(t)))
    best = ranked[0]
    margin = scores[ranked[1]] - scores[best] if len(ranked) > 1 else float("inf")
    threshold = descriptions[best].threshold
    return TaskChoice(best, "description", margin, scores, bool(scores[best] > threshold), threshold)


def fits(descriptions: Mapping[str, StageDescription], features: np.ndarray) -> dict[str, bool]:
    """Per described task: whether the image lies within that task's out-of-distribution threshold (the test
    `choose` flags ``ood`` with, applied to every task rather than the nearest only)."""
    return {t: d.distance(features) <= d.threshold for t, d in descriptions.items()}


def entropy_choice(task: str, scores: Mapping[str, float]) -> TaskChoice:
    """A choice made by the entropy rule (`networks.multihead.choose_head`), in the same record."""
    ranked = sorted(scores.values())
    margin = ranked[1] - ranked[0] if len(ranked) > 1 else float("inf")
    return TaskChoice(task, "entropy", float(margin), {t: float(v) for t, v in scores.items()})
