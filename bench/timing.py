"""Timing: the suite's clocks, kept outside the library (gpt-fast keeps its clocks in `main`, not in `generate`).

`RegionTimer` implements `prefixkv.timer.Timer`: on CUDA it records a pair of events around each region and never
synchronises while the work runs - the caller synchronises once, after it, and reads `seconds()`; on the CPU the
work is synchronous and `perf_counter` brackets it. Raw samples are kept; the report derives its figures from them
(`bench.uncertainty`: medians and lower deciles of the steps, with their intervals).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a host clock read measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class RegionTimer:
    """Seconds per region of work, as lists of samples (one per time the region was entered)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._seconds: dict[str, list[float]] = {}

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds.setdefault(name, []).append(time.perf_counter() - t0)

    def seconds(self) -> dict[str, list[float]]:
        """Every region's samples in seconds; on CUDA this waits for the recorded events (call after the work)."""
        out = {name: list(samples) for name, samples in self._seconds.items()}
        for name, pairs in self._events.items():
            if pairs:
                pairs[-1][1].synchronize()
            out[name] = [start.elapsed_time(end) / 1000.0 for start, end in pairs]
        return out

    def total(self, name: str) -> float:
        """Seconds summed over every entry of region `name` (0.0 if it was never entered)."""
        return float(sum(self.seconds().get(name, [])))


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """Run `fn` and return (its result, seconds it took on the device), synchronising only before and after."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
