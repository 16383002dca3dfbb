"""One format for every number on the page: counts, measured values with their interval, ratios to the full cache."""

from __future__ import annotations

import math

import numpy as np

from bench.uncertainty import Estimate


def num(value: float | None, digits: int = 3) -> str:
    """Thousands separators, `digits` significant digits, never an exponent (`26,640`, `2,469`, `551`, `12.3`,
    `0.0412`); `-` for a missing value."""
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"  # counts (batch, repetitions) are integers, never "3.00"
    value = float(value)
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    if decimals and abs(round(value, decimals)) >= 10 ** (digits - decimals):  # 0.9995 rounds up to 1.00, not 1.000
        decimals -= 1
    return f"{value:,.{decimals}f}"


def has_interval(estimate: Estimate) -> bool:
    return estimate.known and estimate.n >= 2 and estimate.lo != estimate.hi


def est(estimate: Estimate | None, suffix: str = "") -> str:
    """`551 [512-575]`: the median and its interval (left out with one repetition)."""
    if not isinstance(estimate, Estimate) or not estimate.known:
        return "-"
    if not has_interval(estimate):
        return f"{num(estimate.median)}{suffix}"
    return f"{num(estimate.median)}{suffix} [{num(estimate.lo)}-{num(estimate.hi)}]"


def est_lines(estimate: Estimate | None) -> tuple[str, str | None]:
    """(`551`, `512-575`): the median, and its interval for a second, smaller line of a table cell."""
    if not isinstance(estimate, Estimate) or not estimate.known:
        return "-", None
    return num(estimate.median), (f"{num(estimate.lo)}-{num(estimate.hi)}" if has_interval(estimate) else None)


def times(value: Estimate | float | None) -> str:
    """`1.23x [1.05-1.40]` (or `0.84x` for a plain float)."""
    if isinstance(value, Estimate):
        if not value.known:
            return "-"
        return f"{value.median:.2f}x" + (f" [{value.lo:.2f}-{value.hi:.2f}]" if has_interval(value) else "")
    if value is None or not math.isfinite(float(value)):
        return "-"
    return f"{float(value):.2f}x"


def no_difference(ratio: Estimate) -> bool:
    """A ratio to the full cache whose interval contains 1 (and is not the full cache itself)."""
    return has_interval(ratio) and ratio.contains(1.0)


def ratio_lines(ratio: Estimate) -> tuple[str, str | None]:
    """A speed ratio for a table cell: `1.23x` over `1.05-1.40`, or `no measurable difference` over `0.95-1.08x`
    when its interval contains 1."""
    if not ratio.known:
        return "-", None
    if no_difference(ratio):
        return "no measurable difference", f"{ratio.lo:.2f}-{ratio.hi:.2f}x"
    return f"{ratio.median:.2f}x", (f"{ratio.lo:.2f}-{ratio.hi:.2f}" if has_interval(ratio) else None)


def ratio_words(ratio: Estimate) -> str:
    """A speed ratio in a sentence: `1.23x [1.05-1.40]`, or `no measurable difference [0.95-1.08x]`."""
    if no_difference(ratio):
        return f"no measurable difference [{ratio.lo:.2f}-{ratio.hi:.2f}x]"
    if ratio.known and ratio.n < 2:
        return f"{ratio.median:.2f}x (one repetition: no interval)"
    return times(ratio)
