"""The results store: a directory of parquet part files, one per (cell, machine), each written atomically.

    DIR/parts/<cell key>-<machine id>.parquet     one row per repetition (or one row saying why the cell failed)
    DIR/quarantine/<part name>.<n>.corrupt        parts that failed validation on read, moved aside
    DIR/.lock, DIR/.lock.holder                   the writer's lock (filelock) and who holds it (pid, host, run id)

A part appears complete or not at all (written to a temporary name owned by its run, then `os.replace`d), so a sweep
killed at any moment loses at most the cell in hand, and a re-run skips every cell that has a valid part. Each part
records the SHA-256 of its content (column names and values) in its schema metadata when it is written, and every
read checks it: a flipped byte, a truncated copy or an edit that keeps the metadata is caught. A part that fails
validation on read (checksum, parquet structure, invalid UTF-8, a key that is not a safe file name, a configuration
no matrix accepts) is quarantined: one warning line names it, its cell counts as not finished (the next `run`
re-runs it) and readers go on with the valid parts. Parts written before checksums existed are read unverified.

A store is a directory holding a `parts` folder. Readers take several directories at once; a directory that is not
a store is searched for the stores below it, and a store's own sub-folders are not searched (a store nested in
another is named in a warning and not read), so every part is read once. Stores from several machines merge into one
with `bench.merge`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import filelock
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: Columns a part must have to be read as one.
REQUIRED_COLUMNS = ("key", "status")
#: Configuration columns and the ranges a matrix allows them (`bench.matrix`): (low, low is allowed, high).
CONFIG_RANGES = {
    "budget": (0.0, False, 1.0),
    "batch_size": (1, True, None),
    "text_tokens": (1, True, None),
    "new_tokens": (2, True, None),
}
#: Schema metadata key of a part's content checksum (`content_digest`).
DIGEST_KEY = b"prefixkv_bench.content_sha256"
_TMP_SUFFIX = ".tmp"
#: What a cell key or a machine id may be, so that a part's file name stays inside DIR/parts: no path separator, no
#: control character, not hidden (hidden names are temporary files), at most 100 characters.
_SAFE_NAME = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,99}")
#: Members of a store directory and the kind each must be where it exists.
_LAYOUT = {".lock": "file", ".lock.holder": "file", "parts": "directory", "quarantine": "directory"}


class StoreError(OSError):
    """The store cannot be used or written (locked, read-only, disk full); the message is one line."""


class StoreUnusable(StoreError):
    """A store that cannot be used as given (bad input rather than a failure): locked, nested in another, a member of
    the wrong type."""


class StoreLocked(StoreUnusable):
    """Another runner holds the results directory."""


def safe_name(value: object, what: str) -> str:
    """`value` when it can be part of a part's file name (see `_SAFE_NAME`); ValueError (one line) naming it."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a safe file name (no '/', '\\', control character or leading '.', "
                         "at most 100 characters)")
    return value


def part_path(results: str | Path, key: str, machine_id: str) -> Path:
    """Where the part of cell `key` from machine `machine_id` lives; ValueError when either is not a safe name, so
    that no part is ever written outside DIR/parts."""
    return Path(results) / "parts" / f"{safe_name(key, 'cell key')}-{safe_name(machine_id, 'machine id')}.parquet"


def _tmp_name(path: Path, owner: str) -> Path:
    return path.with_name(f".{path.name}.{owner}{_TMP_SUFFIX}")


def content_digest(table: pa.Table) -> str:
    """SHA-256 of a table's column names and values - not of their encoding, which another pyarrow may change."""
    content = {name: table.column(name).to_pylist() for name in table.column_names}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def write_part(path: Path, rows: Sequence[dict], *, owner: str | None = None) -> None:
    """Write `rows` as one parquet file at `path` with its content checksum, atomically (readers see the old state or
    the whole new file).

    The temporary file carries `owner` (the run id; the pid by default) in its name, so a sweep can tell its own
    leftovers from another writer's. A failed write (disk full, read-only) removes the temporary file and raises
    `StoreError` with one line naming the part."""
    try:
        table = pa.Table.from_pylist([dict(r) for r in rows])
    except (pa.ArrowException, OverflowError) as err:
        raise StoreError(f"cannot store the rows of {path.name}: {err}") from None
    table = table.replace_schema_metadata({DIGEST_KEY: content_digest(table).encode()})
    _write_atomically(path, owner, lambda f: pq.write_table(table, f))


def _write_atomically(path: Path, owner: str | None, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a temporary file owned by `owner` (the pid by default), fsync it, then `os.replace` it onto `path`;
    on failure the temporary file is removed and StoreError names `path` in one line. `os.replace` swaps a symbolic
    link at `path` for the file; it never writes through it."""
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
    """One part as a DataFrame; ValueError (one line) when it is not a complete, well-formed part: unreadable
    parquet, content that does not match its checksum, invalid UTF-8, missing columns or rows, a cell key that is not
    a safe name, or a configuration outside what a matrix accepts."""
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # e.g. invalid UTF-8 in a string column, which pandas would choke on later
        recorded = (table.schema.metadata or {}).get(DIGEST_KEY)
        intact = recorded is None or recorded.decode(errors="replace") == content_digest(table)
    except Exception as err:  # noqa: BLE001 - damaged bytes can fail anywhere in the reader; each is one line here
        raise ValueError(_one_line(err)) from None
    if not intact:
        raise ValueError("its content does not match its checksum (corrupted)")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"no column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise ValueError("no rows")
    _check_columns(table)
    try:
        return table.to_pandas()
    except Exception as err:  # noqa: BLE001 - as above
        raise ValueError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
    return f"{type(err).__name__}: {first[:300]}"


def _check_columns(table: pa.Table) -> None:
    """The row checks of `read_part`, on the arrow table (where a null and a NaN differ)."""
    for name in REQUIRED_COLUMNS:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
            raise ValueError(f"column {name} must hold a string in every row")
    for key in pc.unique(table.column("key")).to_pylist():
        safe_name(key, "cell key")
    for name, (low, low_allowed, high) in CONFIG_RANGES.items():
        if name not in table.column_names:
            continue
        column = table.column(name)
        values = column.to_pylist()
        numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        bad = [v for v in values if not numeric or v is None or v != v or not (v >= low if low_allowed else v > low)
               or (high is not None and v > high)]
        if bad:
            bound = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise ValueError(f"column {name} holds {bad[0]!r}; a matrix allows only numbers {bound}")


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


def stores(dirs: Iterable[str | Path], on_warning: Callable[[str], None] = warn) -> list[Path]:
    """The stores under `dirs`, each once (however often it is reached): a directory holding a `parts` folder is a
    store, and its own sub-folders are not searched; any other directory is searched for the stores below it. A store
    nested inside another is named in one warning line and not read: pass it on its own."""
    found: dict[Path, Path] = {}
    for d in map(Path, dirs):
        if d.name == "parts" and not (d / "parts").is_dir():
            d = d.parent  # a store's parts folder given for the store
        for root in sorted(p.parent for p in d.rglob("parts") if p.is_dir()):
            found.setdefault(root.resolve(), root)
    roots = sorted(found)
    out = []
    for resolved in roots:
        outer = next((other for other in roots if other != resolved and resolved.is_relative_to(other)), None)
        if outer is not None:
            on_warning(f"store {found[resolved]} is nested inside the store {found[outer]}: not read with it (pass it "
                       "on its own; stores must not nest)")
            continue
        out.append(found[resolved])
    return out


def parts(dirs: Iterable[str | Path], on_warning: Callable[[str], None] = warn) -> list[Path]:
    """Every part file of the stores under `dirs` (see `stores`), each once."""
    out = []
    for root in stores(dirs, on_warning):
        out.extend(sorted(p for p in (root / "parts").glob("*.parquet") if not p.name.startswith(".")))
    return out


def load(
    *dirs: str | Path,
    on_warning: Callable[[str], None] = warn,
    on_invalid: Callable[[Path, str], None] | None = None,
) -> pd.DataFrame:
    """Every valid row of the stores under `dirs` (see `stores`), as one DataFrame. Parts that fail validation are
    quarantined (see `quarantine`), left out, and passed with the reason to `on_invalid`."""
    frames = []
    for f in parts(dirs, on_warning):
        try:
            frames.append(read_part(f))
        except ValueError as err:
            quarantine(f, str(err), on_warning)
            if on_invalid is not None:
                on_invalid(f, str(err))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


def remove_stale(results: str | Path, *, owner: str | None = None) -> int:
    """Delete temporary files (and cell scratch folders) left by killed writers; return how many.

    With `owner`, only that run's own leftovers go. Without, every run's: call it that way only while holding the
    store's lock (`Lock`), which proves that no other sweep is writing."""
    root = Path(results)
    # Parts' temporary files and the lock holder's; not other tools' temporary files beside the store (a report's).
    patterns = [(root / "parts", _tmp_name(root / "parts" / "*", owner or "*").name),
                (root, _tmp_name(root / ".lock.holder", owner or "*").name)]
    stale = [p for folder, pattern in patterns if folder.is_dir() for p in folder.glob(pattern)
             if p.is_file() or p.is_symlink()]
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


class Lock:
    """The writer's lock on a results directory (`filelock`, released by the OS when the holder dies, even by
    kill -9). Beside it, `.lock.holder` says who holds it, so that a second runner fails naming the holder. Entering
    checks the store's layout (`check_layout`) first."""

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
        check_layout(self.root)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreLocked(
                f"results directory {str(self.root)!r} is in use by another runner ({self.holder()}); wait for it "
                f"or use another --results"
            ) from None
        except OSError as err:
            raise StoreUnusable(f"cannot lock {self.root / '.lock'}: {err.strerror or err}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            _write_atomically(self._holder, self.run_id, lambda f: f.write(json.dumps(info).encode()))
        except StoreError:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._holder.unlink(missing_ok=True)
        self._lock.release()


def check_layout(root: str | Path) -> None:
    """StoreUnusable (one line) when a member of the store `root` has the wrong type (`parts` a file, `.lock` a
    directory) or is a symbolic link (writing through it would change a file outside the store)."""
    for name, kind in _LAYOUT.items():
        path = Path(root) / name
        if path.is_symlink():
            raise StoreUnusable(f"{path} is a symbolic link; a store's {name} must be a plain {kind} (remove it)")
        if path.exists() and path.is_dir() != (kind == "directory"):
            raise StoreUnusable(f"{path} is a {'directory' if path.is_dir() else 'file'}, not a {kind} (remove it)")


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove it writable by writing a probe file; StoreUnusable (one line) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreUnusable(f"{what} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StoreUnusable(f"{what} {str(path)!r} is not writable: {err.strerror or err}") from None
    return path


def check_writable_file(path: str | Path, what: str) -> Path:
    """Check that a file can be written at `path` (its folder writable, the path not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise StoreUnusable(f"{what} {str(path)!r} is a directory; give a file name")
    check_writable_dir(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreUnusable(f"{what} {str(path)!r} is not writable")
    return path
