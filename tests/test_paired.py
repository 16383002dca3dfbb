"""Paired bootstrap intervals: the mean is inside, a clear difference excludes 0, a null one does not, degenerate
samples give zero-width intervals, and pairing is what removes the prompts' own difficulty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.paired import Interval, mean_interval, paired_difference


def test_clear_difference_excludes_zero_and_contains_the_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.2, 64)
    interval = mean_interval(values)
    assert interval.lo < interval.mean < interval.hi and interval.n == 64
    assert interval.excludes_zero
    assert interval.lo == pytest.approx(values.mean() - 1.96 * values.std(ddof=1) / 8, abs=0.03)


def test_null_difference_contains_zero():
    rng = np.random.default_rng(1)
    assert not mean_interval(rng.normal(0.0, 1.0, 64)).excludes_zero


def test_exact_match_points_with_few_distinct_values():
    # 0/1 outcomes: losses of -100, 0, +100 points; one prompt lost in 64 is no evidence of a loss
    one_lost = mean_interval([0.0] * 63 + [100.0])
    assert one_lost.mean == pytest.approx(100 / 64) and one_lost.lo <= 0 < one_lost.hi
    assert not one_lost.excludes_zero
    many_lost = mean_interval([0.0] * 40 + [100.0] * 24)
    assert many_lost.excludes_zero and math.isfinite(many_lost.lo)


def test_degenerate_samples():
    assert mean_interval([]).n == 0 and math.isnan(mean_interval([]).mean)
    assert mean_interval([2.5]) == Interval(2.5, 2.5, 2.5, 1)
    constant = mean_interval([0.0] * 10)
    assert constant == Interval(0.0, 0.0, 0.0, 10) and not constant.excludes_zero
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])


def test_pairing_removes_prompt_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(3.0, 1.0, 64)  # per-prompt loss of the full cache, varying a lot
    compressed = difficulty + 0.05 + rng.normal(0, 0.01, 64)  # a small, consistent excess
    paired = paired_difference(compressed, difficulty)
    assert paired.excludes_zero and paired.mean == pytest.approx(0.05, abs=0.01)
    # unpaired, the same excess is lost in the prompts' spread
    unpaired = mean_interval(compressed).lo - mean_interval(difficulty).hi
    assert unpaired < 0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_deterministic_and_scaled():
    values = np.random.default_rng(3).normal(1, 1, 30)
    assert mean_interval(values) == mean_interval(values)
    scaled = mean_interval(values).scaled(100)
    assert scaled.mean == pytest.approx(mean_interval(values * 100).mean)
