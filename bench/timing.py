"""Timing: CUDA events on GPU, `perf_counter` after a synchronisation elsewhere; raw samples kept, medians reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from prefixkv.cache import synchronize

T = TypeVar("T")


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """Run `fn` and return (its result, seconds it took on the device)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1000.0
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def median(samples: Sequence[float]) -> float | None:
    """Median of `samples`, None when there are none (a figure that was not measured is not zero)."""
    values = [float(s) for s in samples if s is not None]
    return statistics.median(values) if values else None
