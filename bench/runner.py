"""The sweep: each cell in its own subprocess, its part written to the store as soon as it finishes.

Cells run on an executor (`bench.executor`): one after another on this machine (`local`, the default), or as Ray
tasks on the GPUs and machines of a Ray cluster (`ray`), each still in its own subprocess on its worker. Either way
the rows come back here and this process alone writes the store, so what follows holds for both.

A cell that raises, runs out of memory, crashes the interpreter (segfault, os._exit, CUDA error) or outlives its
timeout is recorded as that cell's outcome with the error, and the sweep goes on. Cells whose part already exists
(and is valid) for this machine are skipped (`force` re-runs them), so an interrupted sweep - even by kill -9 -
resumes where it stopped and loses nothing that had finished.

Each cell runs in its own process group, killed whatever ends the runner: Ctrl-C, SIGTERM, an error, and - through
the child's parent-death signal - kill -9 of the runner itself. Its scratch files live in the store's scratch folder
of the run, removed at exit or, after a kill -9, by the next sweep. The sweep holds the store's lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import bench
from bench import store
from bench.matrix import Cell

if TYPE_CHECKING:
    from bench.executor import Executor, Finished

#: Where `import bench` came from: the child must import the same code (also when reached through symlinks).
_PACKAGE_ROOT = str(Path(bench.__file__).parent.parent)


@dataclass
class Outcome:
    cell: Cell
    status: str  # ok | skipped | error | oom | crash | timeout | lost (Ray: the worker died twice)
    error: str | None = None
    rows: int = 0


def cell_columns(cell: Cell) -> dict:
    """The configuration columns every row of `cell` carries."""
    ident = cell.identity()
    ident["method_kwargs"] = json.dumps(ident["method_kwargs"], sort_keys=True)
    return {
        "key": cell.key,
        "shape_key": cell.shape_key,
        **ident,
        "repetitions": cell.repetitions,
        "warmup": cell.warmup,
    }


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


class Interrupted(KeyboardInterrupt):
    """The runner received SIGTERM or SIGHUP: treated like Ctrl-C (the cell in hand is killed, the sweep stops)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


@contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise `Interrupted` in the main thread (as SIGINT raises KeyboardInterrupt), so that the
    cell in hand is killed and the lock released on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except KeyboardInterrupt as err:
        if received and not isinstance(err, Interrupted):
            # Raised inside a library's blocking call (Ray's wait), which re-raises it as a plain KeyboardInterrupt.
            raise Interrupted(received[-1]) from None
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _step_counters(row: dict) -> str:
    """The deterministic per-decode-step counters of a row, for the console (empty where they were not measured)."""
    parts = []
    for key, unit in (("decode_aten_ops_per_step", "ops"), ("decode_host_syncs_per_step", "syncs"),
                      ("decode_kernel_launches_per_step", "launches")):
        value = row.get(key)
        if value is not None:
            parts.append(f"{value:,.0f} {unit}")
    floor = row.get("decode_floor_ratio")
    if floor is not None:
        parts.append(f"{floor:.2f}x floor")
    return "  per step: " + ", ".join(parts) if parts else ""


def sweep(
    cells: Sequence[Cell],
    results: str | Path,
    *,
    force: bool = False,
    matrix_name: str = "",
    console: Console | None = None,
    python: str = sys.executable,
    executor: Executor | None = None,
) -> list[Outcome]:
    """Run `cells` (skipping those already in `results` from a machine the executor runs on, unless `force`); one part
    per cell, written here, by the driver, whichever executor ran the cell (`LocalExecutor(python)` by default).

    Holds the store's lock throughout (a second runner fails with `store.StoreLocked`). A part that cannot be written
    (disk full) stops the sweep with `store.StoreError`; Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP
    `Interrupted`, after the cells in hand are killed. Finished parts are kept in every case."""
    from bench.executor import LocalExecutor

    console = console or Console(stderr=True)
    executor = executor or LocalExecutor(python)
    run_id = new_run_id()
    results = store.check_writable_dir(results, "results directory")
    outcomes: list[Outcome] = []
    # Started before the lock is taken (the local executor's fingerprint runs git; Ray connects), as before executors.
    executor.start()
    try:
        with _signals_interrupt(), store.Lock(results, run_id):
            # Under the lock no other sweep writes here: a temporary file or scratch folder is a killed run's leftover.
            store.remove_stale(results)
            try:
                with executor:
                    return _sweep_locked(cells, results, force, matrix_name, console, executor, run_id, outcomes)
            except store.StoreError as err:
                ran = sum(o.status != "skipped" for o in outcomes)
                raise store.StoreError(
                    f"{err}; the sweep stopped after {ran} of {len(cells)} cells (those are kept: free space and "
                    "re-run to resume)"
                ) from None
            finally:
                store.remove_stale(results, owner=run_id)
    finally:
        executor.close()


def _sweep_locked(cells, results, force, matrix_name, console, executor, run_id, outcomes) -> list[Outcome]:
    done = set() if force else store.finished(results, executor.machine_ids(), on_warning=_warner(console))
    todo = [c for c in cells if c.key not in done]
    outcomes.extend(Outcome(c, "skipped") for c in cells if c.key in done)
    if outcomes:
        console.print(
            f"[dim]{len(outcomes)} of {len(cells)} cells already in {escape(str(results))}: skipped (--force re-runs)"
        )
    columns = (
        SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    scratch = store.scratch_dir(results, run_id)
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(todo))
        describe = lambda text: progress.update(task, description=text)
        for done_cell in executor.run(todo, scratch=scratch, on_progress=describe):
            cell, status, rows, error = done_cell.cell, done_cell.status, done_cell.rows, done_cell.error
            base = {**cell_columns(cell), "matrix": matrix_name, "run_id": run_id, **done_cell.env,
                    "executor": executor.name, "attempts": done_cell.attempts}
            label = escape(cell.label)
            where = _where(done_cell)
            if status == "ok":
                part = [{**base, **row} for row in rows]
                first = rows[0]
                tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
                progress.console.print(
                    f"[green]ok[/]      {label}  {tps:,.1f} tok/s  prefill {first['prefill_s'] * 1e3:.1f} ms  "
                    f"agreement {first['token_agreement']:.2f}{_step_counters(first)}{where}"
                )
            else:
                part = [{**base, "rep": None, "status": status, "error": error}]
                progress.console.print(f"[red]{status:<7}[/] {label}  {escape(str(error))}{where}")
            store.write_part(store.part_path(results, cell.key, done_cell.env["env_machine_id"]), part, owner=run_id)
            outcomes.append(Outcome(cell, status, error, len(part)))
            progress.advance(task)
        progress.update(task, description="done")
    return outcomes


def _where(done: Finished) -> str:
    """` [on gpu-3, GPU 1, attempt 2]`: where a cell ran, when that is not simply this machine's one executor."""
    bits = []
    if done.where:
        bits.append(f"on {done.where}")
    if done.resources:
        bits.append(", ".join(f"{k} {v:g}" for k, v in sorted(done.resources.items())))
    if done.attempts > 1:
        bits.append(f"attempt {done.attempts} (the first lost its worker)")
    return f"  [dim]\\[{escape('; '.join(bits))}][/]" if bits else ""


def _warner(console: Console):
    return lambda message: console.print(f"[yellow]warning:[/] {escape(message)}")
