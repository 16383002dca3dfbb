"""The compression budget (the kept fraction of the prompt's KV cache, in (0, 1]) and the integer counts beside it."""

from __future__ import annotations

import math
import numbers


def check_budget(budget: float) -> float:
    """Return `budget` as a float, or raise ValueError naming it when it is not a real number in (0, 1].

    Booleans and strings are refused even though `float()` would take them: `budget=True` is a mistake, not 1.0."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r} ({type(budget).__name__})")
    value = float(budget)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return value


def check_count(name: str, value, low: int) -> int:
    """Return `value` when it is an integer >= `low`, else raise ValueError naming `name` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
