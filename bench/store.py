"""The results store: a directory of parquet part files, one per (cell, machine), each written atomically.

    DIR/parts/<cell key>-<machine id>.parquet     one row per repetition (or one row saying why the cell failed)

A part appears complete or not at all (written to a temporary name, then `os.replace`d), so a sweep killed at any
moment loses at most the cell in hand, and a re-run skips every cell that has its part. Stores from several
machines merge by copying their parts into one directory (or by loading several directories at once).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def part_path(results: str | Path, key: str, machine_id: str) -> Path:
    return Path(results) / "parts" / f"{key}-{machine_id}.parquet"


def write_part(path: Path, rows: Sequence[dict]) -> None:
    """Write `rows` as one parquet file at `path`, atomically (readers see the old state or the whole new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table = pa.Table.from_pylist([dict(r) for r in rows])
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale(results: str | Path) -> int:
    """Delete temporary files left by a writer that was killed mid-write; return how many. Call only when no other
    sweep writes to `results`."""
    folder = Path(results) / "parts"
    stale = list(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def finished(results: str | Path, machine_id: str) -> set[str]:
    """Keys of the cells whose part from machine `machine_id` exists (any outcome: a failed cell is not retried
    unless forced)."""
    suffix = f"-{machine_id}.parquet"
    folder = Path(results) / "parts"
    if not folder.is_dir():
        return set()
    return {p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")}


def parts(dirs: Iterable[str | Path]) -> list[Path]:
    out = []
    for d in dirs:
        out.extend(sorted(p for p in Path(d).rglob("*.parquet") if not p.name.startswith(".")))
    return out


def load(*dirs: str | Path) -> pd.DataFrame:
    """Every row under `dirs` (searched recursively, so stores nest and merge), as one DataFrame."""
    files = parts(dirs)
    if not files:
        return pd.DataFrame()
    frames = [pq.read_table(f).to_pandas() for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)
