"""The timer protocol: the library marks regions of its own work; a caller that wants timings passes a timer.

The library never reads a clock and never synchronises the device for timing (gpt-fast keeps its clocks in `main`,
not in `generate`). Regions it marks: "prefill", "score", "allocate", "compact" (once per layer, or once for the
whole cache), "chunk" (tokens fed after compression in one forward: a question, a continuation scored by teacher
forcing) and "decode_step" (once per generated token after the first). A timer on CUDA records events; the caller
synchronises once, after the work, and reads them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, runtime_checkable


@runtime_checkable
class Timer(Protocol):
    def region(self, name: str) -> AbstractContextManager[None]:
        """A context manager around exactly the work named `name`."""
        ...


class NullTimer:
    """The default: marks nothing, costs nothing."""

    def region(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()


def check_timer(timer) -> Timer:
    """`timer`, or a `NullTimer` for None; TypeError names anything without a `region(name)` method."""
    if timer is None:
        return NullTimer()
    if not callable(getattr(timer, "region", None)):
        raise TypeError(f"timer must have a region(name) context-manager method, got {type(timer).__name__}")
    return timer
