"""Paired comparison of two methods over the same orderings and seeds: mean difference and a bootstrap CI.

Why paired: two methods run on the same task ordering with the same seed share the data order, the test split
and the initial weights, so the per-pair difference removes most of the ordering/seed variation that would
swamp an unpaired comparison of the two means.

Why a *simple* percentile bootstrap: it needs no distributional assumption and is a few lines of numpy. It is
simple because it resamples the n paired differences as if they were independent draws and reads the CI
straight off the percentiles of the resampled means, with no bias or skew correction (BCa) and no
studentisation. What it does not guarantee:

- nominal coverage. With few pairs the resampled means can only take a handful of values and their spread
  underestimates the sampling spread (it uses the plug-in variance, too small by a factor (n-1)/n), so the
  interval is too narrow: a 95% CI covers the truth less than 95% of the time.
- a minimum sample size. When all n differences have the same sign the CI excludes 0 for any n >= 2, however
  small the differences; an exact sign-flip test cannot reach p < 0.05 with fewer than 6 pairs.
- independence. Pairs that share an ordering (or a seed) are not independent draws; the bootstrap treats them
  as if they were.

So a verdict other than "not separable" means "separable at this confidence under these caveats", not proof;
report n and the interval next to it (the comparison report does).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

A_BETTER, B_BETTER, NOT_SEPARABLE, TOO_FEW = "A better", "B better", "not separable", "too few pairs"


@dataclass(frozen=True)
class PairedComparison:
    """Result of ``paired_bootstrap``: ``mean_diff`` is mean(a - b); the CI bounds are NaN with fewer than 2 pairs."""
    mean_diff: float
    ci_low: float
    ci_high: float
    n_pairs: int
    confidence: float
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    higher_is_better: bool = True,
) -> PairedComparison:
    """Percentile bootstrap CI of the mean paired difference d_i = a_i - b_i.

    ``a[i]`` and ``b[i]`` must come from the same ordering and seed. Pairs with a NaN on either side are
    dropped (an unfinished run cannot be paired). Draw ``n_boot`` resamples of the n differences with
    replacement (seeded: the same inputs always give the same interval), take each resample's mean, and use
    the (1-confidence)/2 and (1+confidence)/2 percentiles of those means as the interval.

    The verdict names a side only when the interval excludes 0: "A better" if it lies above 0 ("B better"
    below), with ``higher_is_better=False`` (e.g. a distance) the other way round; otherwise "not separable".
    With fewer than 2 pairs there is nothing to resample: "too few pairs".
    """
    a_arr, b_arr = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired values need equal lengths, got {a_arr.size} and {b_arr.size}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    diffs = (a_arr - b_arr)[~(np.isnan(a_arr) | np.isnan(b_arr))]
    n = int(diffs.size)
    mean = float(diffs.mean()) if n else float("nan")
    if n < 2:
        return PairedComparison(mean, float("nan"), float("nan"), n, confidence, TOO_FEW)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = (float(v) for v in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    if low > 0:
        verdict = A_BETTER if higher_is_better else B_BETTER
    elif high < 0:
        verdict = B_BETTER if higher_is_better else A_BETTER
    else:
        verdict = NOT_SEPARABLE
    return PairedComparison(mean, low, high, n, confidence, verdict)
