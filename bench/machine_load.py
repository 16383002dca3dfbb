"""The machine's load around a cell: what else was running while it was timed, recorded in its rows.

A speed measured on a shared machine depends on its neighbours as much as on the method; the rows say how loaded
the machine was, so that a reader (and the report) can tell a slow method from a busy moment:
- `load_avg_1min_before` / `_after`: the 1-minute load average (`os.getloadavg`) before and after the timed work;
- `cpu_steal_fraction`: the share of CPU time the hypervisor gave to other guests over the timed work (`steal` of
  `/proc/stat`; None where the file is not readable, e.g. off Linux);
- `gpu_sm_clock_mhz_before` / `_after` and `gpu_clock_events_before` / `_after`: the SM clock and the clock-event
  (throttle) reasons of an NVIDIA GPU, read once through NVML (`bench.telemetry`) at each end; None elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.telemetry import Telemetry, clock_event_names

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class Snapshot:
    """The load at one moment."""

    load_avg_1min: float | None
    cpu_steal_jiffies: int | None
    cpu_total_jiffies: int | None
    gpu_sm_clock_mhz: int | None
    gpu_clock_events: str | None


def _cpu_jiffies(stat: Path) -> tuple[int | None, int | None]:
    """(steal, total) jiffies of all CPUs since boot, from the first line of /proc/stat; (None, None) if unreadable."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None, None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in user.
    if len(fields) < 9 or fields[0] != "cpu":
        return None, None
    counts = [int(v) for v in fields[1:9]]
    return counts[7], sum(counts)


def snapshot(telemetry: Telemetry | None = None, stat: Path = PROC_STAT) -> Snapshot:
    """The load now; the GPU's clock and throttle reasons through `telemetry` when it is live."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    steal, total = _cpu_jiffies(stat)
    clock, events = None, None
    if telemetry is not None and telemetry.live:
        sample = telemetry.sample()
        clock = sample.sm_clock_mhz
        if sample.clock_event_reasons is not None:
            events = ",".join(clock_event_names(sample.clock_event_reasons)) or "none"
    return Snapshot(load, steal, total, clock, events)


def columns(before: Snapshot, after: Snapshot) -> dict:
    """The row columns (module docstring) from snapshots taken before and after the timed work."""
    steal = None
    if None not in (before.cpu_steal_jiffies, after.cpu_steal_jiffies, before.cpu_total_jiffies,
                    after.cpu_total_jiffies):
        elapsed = after.cpu_total_jiffies - before.cpu_total_jiffies
        steal = (after.cpu_steal_jiffies - before.cpu_steal_jiffies) / elapsed if elapsed > 0 else 0.0
    return {
        "load_avg_1min_before": before.load_avg_1min,
        "load_avg_1min_after": after.load_avg_1min,
        "cpu_steal_fraction": steal,
        "gpu_sm_clock_mhz_before": before.gpu_sm_clock_mhz,
        "gpu_sm_clock_mhz_after": after.gpu_sm_clock_mhz,
        "gpu_clock_events_before": before.gpu_clock_events,
        "gpu_clock_events_after": after.gpu_clock_events,
    }
