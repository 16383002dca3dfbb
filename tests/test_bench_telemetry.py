"""NVML telemetry with a fake NVML module: sampling, the power source, energy, and graceful absence."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench import environment
from bench.telemetry import Telemetry


class FakeNVML:
    """The slice of pynvml the sampler uses; energy grows 50 W-worth per second of wall time."""

    NVML_FI_DEV_POWER_INSTANT = 186

    def __init__(self, instant: bool = True, energy: bool = True):
        self.instant, self.energy, self.t0 = instant, energy, time.perf_counter()

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        if i >= 2:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return f"gpu{i}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "570.86.15"

    def nvmlDeviceGetFieldValues(self, h, ids):
        if not self.instant:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=412_000))]

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return int(1_000_000 + 50_000 * (time.perf_counter() - self.t0))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=30 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetTemperature(self, h, kind):
        return 61

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=97, memory=55)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x1 | 0x4  # idle + software power cap


def test_sampler_with_instant_power():
    tel = Telemetry.for_device("cuda:1", period_s=0.005, nvml=FakeNVML())
    assert tel.live and tel.index == 1 and tel.power_source == "instant"
    e0 = tel.energy_mj()
    tel.start()
    time.sleep(0.06)
    tel.stop()
    e1 = tel.energy_mj()
    s = tel.summary()
    assert s["telemetry_status"] == "ok" and s["telemetry_samples"] >= 3
    assert s["power_mean_w"] == pytest.approx(412.0)
    assert s["nvml_memory_used_peak_bytes"] == 30 * 2**30
    assert s["sm_clock_max_mhz"] == 1980 and s["temperature_max_c"] == 61 and s["util_gpu_mean"] == 97
    assert s["clock_event_reasons"] == "sw_power_cap"  # idle is not a slowdown
    joules, source = tel.window_energy_j(e0, e1, 0, 0)
    assert source == "counter" and joules == pytest.approx((e1 - e0) / 1000)


def test_averaged_power_and_integrated_energy():
    tel = Telemetry.for_device("cuda", period_s=0.005, nvml=FakeNVML(instant=False, energy=False))
    assert tel.power_source == "average"
    t0 = time.perf_counter()
    tel.start()
    time.sleep(0.05)
    tel.stop()
    t1 = time.perf_counter()
    assert tel.energy_mj() is None
    joules, source = tel.window_energy_j(None, None, t0, t1)
    assert source == "integrated power"
    assert 300 * 0.02 < joules < 300 * (t1 - t0) * 1.01
    assert tel.summary()["power_mean_w"] == pytest.approx(300.0)


def test_unavailable_is_said_not_raised():
    cpu = Telemetry.for_device("cpu")
    assert not cpu.live and "CPU" in cpu.status
    cpu.start()
    cpu.stop()
    assert cpu.summary()["power_mean_w"] is None and cpu.energy_mj() is None
    missing = Telemetry.for_device("cuda:5", nvml=FakeNVML())
    assert not missing.live and "no NVML device 5" in missing.status
    # This machine's real NVML: absent here (no driver), which must read as a status, not an exception.
    real = Telemetry.for_device("cuda:0")
    assert real.live or real.status.startswith("unavailable")


def test_environment_fingerprint_with_fake_gpus():
    names, driver = environment.gpus(FakeNVML())
    assert names == ["NVIDIA H100 80GB HBM3"] * 2 and driver == "570.86.15"
    env = environment.fingerprint(FakeNVML())
    assert env["env_gpu"] == "NVIDIA H100 80GB HBM3" and env["env_gpu_count"] == 2
    for key in ("env_torch", "env_transformers", "env_cpu", "env_date", "env_machine_id"):
        assert env[key]


def test_physical_index_follows_visible_devices(monkeypatch):
    from bench.telemetry import physical_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert physical_index("cuda:1") == 1 and physical_index("cuda") == 3
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert physical_index("cuda:2") == 2
