"""Intervals on the suite's figures: a bootstrap confidence interval of the median of each cell's repetitions, of a
quantile of its decode steps, and of the ratio of two cells' step times (a cell's speed over the full cache).

On a shared machine repetitions of one cell move by 2-3x and on an H100 by 15%, so a median alone ranks methods by
noise. Every speed and energy figure of the report therefore carries an interval and its number of repetitions, and
two cells are called different only where their intervals do not overlap (`separated`).

Per-repetition figures (`median_ci`, `ratio_ci`): with one sample there is no interval (`lo == hi == median`,
`n == 1`); with two the bootstrap of a median can only return the samples themselves, so the interval is their min
and max; from three on it is scipy's percentile bootstrap (BCa needs a jackknife that degenerates on a handful of
ties).

Per-step figures (`step_ci`, `step_ratio_ci`): a speed comes from the decode steps of every repetition, not from a
total that includes another process's slow moment. Steps of one call share its machine state, so they are not
independent draws: the interval is a two-level (hierarchical) bootstrap - repetitions resampled, then steps within
each - so that it widens with the drift between repetitions as well as with the spread of steps. A ratio of two
cells measured interleaved in one process (`paired=True`: repetition i of one beside repetition i of the other)
resamples the repetitions of both sides jointly, which keeps what the pair shares (the load of that moment) out of
the interval.
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
#: Resamples of the per-step intervals, each drawing every step of every repetition: 1000 keep a report of a hundred
#: GPU cells (512 steps x 3-6 repetitions) to seconds; the ends move by about 1% between seeds.
STEP_RESAMPLES = 1000
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

    def reciprocal(self, numerator: float = 1.0) -> Estimate:
        """`numerator / self` - a step time as a rate (batch / step = tokens/s); the interval's ends swap."""

        def invert(value: float) -> float:
            return numerator / value if math.isfinite(value) and value > 0 else math.nan

        return Estimate(invert(self.median), invert(self.hi), invert(self.lo), self.n)

    def contains(self, value: float) -> bool:
        """True when `value` lies inside the interval (a ratio containing 1: no measurable difference)."""
        return self.known and self.lo <= value <= self.hi


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


# --- per-step figures ---------------------------------------------------------------------------------------------


def _padded(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Groups as one (groups, longest) array padded with NaN, and each group's length."""
    lengths = np.array([len(g) for g in groups])
    # float32: step times need 7 digits, and the partial sorts over (resamples x steps) run twice as fast.
    values = np.full((len(groups), int(lengths.max())), np.nan, dtype=np.float32)
    for row, group in enumerate(groups):
        values[row, : len(group)] = group
    return values, lengths


def _resampled_steps(values: np.ndarray, lengths: np.ndarray, chosen: np.ndarray, rng: np.random.Generator
                     ) -> np.ndarray:
    """One row per resample: repetitions `chosen` (resamples, k), then steps drawn with replacement within each
    chosen repetition, as many as it has (NaN pads a repetition shorter than the longest)."""
    width = values.shape[1]
    if (lengths == width).all():  # the usual case: every repetition has the same number of steps
        draws = rng.integers(0, width, (*chosen.shape, width), dtype=np.int32)
        return values.ravel()[(chosen[..., None] * width + draws).reshape(len(chosen), -1)]
    chosen_lengths = lengths[chosen][..., None]
    draws = rng.integers(0, chosen_lengths, (*chosen.shape, width), dtype=np.int32)
    picked = values[chosen[..., None], draws]
    picked[np.arange(width) >= chosen_lengths] = np.nan
    return picked.reshape(len(chosen), -1)


def _quantiles(rows: np.ndarray, q: float) -> np.ndarray:
    return np.nanquantile(rows, q, axis=1) if np.isnan(rows).any() else _quantile_rows(rows, q)


def _quantile_rows(rows: np.ndarray, q: float) -> np.ndarray:
    """`np.quantile(rows, q, axis=1)` (linear interpolation) through a partial sort: ten times faster on the
    (resamples x steps) arrays here, which makes the report's per-step intervals affordable."""
    position = (rows.shape[1] - 1) * q
    below = int(math.floor(position))
    parted = np.partition(rows, below, axis=1)
    low = parted[:, below].astype(float)
    if below + 1 >= rows.shape[1] or position == below:
        return low
    high = parted[:, below + 1:].min(axis=1).astype(float)  # the next order statistic
    return low + (high - low) * (position - below)


def _interval(stats: np.ndarray, point: float, n: int, confidence: float) -> Estimate:
    lo, hi = (float(v) for v in np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2]))
    # The resamples are float32: an end within its rounding of the point is the point.
    lo, hi = (point if math.isclose(v, point, rel_tol=1e-6) else v for v in (lo, hi))
    return Estimate(point, min(lo, point), max(hi, point), n)


def step_ci(groups: Sequence[Sequence[float] | None], q: float = 0.5, *, confidence: float = CONFIDENCE) -> Estimate:
    """The `q` quantile of the steps of every repetition (`groups`: one sequence of step times per repetition),
    with its two-level bootstrap interval (module docstring); `n` counts the repetitions."""
    return step_cis(groups, (q,), confidence=confidence)[0]


def step_cis(groups: Sequence[Sequence[float] | None], quantiles: Sequence[float], *,
             confidence: float = CONFIDENCE) -> list[Estimate]:
    """`step_ci` at several quantiles (the median and the lower decile), from one set of resamples."""
    kept = [g for g in (_clean(g) for g in groups) if len(g)]
    if not kept:
        return [Estimate.missing() for _ in quantiles]
    pooled = np.concatenate(kept)
    values, lengths = _padded(kept)
    rng = np.random.default_rng(SEED)
    rows = _resampled_steps(values, lengths, rng.integers(0, len(kept), (STEP_RESAMPLES, len(kept))), rng)
    return [_interval(_quantiles(rows, q), float(np.quantile(pooled, q)), len(kept), confidence) for q in quantiles]


def step_ratio_ci(reference: Sequence[Sequence[float] | None], samples: Sequence[Sequence[float] | None], *,
                  paired: bool, q: float = 0.5, confidence: float = CONFIDENCE) -> Estimate:
    """How many times faster `samples` steps are than `reference` steps: the `q` quantile of the reference's steps
    over that of `samples` (> 1: faster), with its two-level bootstrap interval. `paired`: repetition i of each side
    ran beside the other (interleaved in one process), so repetitions are resampled jointly; pairs with a side
    empty are dropped. `n` counts the repetitions (pairs when paired)."""
    ref, cur = [_clean(g) for g in reference], [_clean(g) for g in samples]
    if paired and len(ref) == len(cur):
        pairs = [(a, b) for a, b in zip(ref, cur, strict=True) if len(a) and len(b)]
        ref, cur = [a for a, _ in pairs], [b for _, b in pairs]
    else:
        paired = False
        ref, cur = [g for g in ref if len(g)], [g for g in cur if len(g)]
    if not ref or not cur:
        return Estimate.missing()
    ref_point, cur_point = np.quantile(np.concatenate(ref), q), np.quantile(np.concatenate(cur), q)
    if cur_point <= 0:
        return Estimate.missing()
    rng = np.random.default_rng(SEED)
    ref_values, ref_lengths = _padded(ref)
    cur_values, cur_lengths = _padded(cur)
    ref_chosen = rng.integers(0, len(ref), (STEP_RESAMPLES, len(ref)))
    cur_chosen = ref_chosen if paired else rng.integers(0, len(cur), (STEP_RESAMPLES, len(cur)))
    stats = (_quantiles(_resampled_steps(ref_values, ref_lengths, ref_chosen, rng), q)
             / _quantiles(_resampled_steps(cur_values, cur_lengths, cur_chosen, rng), q))
    return _interval(stats, float(ref_point / cur_point), min(len(ref), len(cur)), confidence)
