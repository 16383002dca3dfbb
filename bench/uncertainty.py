"""Intervals on the suite's figures: a bootstrap confidence interval of the median of each cell's repetitions, and of
the ratio of two cells' medians (a cell's speed over the same run's full cache).

On a shared machine repetitions of one cell move by 2-3x and on an H100 by 15%, so a median alone ranks methods by
noise. Every speed and energy figure of the report therefore carries an interval and its number of repetitions, and
two cells are called different only where their intervals do not overlap (`separated`).

With one sample there is no interval (`lo == hi == median`, `n == 1`); with two the bootstrap of a median can only
return the samples themselves, so the interval is their min and max; from three on it is scipy's percentile
bootstrap (BCa needs a jackknife that degenerates on a handful of ties).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

#: Confidence level of every interval in the report.
CONFIDENCE = 0.95
#: Bootstrap resamples: the interval's ends move by well under 1% between seeds at the sample sizes here (3-10).
RESAMPLES = 2000
SEED = 0
# scipy >= 1.15 takes `rng`; the older releases that pyproject allows take `random_state`.
_SEED_ARG = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"


def _bootstrap(data: tuple, statistic, confidence: float, **kw) -> tuple[float, float]:
    res = bootstrap(data, statistic, confidence_level=confidence, n_resamples=RESAMPLES, method="percentile",
                    **{_SEED_ARG: np.random.default_rng(SEED)}, **kw)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class Estimate:
    """A median with its confidence interval over `n` samples (NaN everywhere when there is no sample)."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def missing(cls) -> Estimate:
        return cls(math.nan, math.nan, math.nan, 0)

    @property
    def known(self) -> bool:
        return self.n > 0 and math.isfinite(self.median)

    def scale(self, factor: float) -> Estimate:
        """The same estimate in other units (factor > 0)."""
        return Estimate(self.median * factor, self.lo * factor, self.hi * factor, self.n)


def _clean(samples: Sequence[float] | np.ndarray | None) -> np.ndarray:
    if samples is None:
        return np.array([], dtype=float)
    values = np.asarray([np.nan if s is None else s for s in np.ravel(np.asarray(samples, dtype=object))], dtype=float)
    return values[np.isfinite(values)]


def median_ci(samples: Sequence[float] | np.ndarray | None, *, confidence: float = CONFIDENCE) -> Estimate:
    """The median of `samples` (None and NaN dropped) and its bootstrap confidence interval."""
    x = _clean(samples)
    if len(x) == 0:
        return Estimate.missing()
    med = float(np.median(x))
    if len(x) <= 2 or np.ptp(x) == 0:
        return Estimate(med, float(x.min()), float(x.max()), len(x))
    lo, hi = _bootstrap((x,), np.median, confidence)
    return Estimate(med, min(lo, med), max(hi, med), len(x))


def ratio_ci(num: Sequence[float] | np.ndarray | None, den: Sequence[float] | np.ndarray | None, *,
             confidence: float = CONFIDENCE) -> Estimate:
    """median(num) / median(den) and its interval, both samples resampled independently (two cells' repetitions
    are not paired). With fewer than two samples on a side the interval is the ratio of the extremes."""
    a, b = _clean(num), _clean(den)
    if len(a) == 0 or len(b) == 0 or np.median(b) == 0:
        return Estimate.missing()
    med = float(np.median(a) / np.median(b))
    n = min(len(a), len(b))
    if len(a) < 3 or len(b) < 3 or b.min() <= 0:
        lo, hi = (a.min() / b.max(), a.max() / b.min()) if b.min() > 0 else (math.nan, math.nan)
        return Estimate(med, float(min(lo, med)), float(max(hi, med)), n)

    def stat(x, y, axis=-1):
        return np.median(x, axis=axis) / np.median(y, axis=axis)

    lo, hi = _bootstrap((a, b), stat, confidence, vectorized=True)
    return Estimate(med, min(lo, med), max(hi, med), n)


def separated(a: Estimate, b: Estimate) -> bool:
    """True when the two intervals do not overlap (a difference the repetitions support); False when either has a
    single sample, which supports no claim."""
    if not (a.known and b.known) or a.n < 2 or b.n < 2:
        return False
    return a.lo > b.hi or b.lo > a.hi
