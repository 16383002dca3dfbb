"""GPU telemetry through NVML (`import pynvml`, from nvidia-ml-py): a sampler thread plus the energy counter.

While a cell's timed region runs, a thread samples every `period_s` (default 20 ms), per GPU: memory used, power
(the instantaneous field `NVML_FI_DEV_POWER_INSTANT` where the GPU has it, else `nvmlDeviceGetPowerUsage`, a
one-second average - `power_source` says which), SM and memory clocks, temperature, utilisation and the clock-event
(throttle) reasons. Energy comes from `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load) read at both
ends of each timed window; GPUs without that counter fall back to integrating the sampled power
(`energy_source` says which).

Without NVML (no driver, no GPU, a CPU cell) every figure is None and `status` says why; nothing raises.
Tests pass a fake module as `nvml`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType

DEFAULT_PERIOD_S = 0.02

#: Clock-event reason bits (nvml.h, `nvmlClocksEventReason*`), decoded into names for the results.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_NVML_CLOCK_SM, _NVML_CLOCK_MEM, _NVML_TEMPERATURE_GPU, _NVML_FI_DEV_POWER_INSTANT = 1, 2, 0, 186


def clock_event_names(bits: int) -> list[str]:
    """The slowdown reasons set in a clock-event bitmask; idle is not a slowdown (the GPU waits on the host)."""
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if int(bits) & bit and bit != 0x1]


def load_nvml() -> tuple[ModuleType | None, str]:
    """(pynvml, "ok") after nvmlInit, or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "unavailable: nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: all mean "no NVML"
        return None, f"unavailable: NVML cannot start ({err})"
    return pynvml, "ok"


def physical_index(device: str) -> int:
    """NVML index of a torch device string, through CUDA_VISIBLE_DEVICES when it lists plain indices."""
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and index < len(visible):
        return int(visible[index])
    return index


@dataclass
class Sample:
    t: float
    memory_used: int | None
    power_w: float | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    temperature_c: int | None
    util_gpu: int | None
    util_memory: int | None
    clock_event_reasons: int | None


@dataclass
class Telemetry:
    """Sampler for one GPU (`index`, an NVML index), or an inert recorder whose `status` says why it is not live.

    Use as `with telemetry.sampling(): ...` around the timed region, and `telemetry.energy_mj()` at both ends of
    each timed window.
    """

    index: int | None
    period_s: float = DEFAULT_PERIOD_S
    nvml: ModuleType | None = None
    status: str = "ok"
    samples: list[Sample] = field(default_factory=list)
    power_source: str | None = None
    _handle: object = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def for_device(cls, device: str, period_s: float = DEFAULT_PERIOD_S, nvml: ModuleType | None = None) -> Telemetry:
        if not device.startswith("cuda"):
            return cls(index=None, period_s=period_s, status="unavailable: CPU cell (no GPU telemetry)")
        status = "ok"
        if nvml is None:
            nvml, status = load_nvml()
        if nvml is None:
            return cls(index=None, period_s=period_s, status=status)
        index = physical_index(device)
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as err:  # noqa: BLE001
            return cls(index=None, period_s=period_s, status=f"unavailable: no NVML device {index} ({err})")
        tel = cls(index=index, period_s=period_s, nvml=nvml, _handle=handle)
        tel.power_source = "instant" if tel._instant_power() is not None else "average"
        return tel

    @property
    def live(self) -> bool:
        return self.nvml is not None and self._handle is not None

    # --- reads -------------------------------------------------------------------------------------------------

    def _call(self, name: str, *args):
        fn = getattr(self.nvml, name, None)
        if fn is None:
            return None
        try:
            return fn(self._handle, *args)
        except Exception:  # noqa: BLE001 - a field this GPU does not support reads as None
            return None

    def _instant_power(self) -> float | None:
        values = self._call("nvmlDeviceGetFieldValues", [getattr(self.nvml, "NVML_FI_DEV_POWER_INSTANT",
                                                                    _NVML_FI_DEV_POWER_INSTANT)])
        if not values or values[0].nvmlReturn != 0:
            return None
        return values[0].value.uiVal / 1000.0

    def power_w(self) -> float | None:
        if self.power_source == "instant":
            power = self._instant_power()
            if power is not None:
                return power
        mw = self._call("nvmlDeviceGetPowerUsage")
        return None if mw is None else mw / 1000.0

    def energy_mj(self) -> int | None:
        """The GPU's total-energy counter in mJ, or None (no NVML, or a GPU without the counter)."""
        return self._call("nvmlDeviceGetTotalEnergyConsumption") if self.live else None

    def memory_used(self) -> int | None:
        info = self._call("nvmlDeviceGetMemoryInfo") if self.live else None
        return None if info is None else int(info.used)

    def sample(self) -> Sample:
        util = self._call("nvmlDeviceGetUtilizationRates")
        reasons = self._call("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:
            reasons = self._call("nvmlDeviceGetCurrentClocksThrottleReasons")
        return Sample(
            t=time.perf_counter(),
            memory_used=self.memory_used(),
            power_w=self.power_w(),
            sm_clock_mhz=self._call("nvmlDeviceGetClockInfo", getattr(self.nvml, "NVML_CLOCK_SM", _NVML_CLOCK_SM)),
            mem_clock_mhz=self._call("nvmlDeviceGetClockInfo", getattr(self.nvml, "NVML_CLOCK_MEM", _NVML_CLOCK_MEM)),
            temperature_c=self._call(
                "nvmlDeviceGetTemperature", getattr(self.nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)
            ),
            util_gpu=None if util is None else int(util.gpu),
            util_memory=None if util is None else int(util.memory),
            clock_event_reasons=reasons,
        )

    # --- sampling ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.live or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.period_s)
        self.samples.append(self.sample())

    def window_energy_j(self, start_mj: int | None, end_mj: int | None, t0: float, t1: float) -> tuple[float | None,
                                                                                                      str | None]:
        """Joules spent between two reads: counter difference, else the sampled power integrated over [t0, t1]."""
        if start_mj is not None and end_mj is not None:
            return (end_mj - start_mj) / 1000.0, "counter"
        points = [(s.t, s.power_w) for s in self.samples if s.power_w is not None and t0 <= s.t <= t1]
        if len(points) < 2:
            return None, None
        joules = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:], strict=False))
        return joules, "integrated power"

    def summary(self) -> dict:
        """Per-cell figures from the samples (None where unavailable)."""
        def pick(name):
            return [getattr(s, name) for s in self.samples if getattr(s, name) is not None]

        power, memory, temp = pick("power_w"), pick("memory_used"), pick("temperature_c")
        sm, util, reasons = pick("sm_clock_mhz"), pick("util_gpu"), pick("clock_event_reasons")
        union = 0
        for r in reasons:
            union |= int(r)
        names = clock_event_names(union)
        return {
            "telemetry_status": self.status,
            "telemetry_samples": len(self.samples),
            "telemetry_period_s": self.period_s if self.live else None,
            "power_source": self.power_source,
            "power_mean_w": sum(power) / len(power) if power else None,
            "power_max_w": max(power) if power else None,
            "nvml_memory_used_peak_bytes": max(memory) if memory else None,
            "temperature_max_c": max(temp) if temp else None,
            "sm_clock_min_mhz": min(sm) if sm else None,
            "sm_clock_max_mhz": max(sm) if sm else None,
            "util_gpu_mean": sum(util) / len(util) if util else None,
            "clock_event_reasons": ",".join(names) if reasons else None,
        }
