"""The environment fingerprint every result row carries: hardware, driver, library versions, commit, date."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from types import ModuleType

from bench.telemetry import load_nvml

ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's commit, suffixed `-dirty` when the working tree has changes; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus(nvml: ModuleType | None = None) -> tuple[list[str], str | None]:
    """(names of the GPUs NVML sees, driver version); ([], None) without NVML. Creates no CUDA context."""
    if nvml is None:
        nvml, _ = load_nvml()
    if nvml is None:
        return [], None
    try:
        count = nvml.nvmlDeviceGetCount()
        names = [_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - a broken NVML reads as "no GPU", as in telemetry
        return [], None
    return names, driver


def fingerprint(nvml: ModuleType | None = None) -> dict:
    """Columns `env_*` describing this machine and software, the same for every row of one `bench run`."""
    import torch

    names, driver = gpus(nvml)
    host = socket.gethostname()
    cpu = cpu_model()
    gpu = names[0] if names else None
    machine = gpu or f"CPU {cpu}"
    return {
        "env_gpu": gpu,
        "env_gpu_count": len(names),
        "env_driver": driver,
        "env_cuda": torch.version.cuda,
        "env_torch": torch.__version__,
        "env_triton": _version("triton"),
        "env_transformers": _version("transformers"),
        "env_prefixkv_bench": _version("prefixkv-bench"),
        "env_python": platform.python_version(),
        "env_cpu": cpu,
        "env_cpu_count": os.cpu_count(),
        "env_host": host,
        "env_platform": platform.platform(),
        "env_git_commit": git_commit(),
        "env_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "env_machine": machine,
        # Which machine produced a part file: resuming skips only cells finished on this one.
        "env_machine_id": hashlib.sha256(f"{host}|{machine}".encode()).hexdigest()[:8],
    }
