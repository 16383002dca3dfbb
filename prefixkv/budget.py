"""The compression budget (the kept fraction of the prompt's KV cache, in (0, 1]) and the integer counts beside it.

A budget is checked once, at the first public door it passes - `PrefixKVCache(...)` (which `generate`,
`continuation_logprobs`, `attach` and `prefill_scores` all construct), `Method.plan`, the exported allocators
(`prefix_allocation`, `uniform_allocation`, `pyramid_allocation`), `Profile.counts`, `calibrate` - and comes out as
a `Budget`: a float that carries the proof of its check, so that the doors it reaches from inside (the cache calls
a method's allocator, which is also a door of its own) trust it instead of checking it again. Internal helpers
take a checked budget and never check.
"""

from __future__ import annotations

import math
import numbers


class Budget(float):
    """A budget that passed `check_budget`: a float in (0, 1]."""

    __slots__ = ()


def check_budget(budget: float) -> Budget:
    """Return `budget` as a `Budget`, or raise ValueError naming it when it is not a real number in (0, 1].

    Booleans and strings are refused even though `float()` would take them: `budget=True` is a mistake, not 1.0.
    A `Budget` is returned as it is: it was checked where it entered."""
    if type(budget) is Budget:
        return budget
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r} ({type(budget).__name__})")
    value = float(budget)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return Budget(value)


def check_count(name: str, value, low: int) -> int:
    """Return `value` when it is an integer >= `low`, else raise ValueError naming `name` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
