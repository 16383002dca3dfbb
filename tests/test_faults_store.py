"""Fault injection on results stores (issue 19): merges that would write outside the destination, replace a
successful part with a failed one, or nest stores; parts with flipped bytes or invalid UTF-8; members of the store of
the wrong type; a full disk under the lock; a symlinked lock holder. Synthetic parts, no cell runs; each test failed on
the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import store
from bench.cli import main
from tests.test_bench_store import MATRIX

ROW = {"key": "k1", "status": "ok", "rep": 0, "method": "prefixkv", "budget": 0.5, "new_tokens": 16,
       "env_machine_id": "m0", "run_id": "r1", "env_date": "2026-01-01T00:00:00+00:00"}


def _part(results: Path, key: str = "k1", machine: str = "m0", rows: int = 3, **extra) -> Path:
    path = store.part_path(results, key, machine)
    store.write_part(path, [{**ROW, "key": key, "env_machine_id": machine, "rep": r, **extra} for r in range(rows)])
    return path


def _raw_part(path: Path, rows: list[dict]) -> Path:
    """A part written by another tool (no checksum), as the audit's hand-edited parts were."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- item 1: merge writes only inside the destination -------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value"),
    [("key", "../../escaped"), ("key", "{tmp}/abs"), ("env_machine_id", "../x"), ("env_machine_id", "a/b"),
     ("key", ".hidden"), ("key", "k\n1")],
)
def test_merge_never_writes_outside_the_destination(tmp_path, column, value):
    # Before: the part's key or machine id became its path, so `../` or an absolute key wrote anywhere.
    src, into = tmp_path / "src", tmp_path / "deep" / "into"
    _raw_part(src / "parts" / "k1-m0.parquet", [{**ROW, column: value.format(tmp=tmp_path)}])
    merged = store_merge([src], into)
    assert merged.copied == 0 and merged.invalid == 1 and "not a safe file name" in merged.lines[0]
    assert sorted(p for p in tmp_path.rglob("*.parquet") if not p.is_relative_to(src)) == []


def test_part_path_refuses_unsafe_names(tmp_path):
    for key, machine in [("../k", "m0"), ("k", "../m"), ("", "m0"), ("k", ".m"), ("k/x", "m0"), ("k" * 101, "m0")]:
        with pytest.raises(ValueError, match="not a safe file name"):
            store.part_path(tmp_path, key, machine)
    assert store.part_path(tmp_path, "5f0c2ab3e9d1a7c4", "a1b2c3d4").name == "5f0c2ab3e9d1a7c4-a1b2c3d4.parquet"


def store_merge(sources, into):
    from bench.merge import merge

    return merge(sources, into, on_warning=lambda line: None)


# --- item 2: a successful part is never replaced by a failed one; a future date blocks nothing ---------------------


def test_a_newer_failed_run_never_replaces_a_successful_part(tmp_path):
    good, crashed, into = tmp_path / "good", tmp_path / "crashed", tmp_path / "into"
    _part(good, tokens_per_s=9.0)
    _part(crashed, rows=1, status="crash", error="process died", run_id="r2", env_date="2026-06-01T00:00:00+00:00")
    store_merge([good], into)
    merged = store_merge([crashed], into)
    assert (merged.kept, merged.replaced) == (1, 0)
    assert "kept the successful run r1" in merged.lines[0] and "failed run r2" in merged.lines[0]
    assert set(store.load(into)["status"]) == {"ok"}
    # The other order: the successful part replaces the failed one, although it is older.
    into2 = tmp_path / "into2"
    store_merge([crashed], into2)
    merged = store_merge([good], into2)
    assert merged.replaced == 1 and "replaced the failed run r2" in merged.lines[0]
    assert set(store.load(into2)["status"]) == {"ok"}


def test_a_part_dated_in_the_future_does_not_block_later_runs(tmp_path):
    future, later, into = tmp_path / "future", tmp_path / "later", tmp_path / "into"
    _part(future, tokens_per_s=1.0, run_id="r-9999", env_date="9999-01-01T00:00:00+00:00")
    _part(later, tokens_per_s=2.0, run_id="r-2026", env_date="2026-03-01T00:00:00+00:00")
    store_merge([future], into)
    merged = store_merge([later], into)
    assert merged.replaced == 1 and "dated in the future" in merged.lines[0]
    assert store.load(into)["tokens_per_s"].tolist() == [2.0] * 3


# --- item 3 and item 10: nested stores are refused, and read once -------------------------------------------------


def test_merge_into_a_store_nested_in_its_source_is_refused(tmp_path, capsys):
    src = tmp_path / "S"
    _part(src, "k1"), _part(src, "k2")
    assert main(["merge", str(src), "--into", str(src / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the source" in err and not (src / "sub").exists()
    assert len(store.load(src)) == 6


def test_merge_with_the_destination_above_the_source_is_refused_not_silent(tmp_path, capsys):
    # Before: "0 parts merged" and exit 0.
    into = tmp_path / "S"
    _part(into / "sub", "k1")
    assert main(["merge", str(into / "sub"), "--into", str(into)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside --into" in err
    assert main(["merge", str(into), "--into", str(into)]) == 2
    assert "is the destination itself" in capsys.readouterr().err


def test_a_store_nested_in_another_is_read_once(tmp_path):
    # A layout an earlier merge could leave: S holds its own parts and a whole store S/sub with the same cells.
    outer = tmp_path / "S"
    for key in ("k1", "k2"):
        _part(outer, key), _part(outer / "sub", key)
    lines = []
    frame = store.load(outer, on_warning=lines.append)
    assert len(frame) == 6 and len(lines) == 1 and "nested inside the store" in lines[0]
    assert len(store.load(outer, outer, on_warning=lambda _: None)) == 6  # the same store twice: read once
    assert len(store.load(tmp_path, on_warning=lambda _: None)) == 6  # a folder of stores: each store once
    assert len(store.load(outer / "sub")) == 6  # the nested store on its own


# --- item 4: corrupted parts are caught (checksum), invalid UTF-8 too --------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_value_is_caught(tmp_path):
    # The audit: a flipped byte turned decode_alloc_bytes_per_step 60773 into 4709 and the part was read as valid.
    path = _part(tmp_path, decode_alloc_bytes_per_step=60773)
    data = path.read_bytes()
    offset = data.find((60773).to_bytes(8, "little"))
    assert offset > 0
    _flip(path, offset + 1)
    with pytest.raises(ValueError, match="does not match its checksum"):
        store.read_part(path)
    lines = []
    assert store.load(tmp_path, on_warning=lines.append).empty and "quarantine" in lines[0]


def test_every_single_byte_flip_is_caught_or_harmless(tmp_path):
    """Every byte of a real-sized part, flipped in turn: the read fails, or returns exactly the rows written."""
    steps = [0.001 * (1 + i / 100) for i in range(64)]
    path = _part(tmp_path, decode_steps_s=steps, error=None, env_machine="CPU x", prefill_s=0.0123)
    original = store.read_part(path)
    data = path.read_bytes()
    outcomes = {"caught": 0, "harmless": 0}
    for offset in random.Random(0).sample(range(len(data)), 400):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            frame = store.read_part(path)
        except ValueError:
            outcomes["caught"] += 1
            continue
        assert frame.to_json() == original.to_json(), f"a flip at byte {offset} changed the rows unseen"
        outcomes["harmless"] += 1
    assert outcomes["caught"] > 300


def test_invalid_utf8_in_a_string_column_is_quarantined_not_a_traceback(tmp_path, capsys):
    path = _raw_part(tmp_path / "parts" / "k1-m0.parquet", [{**ROW, "error": "abcdefgh"}])
    data = bytearray(path.read_bytes())
    data[data.find(b"abcdefgh")] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="UTF8|UTF-8"):
        store.read_part(path)
    _part(tmp_path / "other", "k1")
    assert main(["compare", str(tmp_path / "other"), str(tmp_path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("column", "value"),
    [("budget", float("nan")), ("budget", 0.0), ("budget", 1.5), ("budget", None), ("new_tokens", 1),
     ("batch_size", 0), ("key", None), ("status", 3)],
)
def test_a_configuration_no_matrix_accepts_is_an_invalid_part(tmp_path, column, value):
    # The audit: a NaN budget (or new_tokens = 1) went through `load` and the report died in matplotlib.
    path = _raw_part(tmp_path / "parts" / "k1-m0.parquet", [{**ROW, column: value}])
    with pytest.raises(ValueError, match=f"column {column}"):
        store.read_part(path)


def test_parts_without_a_checksum_are_read_unverified(tmp_path):
    # Stores written before checksums existed stay readable.
    path = _raw_part(tmp_path / "parts" / "k1-m0.parquet", [ROW])
    assert store.read_part(path)["key"].tolist() == ["k1"]


# --- item 8: members of the wrong type, a full disk before the holder is written ---------------------------------

@pytest.mark.parametrize(
    ("member", "make"),
    [(".lock", Path.mkdir), (".lock.holder", Path.mkdir), ("parts", Path.touch), ("quarantine", Path.touch)],
)
def test_a_store_member_of_the_wrong_type_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, member, make):
    from bench import isolation

    monkeypatch.setattr(isolation, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    (tmp_path / "m.toml").write_text(MATRIX)
    results = tmp_path / "r"
    results.mkdir()
    make(results / member)
    assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and member in err and "Traceback" not in err
    assert main(["merge", str(tmp_path / "m.toml").rsplit("/", 1)[0] + "/nowhere", "--into", str(results)]) == 2
    _part(tmp_path / "src")
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "src"), "--into", str(results)]) == 2
    assert member in capsys.readouterr().err


def test_disk_full_while_writing_the_lock_holder(tmp_path, monkeypatch):
    results = tmp_path / "r"
    results.mkdir()
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(store.StoreError, match=r"\.lock\.holder: disk full$"):
        store.Lock(results, "run-A").__enter__()
    monkeypatch.setattr(store.os, "fsync", real)
    assert [p.name for p in results.iterdir() if p.name != ".lock"] == []  # no half-written holder or temp file
    with store.Lock(results, "run-B"):  # the lock was released
        assert json.loads((results / ".lock.holder").read_text())["run_id"] == "run-B"


# --- item 9: a symlinked .lock.holder is refused, never written through ----------------------------------------


def test_a_symlinked_lock_holder_does_not_overwrite_its_target(tmp_path):
    results, target = tmp_path / "r", tmp_path / "precious.txt"
    results.mkdir()
    target.write_text("keep me")
    (results / ".lock.holder").symlink_to(target)
    with pytest.raises(store.StoreUnusable, match="symbolic link"):
        store.Lock(results, "run-A").__enter__()
    assert target.read_text() == "keep me"
    (results / ".lock.holder").unlink()
    (results / ".lock").symlink_to(target)
    with pytest.raises(store.StoreUnusable, match="symbolic link"):
        store.Lock(results, "run-A").__enter__()
    assert target.read_text() == "keep me"
