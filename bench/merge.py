"""Merging results stores (several machines or GPU kinds) into one: `python -m bench merge SRC... --into DST`.

Every valid part of the sources (each store read once, see `bench.store.stores`) is copied atomically into DST under
DST's lock, at the path of its cell and machine - both taken from the part's rows and refused unless they are safe
file names (`bench.store.part_path`), so nothing is ever written outside DST/parts. Where DST already holds a
different part of the same cell and machine, one line names the conflict and the better part stays:
- a successful part is never replaced by a failed one (and a successful part replaces a failed one, whatever their
  dates);
- between parts of the same outcome the newer run wins (by `env_date`, then run id); a date in the future (beyond
  this machine's clock and a day of skew) is ordered as undated, so a part dated 9999 cannot block every later run.
A destination nested in a source, or a source nested in the destination, is refused: stores must not nest. Invalid
parts are skipped with one line each; sources are only read, never quarantined.
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.store import (
    Lock,
    StoreUnusable,
    check_writable_dir,
    copy_part,
    part_path,
    parts,
    quarantine,
    read_part,
    remove_stale,
    safe_name,
    warn,
)

#: How far in the future a part's date may lie (clock skew between machines) before it is taken as undated.
CLOCK_SKEW = pd.Timedelta(days=1)
_NO_DATE = pd.Timestamp.min.tz_localize("UTC")


@dataclass
class Merged:
    """What `merge` did: counts of parts, and one line per conflict or invalid part."""

    copied: int = 0  # new to DST
    replaced: int = 0  # DST held a failed or older run of the same cell and machine
    identical: int = 0  # DST already held the same file
    kept: int = 0  # DST held a better run (successful, or newer, or same-age and different): left as it was
    invalid: int = 0  # failed validation: not merged
    lines: list[str] = field(default_factory=list)

    @property
    def conflicts(self) -> int:
        return self.replaced + self.kept


def part_identity(path: Path, frame: pd.DataFrame) -> tuple[str, str]:
    """(cell key, machine id) of a part, from its rows (`key`, `env_machine_id`); the machine from the file name
    (`<key>-<machine>.parquet`) for rows without it. ValueError (one line) for a part of several cells or machines,
    or a key or machine id that is not a safe file name."""
    keys = frame["key"].dropna().astype(str).unique()
    if len(keys) != 1:
        raise ValueError(f"holds rows of {len(keys)} cells, not one")
    key = safe_name(keys[0], "cell key")
    if "env_machine_id" in frame and frame["env_machine_id"].notna().any():
        machines = frame["env_machine_id"].dropna().unique()
        if len(machines) != 1:
            raise ValueError(f"holds rows of {len(machines)} machines, not one")
        return key, safe_name(machines[0], "machine id")
    stem = path.name[: -len(".parquet")]
    if not stem.startswith(key + "-") or len(stem) == len(key) + 1:
        raise ValueError("no env_machine_id column, and its file name does not name the machine")
    return key, safe_name(stem[len(key) + 1:], "machine id")


@dataclass(frozen=True, order=True)
class _Rank:
    """How good a part is, for a conflict: successful first, then the newer run."""

    ok: bool
    date: pd.Timestamp
    run: str
    future: bool = field(default=False, compare=False)  # its date was in the future, so it is ordered as undated

    def describe(self) -> str:
        if self.future:
            when = "dated in the future: ordered as undated"
        else:
            when = "undated" if self.date == _NO_DATE else self.date.strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{'successful' if self.ok else 'failed'} run {self.run or '?'} ({when})"


def _rank(frame: pd.DataFrame, now: pd.Timestamp) -> _Rank:
    """A part's rank: whether every row succeeded, its latest `env_date` (UTC; undated when missing, unreadable or
    in the future), then its run id."""
    ok = bool((frame["status"] == "ok").all())
    date, future = _NO_DATE, False
    if "env_date" in frame:
        dates = pd.to_datetime(frame["env_date"], utc=True, errors="coerce")
        if dates.notna().any():
            date = dates.max()
            if date > now + CLOCK_SKEW:
                date, future = _NO_DATE, True
    runs = frame["run_id"].dropna().astype(str) if "run_id" in frame else pd.Series(dtype=str)
    return _Rank(ok, date, runs.max() if len(runs) else "", future)


def check_not_nested(sources: Iterable[str | Path], into: str | Path) -> None:
    """StoreUnusable (one line) when the destination is a source, lies inside one, or holds one."""
    dest = Path(into).resolve()
    for src in sources:
        where = Path(src).resolve()
        if where == dest:
            raise StoreUnusable(f"source {str(src)!r} is the destination itself")
        if dest.is_relative_to(where):
            raise StoreUnusable(f"--into {str(into)!r} is inside the source {str(src)!r}: stores must not nest (a "
                                "nested store is read twice or not at all); merge into a folder outside every source")
        if where.is_relative_to(dest):
            raise StoreUnusable(f"source {str(src)!r} is inside --into {str(into)!r}: stores must not nest; move it "
                                "out first")


def merge(
    sources: Iterable[str | Path], into: str | Path, *, run_id: str | None = None,
    on_warning: Callable[[str], None] = warn,
) -> Merged:
    """Copy every valid part of the stores under `sources` into the store `into` (see the module docstring), under
    `into`'s lock (`StoreLocked` when a runner holds it); StoreUnusable when the stores nest or `into` cannot be
    written."""
    sources = list(sources)
    check_not_nested(sources, into)
    into = check_writable_dir(into, "--into")
    owner = run_id or f"merge-{os.getpid()}"
    now = pd.Timestamp.now(tz="UTC")
    out = Merged()
    with Lock(into, owner):
        remove_stale(into)
        for src in parts(sources, on_warning):
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
                    new, old = _rank(frame, now), _rank(held, now)
                    if new <= old:
                        out.kept += 1
                        out.lines.append(f"conflict: {dest.name}: kept the {old.describe()} in {into}; the "
                                         f"{new.describe()} from {src} is not better")
                        continue
                    out.replaced += 1
                    out.lines.append(f"conflict: {dest.name}: replaced the {old.describe()} with the better "
                                     f"{new.describe()} from {src}")
                    copy_part(src, dest, owner=owner)
                    continue
            copy_part(src, dest, owner=owner)
            out.copied += 1
    return out
