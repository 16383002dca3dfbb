"""Fault trials of the results store, the sweep and the merge: `python -m bench.fault_trials` - the measurements behind
the README's reliability section. Four trials, each counting what happened:

1. `kill`: kill -9 of `bench run` (the runner process alone: its cell must die with it) at a random moment of the
   sweep (drawn uniformly over its start-up and remaining cells, their durations measured as it goes), the same store
   resumed
   by the next run and killed again, then a last run to completion. Checked after every kill: every
   part on disk is valid, every part present before the kill is byte for byte unchanged, no cell process outlives the
   runner; at the end: every cell once, successful, and no temporary file, scratch folder or lock holder left.
2. `write`: kill -9 of a process writing large parts in a loop (so that most kills land inside a write): every
   visible part valid afterwards, and the leftovers only hidden temporary files, which the next sweep removes.
3. `flip`: one byte of a real part flipped (or the part truncated) at a random offset, read back: caught, harmless
   (the rows read back exactly as written) or missed - for parts with their checksum and, for comparison, for the
   same rows written without one (as before checksums existed).
4. `merge`: kill -9 of `bench merge` of many parts into a fresh destination at a random moment of the merge, then
   the same merge again: every part in the destination valid after the kill, and equal to the source after the
   second merge.

Run on one machine, small matrices (tiny-llama cells of a few seconds, most of it the interpreter starting).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench import store

MATRIX = """[matrix]
name = "fault-trials"
models = ["tiny-llama"]
batch_sizes = [1]
text_lengths = [16]
new_tokens = [4]
methods = ["full", "streaming_llm", "h2o", "snapkv", "uniform", "prefixkv"]
budgets = [0.25]
repetitions = 1
warmup = 0
cpu_threads = 1
timeout_s = 300
"""
CELLS = 6
_ROOT = str(Path(__file__).parent.parent)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}


def _valid(results: Path) -> tuple[int, int]:
    """(valid, invalid) part files of a store, read without quarantining anything."""
    good = bad = 0
    for path in sorted((results / "parts").glob("*.parquet")) if (results / "parts").is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            store.read_part(path)
            good += 1
        except ValueError:
            bad += 1
    return good, bad


def _processes_under(folder: Path) -> list[int]:
    """Pids of processes whose command line names a path inside `folder` (a store's cells name their scratch files)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in out if pid != os.getpid()]


def _snapshot(results: Path) -> dict[str, bytes]:
    folder = results / "parts"
    return {p.name: p.read_bytes() for p in folder.glob("*.parquet") if not p.name.startswith(".")} \
        if folder.is_dir() else {}


def kill_trials(work: Path, kills: int, rng: random.Random) -> dict:
    """kill -9 of `bench run` at a moment drawn uniformly over what remains of the sweep (its start-up and each
    remaining cell, with durations measured as it goes), the store resumed by the next run."""
    matrix = work / "matrix.toml"
    matrix.write_text(MATRIX)
    counts = {"kills": 0, "stores": 0, "finished_before_kill": 0, "parts_at_kills": [], "parts_lost_or_changed": 0,
              "invalid_parts": 0, "orphan_cells": 0, "cells_at_end": 0, "failed_cells_at_end": 0,
              "leftovers_at_end": 0}
    firsts, cells = [40.0], [20.0]  # seconds to a run's first part (start-up + a cell), and between parts: guesses
    results = None
    while counts["kills"] < kills:
        if results is None:
            counts["stores"] += 1
            results = work / f"store{counts['stores']}"
        held = len(_snapshot(results))
        if held == CELLS:  # the last kill landed after the last part: this store is done
            results = None
            continue
        cell_s = sum(cells) / len(cells)
        delay = rng.uniform(0.0, sum(firsts) / len(firsts) + (CELLS - held - 1) * cell_s)
        args = [sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results)]
        runner = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = last = time.monotonic()
        count = held
        while runner.poll() is None and time.monotonic() - started < delay:
            time.sleep(0.05)
            now = len(_snapshot(results))
            if now > count:
                (firsts if count == held else cells).append(time.monotonic() - last)
                last, count = time.monotonic(), now
        before = _snapshot(results)
        if runner.poll() is not None:  # the sweep finished first: nothing was killed; start a fresh store
            counts["finished_before_kill"] += 1
            results = None
            continue
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        counts["kills"] += 1
        counts["parts_at_kills"].append(len(before))
        time.sleep(2.0)  # the parent-death signal is immediate; allow for a loaded machine
        orphans = _processes_under(results)
        counts["orphan_cells"] += len(orphans)
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
        after = _snapshot(results)
        counts["parts_lost_or_changed"] += sum(after.get(name) != data for name, data in before.items())
        counts["invalid_parts"] += _valid(results)[1]
        print(f"kill {counts['kills']}/{kills}: {len(after)} of {CELLS} cells stored, {len(orphans)} orphan(s)",
              file=sys.stderr, flush=True)
    for i in range(1, counts["stores"] + 1):
        results = work / f"store{i}"
        subprocess.run([sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results)],
                       env=_env(), capture_output=True, check=True)
        frame = store.load(results)
        counts["cells_at_end"] += frame["key"].nunique()
        counts["failed_cells_at_end"] += int((frame.groupby("key")["status"].first() != "ok").sum())
        counts["leftovers_at_end"] += len([p for p in results.rglob("*") if p.name.endswith(".tmp")
                                           or p.name.startswith(".scratch") or p.name == ".lock.holder"])
    counts["cells_expected_at_end"] = CELLS * counts["stores"]
    return counts


_WRITER = """
import random, sys
from pathlib import Path
from bench import store
results, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
steps = [rng.random() for _ in range(200_000)]  # a large part: most of a kill's chances land inside a write
i = 0
while True:
    store.write_part(store.part_path(results, f"k{seed}x{i % 7}", "m0"),
                     [{"key": f"k{seed}x{i % 7}", "status": "ok", "rep": 0, "decode_steps_s": steps}], owner=f"w{seed}")
    print(i, flush=True)  # one line per part written: the parent kills at a random moment after the first
    i += 1
"""


def write_trials(work: Path, kills: int, rng: random.Random) -> dict:
    results = work / "writes"
    counts = {"kills": 0, "invalid_parts": 0, "temporary_files_left": 0, "removed_by_next_sweep": 0}
    for trial in range(kills):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(results), str(trial)], env=_env(),
                                  stdout=subprocess.PIPE, text=True)
        start = time.monotonic()
        writer.stdout.readline()  # the first part is written: the writer is in its loop
        first = time.monotonic() - start
        time.sleep(rng.uniform(0.0, min(first, 3.0)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        counts["kills"] += 1
        counts["invalid_parts"] += _valid(results)[1]
    counts["temporary_files_left"] = len(list((results / "parts").glob(".*.tmp")))
    with store.Lock(results, "fault-trials"):
        counts["removed_by_next_sweep"] = store.remove_stale(results)
    counts["valid_parts"] = _valid(results)[0]
    return counts


def flip_trials(parts: list[Path], flips: int, rng: random.Random, work: Path) -> dict:
    """Flips and truncations of `parts` (with checksums) and of copies of their rows written without one."""
    unverified = []
    for i, path in enumerate(parts):
        table = pq.read_table(path)
        copy = work / "unverified" / "parts" / f"u{i}-m0.parquet"
        copy.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata(None), copy)
        unverified.append(copy)
    out = {}
    for label, files in (("with_checksum", parts), ("without_checksum", unverified)):
        for damage in ("flip", "truncate"):
            counts = {"trials": 0, "caught": 0, "harmless": 0, "missed": 0}
            for _ in range(flips if damage == "flip" else max(1, flips // 10)):
                path = rng.choice(files)
                data = path.read_bytes()
                original = store.read_part(path)
                if damage == "flip":
                    damaged = bytearray(data)
                    damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                else:
                    damaged = data[: rng.randrange(len(data))]
                path.write_bytes(bytes(damaged))
                counts["trials"] += 1
                try:
                    frame = store.read_part(path)
                except ValueError:
                    counts["caught"] += 1
                else:
                    counts["harmless" if frame.to_json() == original.to_json() else "missed"] += 1
                finally:
                    path.write_bytes(data)
            out[f"{damage}_{label}"] = counts
    return out


def _synthetic_parts(results: Path, n_parts: int) -> list[Path]:
    """`n_parts` small parts of three repetitions each, shaped as `bench run` writes them."""
    for i in range(n_parts):
        key = f"{i:016x}"
        store.write_part(store.part_path(results, key, "m0"), [
            {"key": key, "status": "ok", "rep": r, "budget": 0.5, "new_tokens": 16, "env_machine_id": "m0",
             "run_id": "r1", "env_date": "2026-01-01T00:00:00+00:00", "decode_steps_s": [0.01 + i * 1e-6] * 64}
            for r in range(3)])
    return store.parts([results])


def merge_trials(work: Path, kills: int, n_parts: int, rng: random.Random) -> dict:
    source = work / "merge-source"
    _synthetic_parts(source, n_parts)
    args = [sys.executable, "-m", "bench", "merge", str(source), "--into"]
    start = time.monotonic()
    subprocess.run([*args, str(work / "merge-timed")], env=_env(), capture_output=True, check=True)
    seconds = time.monotonic() - start
    counts = {"parts": n_parts, "full_merge_s": round(seconds, 1), "kills": 0, "finished_before_kill": 0,
              "invalid_parts": 0, "parts_at_kills": [], "equal_after_merging_again": 0, "temporary_files_left": 0}
    for trial in range(kills):
        into = work / f"merge-into{trial}"
        merger = subprocess.Popen([*args, str(into)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, seconds))
        if merger.poll() is None:
            merger.send_signal(signal.SIGKILL)
            counts["kills"] += 1
        else:
            counts["finished_before_kill"] += 1
        merger.wait()
        good, bad = _valid(into)
        counts["invalid_parts"] += bad
        counts["parts_at_kills"].append(good)
        subprocess.run([*args, str(into)], env=_env(), capture_output=True, check=True)
        dst = {p.name: p.read_bytes() for p in store.parts([into])}
        counts["equal_after_merging_again"] += dst == {p.name: p.read_bytes() for p in store.parts([source])}
        counts["temporary_files_left"] += len([p for p in into.rglob(".*") if p.name.endswith(".tmp")])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fault_trials", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=15, help="kill -9s of `bench run`")
    parser.add_argument("--write-kills", type=int, default=12, help="kill -9s of a process writing parts")
    parser.add_argument("--flips", type=int, default=1000, help="byte flips per kind of part (truncations: 1/10)")
    parser.add_argument("--merge-kills", type=int, default=7, help="kill -9s of `bench merge`")
    parser.add_argument("--merge-parts", type=int, default=1500, help="parts in the merged store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", default="kill,write,flip,merge", help="which trials to run (flip reads the "
                        "parts the kill trials wrote; without them, it writes a store of its own)")
    parser.add_argument("--json", type=Path, help="write the counts here as JSON")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fault-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        command = " ".join(["python -m bench.fault_trials", *(sys.argv[1:] if argv is None else argv)])
        result: dict = {"seed": args.seed, "command": command,
                        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
        chosen = set(args.trials.split(","))
        started = time.monotonic()
        if "kill" in chosen:
            result["kill"] = kill_trials(work, args.kills, rng)
            print(json.dumps(result["kill"]), file=sys.stderr, flush=True)
        if "write" in chosen:
            result["write"] = write_trials(work, args.write_kills, rng)
            print(json.dumps(result["write"]), file=sys.stderr, flush=True)
        if "flip" in chosen:
            parts = store.parts(sorted(work.glob("store*"))) or _synthetic_parts(work / "flip-source", 12)
            result["flip"] = flip_trials(parts, args.flips, rng, work)
            print(json.dumps(result["flip"]), file=sys.stderr, flush=True)
        if "merge" in chosen:
            result["merge"] = merge_trials(work, args.merge_kills, args.merge_parts, rng)
        result["seconds"] = round(time.monotonic() - started)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
