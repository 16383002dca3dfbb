"""The compression budget: the kept fraction of the prompt's KV cache, in (0, 1]."""

from __future__ import annotations

import math


def check_budget(budget: float) -> float:
    """Return `budget` as a float, or raise ValueError naming it when it is not a number in (0, 1]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return value
