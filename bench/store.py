"""The results store: a directory of parquet part files, one per (cell, machine), each written atomically.

    DIR/parts/<cell key>-<machine id>.parquet     one row per repetition (or one row saying why the cell failed)
    DIR/quarantine/<part name>.<n>.corrupt        parts that failed validation on read, moved aside
    DIR/.lock, DIR/.lock.holder                   the writer's lock (filelock) and who holds it (pid, host, run id)

A part appears complete or not at all (written to a temporary name owned by its run, then `os.replace`d), so a sweep
killed at any moment loses at most the cell in hand, and a re-run skips every cell that has a valid part. A part that
is nevertheless unreadable (a truncated copy, a full disk on another tool's copy) is quarantined when read: one
warning line names it, its cell counts as not finished (the next `run` re-runs it) and readers go on with the valid
parts. Stores from several machines (or GPU kinds) merge into one with `merge` (`python -m bench merge SRC...
--into DST`): every valid part is copied atomically under DST's lock, keyed by its cell and machine; where DST
already holds a different part of the same cell and machine, the newer run wins and one line says so. Readers also
accept several directories at once.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import filelock
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

#: Columns a part must have to be read as one.
REQUIRED_COLUMNS = ("key", "status")
_TMP_SUFFIX = ".tmp"


class StoreError(OSError):
    """The store cannot be used or written (locked, read-only, disk full); the message is one line."""


class StoreLocked(StoreError):
    """Another runner holds the results directory."""


def part_path(results: str | Path, key: str, machine_id: str) -> Path:
    return Path(results) / "parts" / f"{key}-{machine_id}.parquet"


def _tmp_name(path: Path, owner: str) -> Path:
    return path.with_name(f".{path.name}.{owner}{_TMP_SUFFIX}")


def write_part(path: Path, rows: Sequence[dict], *, owner: str | None = None) -> None:
    """Write `rows` as one parquet file at `path`, atomically (readers see the old state or the whole new file).

    The temporary file carries `owner` (the run id; the pid by default) in its name, so a sweep can tell its own
    leftovers from another writer's. A failed write (disk full, read-only) removes the temporary file and raises
    `StoreError` with one line naming the part."""
    try:
        table = pa.Table.from_pylist([dict(r) for r in rows])
    except (pa.ArrowException, OverflowError) as err:
        raise StoreError(f"cannot store the rows of {path.name}: {err}") from None
    _write_atomically(path, owner, lambda f: pq.write_table(table, f))


def _write_atomically(path: Path, owner: str | None, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a temporary file owned by `owner` (the pid by default), fsync it, then `os.replace` it onto `path`;
    on failure the temporary file is removed and StoreError names `path` in one line."""
    tmp = _tmp_name(path, owner or str(os.getpid()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from None


def _write_error(path: Path, err: OSError) -> StoreError:
    what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return StoreError(f"cannot write {path}: {what}")


def copy_part(src: Path, dest: Path, *, owner: str | None = None) -> None:
    """Copy the part `src` to `dest` atomically (as `write_part` writes: a temporary name owned by `owner`, fsync,
    `os.replace`); StoreError (one line) when it cannot be written."""

    def copy(out: BinaryIO) -> None:
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, out)

    _write_atomically(dest, owner, copy)


def read_part(path: Path) -> pd.DataFrame:
    """One part as a DataFrame; ValueError (one line) when it is not a complete, well-formed part."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"no column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise ValueError("no rows")
    return table.to_pandas()


def _store_root(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "parts" else path.parent


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def quarantine(path: Path, reason: str, on_warning: Callable[[str], None] = warn) -> Path | None:
    """Move a bad part to DIR/quarantine/ (its cell then counts as not finished) and say so in one line; return
    where it went (None when the store is read-only: the part is then only skipped)."""
    folder = _store_root(path) / "quarantine"
    try:
        folder.mkdir(exist_ok=True)
        n = len(list(folder.glob(f"{path.name}.*.corrupt")))
        dest = folder / f"{path.name}.{n}.corrupt"
        os.replace(path, dest)
    except OSError:
        on_warning(f"corrupt part {path} skipped ({reason}); the store is read-only, so it stays in place")
        return None
    on_warning(f"corrupt part {path} moved to {dest} ({reason}); its cell will be re-run by the next `bench run`")
    return dest


def finished(
    results: str | Path, machine_id: str | Collection[str], on_warning: Callable[[str], None] = warn
) -> set[str]:
    """Keys of the cells with a valid part from machine `machine_id` (or from any of several: the machines of a Ray
    fleet), whatever the outcome: a failed cell is not retried unless forced. Invalid parts are quarantined, so their
    cells are not finished."""
    machines = {machine_id} if isinstance(machine_id, str) else set(machine_id)
    folder = Path(results) / "parts"
    if not folder.is_dir():
        return set()
    out = set()
    for p in sorted(folder.iterdir()):
        suffix = next((f"-{m}.parquet" for m in machines if p.name.endswith(f"-{m}.parquet")), None)
        if suffix is None or p.name.startswith("."):
            continue
        try:
            read_part(p)
        except ValueError as err:
            quarantine(p, str(err), on_warning)
            continue
        out.add(p.name[: -len(suffix)])
    return out


def parts(dirs: Iterable[str | Path]) -> list[Path]:
    out = []
    for d in dirs:
        out.extend(sorted(p for p in Path(d).rglob("*.parquet") if not p.name.startswith(".")))
    return out


def load(*dirs: str | Path, on_warning: Callable[[str], None] = warn) -> pd.DataFrame:
    """Every valid row under `dirs` (searched recursively, so stores nest and merge), as one DataFrame. Parts that
    fail validation are quarantined (see `quarantine`) and left out."""
    frames = []
    for f in parts(dirs):
        try:
            frames.append(read_part(f))
        except ValueError as err:
            quarantine(f, str(err), on_warning)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


def remove_stale(results: str | Path, *, owner: str | None = None) -> int:
    """Delete temporary files (and cell scratch folders) left by killed writers; return how many.

    With `owner`, only that run's own leftovers go. Without, every run's: call it that way only while holding the
    store's lock (`Lock`), which proves that no other sweep is writing."""
    root = Path(results)
    pattern = f"*.{owner}{_TMP_SUFFIX}" if owner else f"*{_TMP_SUFFIX}"
    stale = [p for p in (root / "parts").glob(f".{pattern}")] if (root / "parts").is_dir() else []
    scratch = [p for p in root.glob(f".scratch-{owner or '*'}") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    for p in scratch:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale) + len(scratch)


def scratch_dir(results: str | Path, owner: str) -> Path:
    """A run's scratch folder inside the store (cell inputs and outputs): removed by the run at exit, and by the next
    sweep if the run was killed, so nothing leaks into the system's temporary folder."""
    path = Path(results) / f".scratch-{owner}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- merging stores -------------------------------------------------------------------------------------------------


@dataclass
class Merged:
    """What `merge` did: counts of parts, and one line per conflict or invalid part."""

    copied: int = 0  # new to DST
    replaced: int = 0  # DST held an older run of the same cell and machine
    identical: int = 0  # DST already held the same file
    kept: int = 0  # DST held a newer (or same-age, different) run: left as it was
    invalid: int = 0  # failed validation: not merged
    lines: list[str] = field(default_factory=list)

    @property
    def conflicts(self) -> int:
        return self.replaced + self.kept


def part_identity(path: Path, frame: pd.DataFrame) -> tuple[str, str]:
    """(cell key, machine id) of a part, from its rows (`key`, `env_machine_id`); the machine from the file name
    (`<key>-<machine>.parquet`) for rows without it. ValueError (one line) for a part of several cells or machines."""
    keys = frame["key"].dropna().astype(str).unique()
    if len(keys) != 1:
        raise ValueError(f"holds rows of {len(keys)} cells, not one")
    key = keys[0]
    if "env_machine_id" in frame and frame["env_machine_id"].notna().any():
        machines = frame["env_machine_id"].dropna().astype(str).unique()
        if len(machines) != 1:
            raise ValueError(f"holds rows of {len(machines)} machines, not one")
        return key, machines[0]
    stem = path.name[: -len(".parquet")]
    if not stem.startswith(key + "-") or len(stem) == len(key) + 1:
        raise ValueError("no env_machine_id column, and its file name does not name the machine")
    return key, stem[len(key) + 1:]


_NO_DATE = pd.Timestamp.min.tz_localize("UTC")


def _age(frame: pd.DataFrame) -> tuple[pd.Timestamp, str]:
    """When a part's run happened: its latest `env_date` (UTC), then its run id, for ordering two runs of a cell."""
    date = _NO_DATE
    if "env_date" in frame:
        dates = pd.to_datetime(frame["env_date"], utc=True, errors="coerce")
        date = dates.max() if dates.notna().any() else _NO_DATE
    run = str(frame["run_id"].dropna().astype(str).max()) if "run_id" in frame and frame["run_id"].notna().any() \
        else ""
    return date, run


def _describe(age: tuple[pd.Timestamp, str]) -> str:
    date, run = age
    when = "undated" if date == _NO_DATE else date.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"run {run or '?'} ({when})"


def merge(
    sources: Iterable[str | Path], into: str | Path, *, run_id: str | None = None,
    on_warning: Callable[[str], None] = warn,
) -> Merged:
    """Copy every valid part under `sources` (searched recursively) into the store `into`, keyed by cell and machine
    (`part_path`), each copy atomic, under `into`'s lock (`StoreLocked` when a runner holds it). A part DST already
    holds byte for byte is left; a different part of the same cell and machine is a conflict: the newer run (by
    `env_date`, then run id) is kept, and one line says which. Invalid parts are skipped with one line each; sources
    are only read, never quarantined."""
    into = check_writable_dir(into, "--into")
    owner = run_id or f"merge-{os.getpid()}"
    out = Merged()
    root = into.resolve()
    with Lock(into, owner):
        remove_stale(into)
        for src in parts(sources):
            if src.resolve().is_relative_to(root):
                continue  # DST nested in (or equal to) a source: its own parts are not sources
            try:
                frame = read_part(src)
                key, machine = part_identity(src, frame)
            except ValueError as err:
                out.invalid += 1
                out.lines.append(f"invalid part {src} not merged ({err})")
                continue
            dest = part_path(into, key, machine)
            if dest.exists():
                if filecmp.cmp(src, dest, shallow=False):
                    out.identical += 1
                    continue
                try:
                    held = read_part(dest)
                except ValueError as err:
                    quarantine(dest, str(err), on_warning)
                else:
                    new, old = _age(frame), _age(held)
                    if new <= old:
                        out.kept += 1
                        out.lines.append(f"conflict: {dest.name}: kept {_describe(old)} in {into}; "
                                         f"{_describe(new)} from {src} is not newer")
                        continue
                    out.replaced += 1
                    out.lines.append(f"conflict: {dest.name}: replaced {_describe(old)} with the newer "
                                     f"{_describe(new)} from {src}")
                    copy_part(src, dest, owner=owner)
                    continue
            copy_part(src, dest, owner=owner)
            out.copied += 1
    return out


class Lock:
    """The writer's lock on a results directory (`filelock`, released by the OS when the holder dies, even by
    kill -9). Beside it, `.lock.holder` says who holds it, so that a second runner fails naming the holder."""

    def __init__(self, results: str | Path, run_id: str) -> None:
        self.root = Path(results)
        self.run_id = run_id
        self._lock = filelock.FileLock(str(self.root / ".lock"), timeout=0)
        self._holder = self.root / ".lock.holder"

    def holder(self) -> str:
        try:
            info = json.loads(self._holder.read_text())
            return f"pid {info['pid']} on {info['host']}, run {info['run_id']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process (no readable .lock.holder)"

    def __enter__(self) -> Lock:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreLocked(
                f"results directory {str(self.root)!r} is in use by another runner ({self.holder()}); wait for it "
                f"or use another --results"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._holder.write_text(json.dumps(info))
        return self

    def __exit__(self, *exc) -> None:
        self._holder.unlink(missing_ok=True)
        self._lock.release()


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove it writable by writing a probe file; StoreError (one line) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{what} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StoreError(f"{what} {str(path)!r} is not writable: {err.strerror or err}") from None
    return path


def check_writable_file(path: str | Path, what: str) -> Path:
    """Check that a file can be written at `path` (its folder writable, the path not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{what} {str(path)!r} is a directory; give a file name")
    check_writable_dir(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreError(f"{what} {str(path)!r} is not writable")
    return path
