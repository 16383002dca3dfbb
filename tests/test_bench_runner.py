"""The runner end to end on CPU: per-cell isolation of crashes, resume after kill -9, the gate on real runs, and
the HTML report checked in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from bench import injected_cell, store
from bench.cli import main
from bench.executor import LocalExecutor
from bench.matrix import load
from bench.runner import sweep
from tests.browser import browser_check

ROOT = Path(__file__).parent.parent
# Small enough that a cell is a few seconds on one CPU core, most of it interpreter start-up.
TINY = """
[matrix]
name = "tiny"
models = ["tiny-llava"]
batch_sizes = [1]
text_lengths = [16]
new_tokens = [6]
methods = [{methods}]
budgets = [0.25]
repetitions = 2
warmup = 1
timeout_s = 120
cpu_threads = 1
"""


def _matrix(tmp_path: Path, methods: str) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(methods=methods))
    return path


def _bench(*args: str, faults: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m bench ARGS`; with `faults`, its cells run through tests.cell_faults (tests/fault_driver.py)."""
    command = ["-m", "tests.fault_driver", faults] if faults else ["-m", "bench"]
    return subprocess.run(
        [sys.executable, *command, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs,
    )


@pytest.fixture(scope="module")
def sweep_with_failures(tmp_path_factory):
    """One sweep where two cells succeed and three fail in three different ways."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = _matrix(tmp, '"full", "h2o", "snapkv", "streaming_llm", "prefixkv"')
    faults = "exit:h2o,raise:snapkv,oom:streaming_llm"
    proc = _bench("run", "--matrix", str(path), "--results", str(tmp / "results"), faults=faults)
    assert proc.returncode == 0, proc.stderr
    return tmp / "results", proc


def test_failures_are_outcomes_and_the_sweep_goes_on(sweep_with_failures):
    results, proc = sweep_with_failures
    frame = store.load(results)
    status = frame.groupby("method")["status"].first().to_dict()
    assert status == {"full": "ok", "prefixkv": "ok", "h2o": "crash", "snapkv": "error", "streaming_llm": "oom"}
    errors = frame.groupby("method")["error"].first()
    assert "exit code 3" in errors["h2o"] and "injected failure" in errors["snapkv"]
    assert "out of memory" in errors["streaming_llm"]
    assert "5 cells run, 0 skipped, 3 failed" in proc.stdout


def test_rows_carry_measurements_config_and_environment(sweep_with_failures):
    frame = store.load(sweep_with_failures[0])
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 2 * 2  # two cells x two repetitions
    row = ok[ok["method"] == "prefixkv"].iloc[0]
    assert row["prefill_s"] > 0 and row["decode_s"] > 0 and row["tokens_per_s"] > 0
    assert len(row["decode_steps_s"]) == 5 and row["decode_step_median_s"] > 0
    assert len(row["kept_per_layer"]) == row["model_layers"] == len(row["kv_bytes_per_layer"])
    assert 0 <= row["token_agreement"] <= 1 and 0 <= row["rouge_l"] <= 1 and row["perplexity"] > 1
    assert row["peak_memory_bytes"] > 0 and row["peak_memory_source"] == "process peak RSS"
    assert row["energy_j"] is None or row["energy_j"] != row["energy_j"]  # unavailable on CPU, never zero
    assert row["telemetry_status"].startswith("unavailable")
    assert row["budget"] == 0.25 and row["batch_size"] == 1 and row["prompt_length"] == 16 + 16
    for col in ("env_torch", "env_transformers", "env_cpu", "env_date", "key", "run_id"):
        assert row[col]
    full = ok[ok["method"] == "full"].iloc[0]
    assert full["token_agreement"] == 1.0 and full["kept_per_layer"].tolist() == [32] * len(full["kept_per_layer"])


def test_resume_after_kill_minus_9(tmp_path):
    path = _matrix(tmp_path, '"full", "prefixkv"')
    results = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "run", "--matrix", str(path), "--results", str(results)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not store.parts([results]) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the cell in hand, mid-sweep
    proc.wait()
    done = {p.name for p in store.parts([results])}
    assert len(done) == 1
    rerun = _bench("run", "--matrix", str(path), "--results", str(results))
    assert rerun.returncode == 0, rerun.stderr
    assert "1 of 2 cells already in" in rerun.stderr and "1 cells run, 1 skipped" in rerun.stdout
    frame = store.load(results)
    assert sorted(frame["method"].unique()) == ["full", "prefixkv"] and (frame["status"] == "ok").all(), frame["error"]
    assert done <= {p.name for p in store.parts([results])}  # nothing finished was lost or rewritten
    assert not [p for p in (results / "parts").iterdir() if p.name.startswith(".")]
    forced = _bench("run", "--matrix", str(path), "--results", str(results), "--force", "--methods", "full")
    assert "1 cells run, 0 skipped" in forced.stdout
    # A truncated part (the audit: `truncate -s 5000`) is quarantined and its cell alone re-run.
    victim = sorted(store.parts([results]))[0]
    os.truncate(victim, victim.stat().st_size // 2)
    repaired = _bench("run", "--matrix", str(path), "--results", str(results))
    assert repaired.returncode == 0, repaired.stderr
    assert "1 cells run, 1 skipped" in repaired.stdout and "quarantine" in repaired.stderr
    assert len(store.load(results)) == 4 and victim.exists()


def test_gate_on_real_runs_flags_injected_regressions(tmp_path):
    # Same machine, so absolute times are compared and no `full` cell is needed.
    cells = [replace(c, repetitions=6) for c in load(_matrix(tmp_path, '"prefixkv"')).cells()]
    base, slow, extra = tmp_path / "base", tmp_path / "slow", tmp_path / "extra"
    # Six repetitions a side: the fewest with which a Mann-Whitney test can reach p < 0.01.
    quiet = Console(file=io.StringIO())
    sweep(cells, base, console=quiet)
    sweep(cells, slow, console=quiet, executor=LocalExecutor(entry=injected_cell.entry(slow_decode_s=0.05)))
    sweep(cells, extra, console=quiet, executor=LocalExecutor(entry=injected_cell.entry(extra_decode_work=True)))
    for store_dir in (base, slow, extra):
        assert (store.load(store_dir)["status"] == "ok").all()
    gate = _bench("compare", str(base), str(slow))
    assert gate.returncode == 1, gate.stdout
    assert "regression(s)" in gate.stdout and "slower" in gate.stdout
    # The paired full-cache calls inside each cell are not perturbed: only the method's steps carry the sleep.
    rows = store.load(slow)
    own = np.median(np.concatenate(rows["decode_steps_s"].to_list()))
    paired = np.median(np.concatenate(rows["paired_full_decode_steps_s"].to_list()))
    assert own > 0.05 > paired
    # One more allocation and kernel per step: the counters see it, whatever the timing does.
    ops = {name: store.load(d)["decode_aten_ops_per_step"].iloc[0] for name, d in (("base", base), ("extra", extra))}
    assert ops["extra"] >= ops["base"] + 2, ops
    # A/A: the same store against itself never flags.
    assert _bench("compare", str(base), str(base)).returncode == 0


def test_report_renders_in_headless_chromium(sweep_with_failures, tmp_path):
    results, _ = sweep_with_failures
    out = tmp_path / "report" / "index.html"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 4 and "No energy data" in page
    assert "Failed cells" in page and "exit code 3" in page and "http://" not in page.replace("http://www.w3", "")
    assert "Against the paper" in page and "This store has no cell at the paper's shapes" in page
    state = browser_check(out, tmp_path)
    assert state["errors"] == []
    assert len(state["images"]) >= 4 and all(image["ok"] for image in state["images"])


def test_report_on_a_truncated_copy_of_a_store(sweep_with_failures, tmp_path):
    # The audit's reproduction: copy a store, `truncate -s 5000` one part, `bench report` -> 31-line traceback, exit 1.
    copy = tmp_path / "copy"
    shutil.copytree(sweep_with_failures[0], copy)
    victim = sorted(store.parts([copy]))[0]
    os.truncate(victim, 5000 if victim.stat().st_size > 5000 else victim.stat().st_size // 2)
    proc = _bench("report", "--results", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning:") == 1 and victim.name in proc.stderr and "Traceback" not in proc.stderr
    assert (copy / "index.html").exists() and len(store.parts([copy])) == 4


# --- the runner's processes: a second runner, Ctrl-C, kill -9 ------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The cell processes `pid` started (not its other children, such as the fingerprint's `git`)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"runpy.run_module" in cmdline:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_hanging_runner(tmp_path: Path, results: Path) -> tuple[subprocess.Popen, int]:
    """A runner whose one cell hangs; returns it and the cell's pid once the cell is running."""
    path = _matrix(tmp_path, '"full"')
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fault_driver", "hang:full", "run", "--matrix", str(path), "--results",
         str(results)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cells = _children(proc.pid)
        if cells and (results / ".lock.holder").exists():
            return proc, cells[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the cell never started")


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_second_runner_is_refused_and_ctrl_c_is_one_line(tmp_path):
    results = tmp_path / "results"
    proc, cell = _start_hanging_runner(tmp_path, results)
    try:
        second = _bench("run", "--matrix", str(_matrix(tmp_path, '"full"')), "--results", str(results))
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"in use by another runner (pid {proc.pid} on" in second.stderr
        assert os.getpgid(cell) != os.getpgid(proc.pid)  # the cell has its own process group
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("bench run: interrupted;")
    assert len([line for line in err.splitlines() if "interrupted" in line or "Error" in line]) == 1
    assert _wait_gone(cell), "the cell outlived the runner"
    assert not (results / ".lock.holder").exists() and not list(results.glob(".scratch-*"))
    assert not store.parts([results])  # nothing half-written


def test_sigterm_kills_the_cell(tmp_path):
    proc, cell = _start_hanging_runner(tmp_path, tmp_path / "results")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err
    assert _wait_gone(cell)


def test_kill_minus_9_of_the_runner_leaves_no_orphan_cell(tmp_path):
    results = tmp_path / "results"
    proc, cell = _start_hanging_runner(tmp_path, results)
    proc.kill()  # SIGKILL to the runner alone: no handler runs
    proc.communicate(timeout=180)
    assert _wait_gone(cell), "the cell kept running after the runner was killed"
    # Its scratch folder stays until the next sweep, which removes it (the lock proves its owner is dead).
    assert list(results.glob(".scratch-*"))
    from bench.runner import sweep

    assert sweep([], results, console=Console(file=io.StringIO())) == []
    assert not list(results.glob(".scratch-*")) and not (results / ".lock.holder").exists()
