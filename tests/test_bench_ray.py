"""The Ray executor on one 2-core machine: a local Ray instance (2 CPUs, one fake GPU, a custom `H100` resource) shared
by the module. Ray runs the same per-cell subprocesses as the local executor and gives the same cells, keys and rows;
a crashing cell leaves its worker alive; a killed worker's cell is retried once and recorded; a killed driver loses
no finished cell; cells are scheduled on the resources they ask for. Without Ray, `--executor ray` is one line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from bench import runner, store
from bench.cli import main
from bench.executor import LocalExecutor, RayExecutor, task_options
from bench.matrix import Cell, parse
from tests.cell_faults import faults

ROOT = Path(__file__).parent.parent
#: Marks this module's cells (other test runs may have cells of their own on the same machine).
SEED = 1_000_000 + os.getpid()
# A cell is a few seconds on one core, most of it the interpreter and torch starting.
TINY = {"seed": SEED,
    "name": "tiny-ray", "models": ["tiny-llama"], "batch_sizes": [1], "text_lengths": [16], "new_tokens": [4],
    "budgets": [0.25], "repetitions": 1, "warmup": 0, "timeout_s": 120.0, "cpu_threads": 1,
}


def _cells(*methods: str, **fields) -> list[Cell]:
    return parse({"matrix": {**TINY, "methods": list(methods), **fields}}).cells()


def _toml(path: Path, *methods: str) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**TINY, "methods": list(methods)}.items()]
    path.write_text("[matrix]\n" + "\n".join(lines) + "\n")
    return path


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (its start-up is ~7 s): 2 CPUs, a fake GPU and an `H100` resource."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'prefixkv-bench[fleet]'")
    ray.init(num_cpus=2, num_gpus=1, resources={"H100": 1}, include_dashboard=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# --- the cell processes on the workers ------------------------------------------------------------------------------


def _cell_processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid as passed by the runner, method) of this module's cell children now running (`python -c
    CHILD PPID ENTRY_MODULE CELL_JSON RESULT_JSON ...`)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) < 7 or b"runpy.run_module(sys.argv.pop(1)" not in argv[2]:
            continue
        try:
            cell = json.loads(Path(argv[5].decode()).read_text())
        except (OSError, ValueError):
            continue
        if cell.get("seed") == SEED:
            out.append((int(cmdline.parent.name), int(argv[3]), cell["method"]))
    return out


def _is_ray_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
    except OSError:
        return False


# --- tests ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_stores(ray_address, tmp_path_factory):
    """The same three cells (two ok, one whose process exits 3) through the local and the Ray executor."""
    tmp = tmp_path_factory.mktemp("executors")
    cells = _cells("full", "prefixkv", "h2o")
    entry = faults("exit:h2o")
    local = runner.sweep(cells, tmp / "local", console=_quiet(), executor=LocalExecutor(entry=entry))
    console = _quiet()
    ray = runner.sweep(cells, tmp / "ray", console=console, executor=RayExecutor(entry=entry))
    return (tmp / "local", local), (tmp / "ray", ray, console.file.getvalue())


def test_ray_gives_the_same_cells_keys_and_rows_as_local(both_stores):
    (local_dir, local), (ray_dir, ray, console) = both_stores
    assert {o.cell.key: o.status for o in local} == {o.cell.key: o.status for o in ray}
    a, b = store.load(local_dir), store.load(ray_dir)
    assert sorted(a.columns) == sorted(b.columns)
    assert {c: str(a[c].dtype) for c in a.columns} == {c: str(b[c].dtype) for c in a.columns}
    assert sorted(p.name for p in store.parts([local_dir])) == sorted(p.name for p in store.parts([ray_dir]))
    assert dict(zip(b["method"], b["status"], strict=True)) == {"full": "ok", "prefixkv": "ok", "h2o": "crash"}
    assert "exit code 3" in b.loc[b["method"] == "h2o", "error"].iloc[0]
    assert set(a["executor"]) == {"local"} and set(b["executor"]) == {"ray"} and set(b["attempts"]) == {1}
    # The same machine measured both: the same machine id, so the two stores resume each other.
    assert set(a["env_machine_id"]) == set(b["env_machine_id"]) and b["env_machine_id"].nunique() == 1
    assert "ok      tiny-llama cpu b1" in console and "crash" in console and "[CPU 1]" in console


def test_ray_skips_cells_already_in_the_store(both_stores):
    _, (ray_dir, _, _) = both_stores
    before = {p.name: p.stat().st_mtime_ns for p in store.parts([ray_dir])}
    console = _quiet()
    outcomes = runner.sweep(_cells("full", "prefixkv", "h2o"), ray_dir, console=console, executor=RayExecutor())
    assert [o.status for o in outcomes] == ["skipped"] * 3 and "3 of 3 cells already in" in console.file.getvalue()
    assert before == {p.name: p.stat().st_mtime_ns for p in store.parts([ray_dir])}


def _killer(stop: threading.Event, kills: dict[str, int], limit: dict[str, int]) -> None:
    """SIGKILL the Ray worker running a cell of METHOD, at most `limit[METHOD]` times (once per worker)."""
    killed: set[int] = set()
    while not stop.is_set():
        for _pid, worker, method in _cell_processes():
            if worker in killed or kills.get(method, 0) >= limit.get(method, 0) or not _is_ray_worker(worker):
                continue
            os.kill(worker, signal.SIGKILL)
            killed.add(worker)
            kills[method] = kills.get(method, 0) + 1
        time.sleep(0.05)


def test_a_killed_worker_is_retried_once_then_recorded(ray_address, tmp_path):
    # `full` loses its worker once (the retry succeeds); `snapkv` hangs and loses its worker on both attempts.
    kills: dict[str, int] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_killer, args=(stop, kills, {"full": 1, "snapkv": 2}), daemon=True)
    watcher.start()
    console = _quiet()
    try:
        outcomes = runner.sweep(_cells("full", "snapkv"), tmp_path / "r", console=console,
                                executor=RayExecutor(entry=faults("hang:snapkv")))
    finally:
        stop.set()
        watcher.join()
    assert kills == {"full": 1, "snapkv": 2}
    assert {o.cell.method: o.status for o in outcomes} == {"full": "ok", "snapkv": "lost"}
    frame = store.load(tmp_path / "r")
    attempts = dict(zip(frame["method"], frame["attempts"], strict=True))
    assert attempts == {"full": 2, "snapkv": 2}
    lost = frame.loc[frame["method"] == "snapkv", "error"].iloc[0]
    assert lost.startswith("Ray worker lost twice") and "\n" not in lost
    text = console.file.getvalue()
    assert "attempt 2 (the first lost its worker)" in text and "lost" in text
    assert not [p for p in _cell_processes() if p[2] == "snapkv"]  # the hanging cell died with its worker


def test_resume_after_killing_the_driver_loses_no_finished_cell(ray_address, tmp_path):
    matrix, results = _toml(tmp_path / "m.toml", "full", "snapkv"), tmp_path / "r"
    args = ["run", "--matrix", str(matrix), "--results", str(results), "--executor", "ray", "--address", ray_address]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "tests.fault_driver", "hang:snapkv", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not store.parts([results]) and time.monotonic() < deadline:
        assert driver.poll() is None
        time.sleep(0.2)
    done = {p.name: p.read_bytes() for p in store.parts([results])}
    while not _cell_processes() and time.monotonic() < deadline:  # Ray may start `snapkv` a moment later
        time.sleep(0.2)
    assert len(done) == 1 and [m for *_, m in _cell_processes()] == ["snapkv"]  # `full` stored, `snapkv` running
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # The dead driver's tasks are killed by Ray, and the cell with its worker: nothing keeps running.
    deadline = time.monotonic() + 60
    while _cell_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _cell_processes()
    rerun = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 of 2 cells already in" in rerun.stderr and "1 cells run, 1 skipped, 0 failed" in rerun.stdout
    assert all(p.read_bytes() == done[p.name] for p in store.parts([results]) if p.name in done)
    frame = store.load(results)
    assert sorted(frame["method"]) == ["full", "snapkv"] and (frame["status"] == "ok").all()


def test_cells_are_scheduled_on_the_resources_they_ask_for(ray_address):
    cuda = _cells("full", devices=["cuda"])[0]
    cpu = _cells("full", cpu_threads=2)[0]
    assert task_options(cuda, {"H100": 1}) == {"max_retries": 0, "num_cpus": 1, "num_gpus": 1,
                                                "resources": {"H100": 1}}
    assert task_options(cpu) == {"max_retries": 0, "num_cpus": 2}
    # What Ray assigned, read inside each task (`ray.get_runtime_context()`); the cells fail at once (no real GPU).
    with RayExecutor(resources={"H100": 1}, entry=faults("raise:full")) as executor:
        assert executor.infeasible([cuda, cpu]) == []
        got = {f.cell.device: f for f in executor.run([cuda, cpu], scratch=None, on_progress=lambda _: None)}
    assert got["cuda"].resources == {"GPU": 1.0, "CPU": 1.0, "H100": 1.0}
    assert got["cpu"].resources == {"CPU": 2.0, "H100": 1.0}
    assert all(f.status == "error" and "injected failure" in f.error for f in got.values())
    # A request no node can meet is named before anything runs.
    [line] = RayExecutor(resources={"A100": 1}).infeasible([cpu])
    assert "no node of the Ray cluster offers {A100: 1, CPU: 2}" in line


def test_ray_flags_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    matrix = _toml(tmp_path / "m.toml", "full")
    base = ["run", "--matrix", str(matrix), "--results", str(tmp_path / "r")]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    cases = [
        (["--executor", "ray"], "pip install 'prefixkv-bench[fleet]'"),
        (["--address", "auto"], "--address needs --executor ray"),
        (["--executor", "ray", "--resources", "H100=-1"], "'H100=-1' is not NAME=AMOUNT"),
        (["--executor", "ray", "--devices", "cuda:1"], "use devices = ['cuda']"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not store.parts([tmp_path / "r"])
