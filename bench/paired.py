"""Paired differences with bootstrap intervals: is a compressed cache worse than the full one on the same prompts, and
is one method better than another?

Every quality figure of the engine is a mean over prompts of a per-prompt difference (the method's loss against the
full cache on the same prompt, or one method's loss minus another's), so the prompts' own difficulty cancels. Its
95% interval is scipy's bootstrap of that mean (BCa; the percentile bootstrap where BCa degenerates on a handful of
distinct values). Two methods are called different only when the interval of their paired difference excludes 0.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

CONFIDENCE = 0.95
#: Resamples: the ends of a 95% interval of a mean over 64 prompts move by about 1% of its width between seeds.
RESAMPLES = 4000
SEED = 0
# scipy >= 1.15 takes `rng`; the older releases that pyproject allows take `random_state`.
_SEED_ARG = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"


@dataclass(frozen=True)
class Interval:
    """A mean over `n` paired samples and its confidence interval [lo, hi] (NaN without samples)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0: the difference is supported by the samples."""
        return self.n > 1 and (self.lo > 0 or self.hi < 0)

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (`factor` > 0)."""
        return Interval(self.mean * factor, self.lo * factor, self.hi * factor, self.n)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def mean_interval(values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` (per-prompt differences) and its bootstrap interval. One value, or values all equal,
    give a zero-width interval at the mean (nothing to resample)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (a missing prompt is dropped from both sides before pairing)")
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if len(x) == 1 or np.ptp(x) == 0:
        return Interval(mean, mean, mean, len(x))
    lo, hi = _interval(x, "BCa", confidence)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = _interval(x, "percentile", confidence)
    return Interval(mean, min(lo, mean), max(hi, mean), len(x))


def _interval(x: np.ndarray, method: str, confidence: float) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa's degenerate-distribution warning: the NaN it returns is handled
        res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method=method,
                        vectorized=True, **{_SEED_ARG: np.random.default_rng(SEED)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(values: Sequence[float], reference: Sequence[float], *,
                      confidence: float = CONFIDENCE) -> Interval:
    """mean(values - reference) over prompts paired by position, with its interval."""
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.shape} and {b.shape}")
    return mean_interval(a - b, confidence=confidence)
