"""The results store under faults: corrupt parts are quarantined, the lock keeps a second writer out, temporary files
belong to their run, output paths are checked before anything runs, a full disk is one line. In-process and fast:
the cells are replaced by a stub (the real subprocess path is covered in test_bench_runner.py)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from bench import isolation, runner, store
from bench.cli import main
from bench.matrix import Cell
from tests.test_bench_compare import _rows

ROW = {"key": "k1", "status": "ok", "rep": 0, "method": "prefixkv", "decode_steps_s": [0.01, 0.011]}


def _part(results: Path, key: str, machine: str = "m0", **extra) -> Path:
    path = store.part_path(results, key, machine)
    store.write_part(path, [{**ROW, "key": key, **extra}])
    return path


def test_truncated_part_is_quarantined_and_its_cell_not_finished(tmp_path, capsys):
    # The audit's reproduction: `truncate -s 5000` of one part made report and compare exit 1 with a traceback.
    results = tmp_path / "r"
    good, bad = _part(results, "k1", blob="x" * 20000), _part(results, "k2", blob="y" * 20000)
    os.truncate(bad, 5000)
    assert store.finished(results, "m0") == {"k1"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "quarantine" in err[0]
    assert not bad.exists() and len(list((results / "quarantine").glob("*.corrupt"))) == 1
    assert good.exists() and len(store.load(results)) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),  # empty file
        lambda p: p.write_bytes(b"PAR1 not parquet at all PAR1"),
        lambda p: p.write_bytes(p.read_bytes()[:-30]),  # footer cut
        lambda p: store.write_part(p, [{"x": 1}]),  # parquet, but not a part (no key/status)
    ],
    ids=["empty", "garbage", "no-footer", "no-columns"],
)
def test_compare_goes_on_with_the_valid_parts(tmp_path, capsys, damage):
    # (`report` on a truncated copy of a real store: test_bench_runner.py.)
    base = tmp_path / "base"
    for name in ("full", "prefixkv"):
        store.write_part(store.part_path(base, f"k-{name}", "m0"), _rows(name, 0.01, "CPU x", seed=1))
    cur = tmp_path / "cur"
    shutil.copytree(base, cur)
    damage(store.part_path(cur, "k-full", "m0"))
    # The damaged cell is no longer in the current store: missing, and its part unusable (exit 2: the gate cannot
    # vouch for a store with an invalid part, which in a baseline would hide its cell), not a traceback.
    assert main(["compare", str(base), str(cur)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.count("warning:") == 1 and "k-full-m0" in captured.err
    assert "missing:" in captured.out and "unusable:" in captured.out and store.finished(cur, "m0") == {"k-prefixkv"}


def test_load_of_a_read_only_store_skips_the_bad_part_in_place(tmp_path, monkeypatch):
    results = tmp_path / "r"
    _part(results, "k1")
    bad = _part(results, "k2")
    bad.write_bytes(b"garbage")

    def read_only(src, dst):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.os, "replace", read_only)
    lines = []
    assert len(store.load(results, on_warning=lines.append)) == 1
    assert bad.exists() and len(lines) == 1 and "read-only" in lines[0]


def test_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    results = tmp_path / "r"
    results.mkdir()
    with store.Lock(results, "run-A"):
        holder = json.loads((results / ".lock.holder").read_text())
        assert holder["pid"] == os.getpid() and holder["run_id"] == "run-A"
        second = store.Lock(results, "run-B")
        with pytest.raises(store.StoreLocked, match=rf"in use by another runner \(pid {os.getpid()} on .*run-A"):
            second.__enter__()
    assert not (results / ".lock.holder").exists()
    with store.Lock(results, "run-B"):  # released: the next one gets it
        pass


def test_temporary_files_belong_to_their_run(tmp_path):
    results = tmp_path / "r"
    path = store.part_path(results, "k1", "m0")
    path.parent.mkdir(parents=True)
    mine, theirs = store._tmp_name(path, "run-A"), store._tmp_name(path, "run-B")
    mine.write_bytes(b"half"), theirs.write_bytes(b"half")
    store.scratch_dir(results, "run-A"), store.scratch_dir(results, "run-B")
    # A run cleans up only its own leftovers: another run's in-progress write survives.
    assert store.remove_stale(results, owner="run-A") == 2
    assert not mine.exists() and theirs.exists() and (results / ".scratch-run-B").is_dir()
    # Under the lock (no other writer alive) every leftover goes.
    assert store.remove_stale(results) == 2 and not theirs.exists()


def test_disk_full_leaves_no_temporary_file_and_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.pq, "write_table", full)
    path = store.part_path(tmp_path, "k1", "m0")
    with pytest.raises(store.StoreError, match=r"cannot write .*k1-m0.parquet: disk full$"):
        store.write_part(path, [ROW], owner="run-A")
    assert list((tmp_path / "parts").iterdir()) == []


def test_numbers_outside_int64_are_a_store_error_not_an_overflow(tmp_path):
    with pytest.raises(store.StoreError, match="k1-m0.parquet"):
        store.write_part(store.part_path(tmp_path, "k1", "m0"), [{**ROW, "seed": 2**70}])


# --- pre-flight checks of output paths: one line, exit 2, before any cell runs -------------------------------------

MATRIX = """
[matrix]
models = ["tiny-llava"]
batch_sizes = [1]
text_lengths = [8]
new_tokens = [2]
methods = ["full"]
repetitions = 1
"""


@pytest.fixture
def no_cells(monkeypatch):
    """Fail the test if any cell would run."""
    calls = []
    monkeypatch.setattr(isolation, "run_cell", lambda *a, **k: calls.append(a) or pytest.fail("a cell ran"))
    return calls


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only for this process. chmod does not stop root (the CI user here), so the write itself is
    refused the way the kernel refuses it for other users."""
    original = Path.write_bytes

    def write_bytes(self, data):
        if Path(self).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, data)

    folder.chmod(0o555)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_results_path_that_is_a_file(tmp_path, capsys, no_cells):
    (tmp_path / "m.toml").write_text(MATRIX)
    (tmp_path / "r").write_text("not a directory")
    assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--results", str(tmp_path / "r")]) == 2
    _one_line(capsys, "is a file")


def test_read_only_results_directory(tmp_path, capsys, monkeypatch, no_cells):
    (tmp_path / "m.toml").write_text(MATRIX)
    (tmp_path / "r").mkdir()
    _deny_writes_under(monkeypatch, tmp_path / "r")
    try:
        assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--results", str(tmp_path / "r")]) == 2
    finally:
        (tmp_path / "r").chmod(0o755)
    _one_line(capsys, "is not writable")
    assert list((tmp_path / "r").iterdir()) == []


def test_report_out_is_a_directory_or_read_only(tmp_path, capsys, monkeypatch):
    results = tmp_path / "r"
    _part(results, "k1")
    (tmp_path / "emptydir").mkdir()
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "emptydir")]) == 2
    _one_line(capsys, "is a directory")
    assert not list(tmp_path.glob(".*.tmp"))  # the audit found a stray .emptydir.tmp here
    (tmp_path / "ro").mkdir()
    _deny_writes_under(monkeypatch, tmp_path / "ro")
    try:
        assert main(["report", "--results", str(results), "--out", str(tmp_path / "ro" / "x.html")]) == 2
    finally:
        (tmp_path / "ro").chmod(0o755)
    _one_line(capsys, "not writable")
    assert list((tmp_path / "ro").iterdir()) == []


# --- the sweep's console and its stop on a full disk (cells stubbed) ----------------------------------------------


def _cells(n: int, model: str = "tiny-llava") -> list[Cell]:
    return [Cell(model=model, device="cpu", dtype="float32", batch_size=1, text_tokens=8, new_tokens=2,
                 method="full", budget=1.0, seed=i) for i in range(n)]


def _ok_rows(*args, **kwargs):
    return "ok", [{"rep": 0, "status": "ok", "error": None, "tokens_per_s": 10.0, "prefill_s": 0.01,
                   "token_agreement": 1.0}], None


def test_markup_in_user_text_is_printed_verbatim(tmp_path, monkeypatch):
    # The audit: a model spec or message with square brackets raised MarkupError, or vanished from the console.
    monkeypatch.setattr(isolation, "run_cell", lambda *a, **k: ("error", [], "shape [batch, heads] [/] [bold]x"))
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    outcomes = runner.sweep(_cells(1, model="hf:/models/[red]odd[/]"), tmp_path / "r", console=console)
    text = buf.getvalue()
    assert outcomes[0].status == "error"
    assert "shape [batch, heads] [/] [bold]x" in text and "hf:/models/[red]odd[/]" in text


def test_disk_full_stops_the_sweep_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "m.toml").write_text(MATRIX.replace('methods = ["full"]', 'methods = ["full"]\nbatch_sizes = [1, 2]')
                                     .replace("batch_sizes = [1]\n", ""))
    monkeypatch.setattr(isolation, "run_cell", _ok_rows)
    real = store.pq.write_table
    writes = []

    def write_table(table, where, **kwargs):
        writes.append(1)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", write_table)
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--results", str(results)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench run")]
    assert len(err) == 1 and "disk full" in err[0] and "stopped after 1 of 2 cells" in err[0]
    assert len(store.parts([results])) == 1  # the first cell is kept
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".scratch")]
    assert not (results / ".lock.holder").exists()
