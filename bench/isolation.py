"""One cell in a fresh interpreter, in its own process group: what every executor runs (`bench.executor`), so that a
cell's crash, out-of-memory or hang is its own outcome and never takes down the process that started it.

The child dies with its parent even when the parent is killed with SIGKILL (a parent-death signal), and its whole
process group is killed whatever ends the wait: the cell's timeout, Ctrl-C, SIGTERM, an error in the parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import bench
from bench.matrix import Cell

#: Where `import bench` came from: the child must import the same code (also when reached through symlinks).
_PACKAGE_ROOT = str(Path(bench.__file__).parent.parent)

#: Started in the child before the cell's entry module (`CELL_ENTRY`): die with the runner (even when it is killed
#: with SIGKILL, which leaves it no chance to clean up), then run the cell. A parent that died before the prctl call
#: is caught by the ppid check.
_CHILD = (
    "import ctypes, os, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv.pop(1)):\n"
    "    os._exit(1)\n"
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n"
)
#: The module a cell's process runs, and its arguments after CELL_JSON RESULT_JSON. Executors take another entry to
#: perturb cells on purpose: `bench.injected_cell` (the gate's trials), or a test's own module.
CELL_ENTRY: tuple[str, ...] = ("bench.cell",)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the cell and everything it started (its own process group), then reap it."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cell(
    cell: Cell, python: str = sys.executable, scratch: str | Path | None = None, entry: Sequence[str] = CELL_ENTRY
) -> tuple[str, list[dict], str | None]:
    """Run one cell in a fresh interpreter, in its own process group: (status, rows, error). The process group is
    killed whatever ends the wait (timeout, Ctrl-C, SIGTERM, an error in the runner). `entry`: the module the
    process runs and its extra arguments (`CELL_ENTRY`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    if cell.device == "cpu" and cell.cpu_threads:
        # Sized before torch starts its thread pools: on a shared machine extra spinning threads cost 10x.
        env["OMP_NUM_THREADS"] = str(cell.cpu_threads)
    with tempfile.TemporaryDirectory(prefix="cell-", dir=scratch) as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        cell_file.write_text(cell.to_json())
        proc = subprocess.Popen(
            [python, "-c", _CHILD, str(os.getpid()), entry[0], str(cell_file), str(result_file), *entry[1:]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=cell.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", [], f"no result after {cell.timeout_s:g} s (timeout_s); the process was killed"
        finally:
            if proc.returncode is None:
                _kill_group(proc)
        if proc.returncode != 0 or not result_file.exists():
            return "crash", [], _crash_message(proc.returncode, stderr)
        result = json.loads(result_file.read_text())
    if result["status"] != "ok":
        return result["status"], [], result["error"]
    return "ok", result["rows"], None


def _crash_message(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            cause = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            cause = f"killed by signal {-returncode}"
    else:
        cause = f"exit code {returncode}"
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return f"process died ({cause}): {tail[0][:300]}"
