"""The sweep: each cell in its own subprocess, its part written to the store as soon as it finishes.

A cell that raises, runs out of memory, crashes the interpreter (segfault, os._exit, CUDA error) or outlives its
timeout is recorded as that cell's outcome with the error, and the sweep goes on. Cells whose part already exists
for this machine are skipped (`force` re-runs them), so an interrupted sweep - even by kill -9 - resumes where it
stopped and loses nothing that had finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
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
from bench.environment import fingerprint
from bench.matrix import Cell

#: Where `import bench` came from: the child must import the same code (also when reached through symlinks).
_PACKAGE_ROOT = str(Path(bench.__file__).parent.parent)


@dataclass
class Outcome:
    cell: Cell
    status: str  # ok | skipped | error | oom | crash | timeout
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


def run_cell(cell: Cell, python: str = sys.executable) -> tuple[str, list[dict], str | None]:
    """Run one cell in a fresh interpreter: (status, rows, error)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    if cell.device == "cpu" and cell.cpu_threads:
        # Sized before torch starts its thread pools: on a shared machine extra spinning threads cost 10x.
        env["OMP_NUM_THREADS"] = str(cell.cpu_threads)
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        cell_file.write_text(cell.to_json())
        try:
            proc = subprocess.run(
                [python, "-m", "bench.cell", str(cell_file), str(result_file)],
                env=env, capture_output=True, text=True, timeout=cell.timeout_s,
            )
        except subprocess.TimeoutExpired:
            return "timeout", [], f"no result after {cell.timeout_s:g} s (timeout_s); the process was killed"
        if proc.returncode != 0 or not result_file.exists():
            return "crash", [], _crash_message(proc.returncode, proc.stderr)
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


def sweep(
    cells: Sequence[Cell],
    results: str | Path,
    *,
    force: bool = False,
    matrix_name: str = "",
    console: Console | None = None,
    python: str = sys.executable,
) -> list[Outcome]:
    """Run `cells` (skipping those already in `results` for this machine unless `force`); one part per cell."""
    console = console or Console(stderr=True)
    env = fingerprint()
    run_id = f"{env['env_date']}-{uuid.uuid4().hex[:6]}"
    store.remove_stale(results)
    done = set() if force else store.finished(results, env["env_machine_id"])
    todo = [c for c in cells if c.key not in done]
    outcomes = [Outcome(c, "skipped") for c in cells if c.key in done]
    if outcomes:
        console.print(f"[dim]{len(outcomes)} of {len(cells)} cells already in {results}: skipped (--force re-runs)")
    columns = (
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(todo))
        for cell in todo:
            progress.update(task, description=cell.label)
            status, rows, error = run_cell(cell, python)
            base = {**cell_columns(cell), "matrix": matrix_name, "run_id": run_id, **env}
            if status == "ok":
                part = [{**base, **row} for row in rows]
                first = rows[0]
                tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
                progress.console.print(
                    f"[green]ok[/]      {cell.label}  {tps:,.1f} tok/s  prefill {first['prefill_s'] * 1e3:.1f} ms  "
                    f"agreement {first['token_agreement']:.2f}"
                )
            else:
                part = [{**base, "rep": None, "status": status, "error": error}]
                progress.console.print(f"[red]{status:<7}[/] {cell.label}  {error}")
            store.write_part(store.part_path(results, cell.key, env["env_machine_id"]), part)
            outcomes.append(Outcome(cell, status, error, len(part)))
            progress.advance(task)
        progress.update(task, description="done")
    return outcomes
