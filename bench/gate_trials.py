"""Trials of the regression gate on this machine: how often it cries wolf, and what it catches.

    python -m bench.gate_trials --trials 20 --rounds 2 --slowdowns 0.1,0.2 --out /tmp/gate-trials

Each trial runs the same small matrix for a baseline and for every current side - the unchanged code (the A/A pair)
and the code with an injected decode slowdown of each size - in interleaved rounds, as `nox -s regress` does, then
judges each current side against the baseline with `bench.compare` at the given factor and alpha. The slowdown is
injected by running the current side's cells through `bench.injected_cell` (a sleep before every decode step of the
method, never of the full-cache reference beside it), sized from the baseline's own first lower-decile step (a sleep
overshoots on a loaded machine, so the measured change is reported too). `--extra-decode-work` adds one more current
side whose every decode step runs one more allocation and kernel (the counter layer's target). Prints, per side, how
many trials the gate flagged and the distribution of the measured change and A/A spread, and writes it all to
OUT/trials.json. `--rejudge OUT` judges the stores of an earlier run again (a changed rule or factor) without
measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench import injected_cell, isolation, runner, store
from bench import matrix as matrix_mod
from bench.compare import METRICS, compare
from bench.executor import LocalExecutor

DECODE = next(iter(METRICS))  # the decode-step metric

#: A small cell (a few seconds on one core), with enough decode steps and repetitions for the timing layer.
MATRIX = """
[matrix]
name = "gate-trials"
models = ["tiny-llava"]
batch_sizes = [1]
text_lengths = [32]
new_tokens = [33]
methods = ["prefixkv"]
budgets = [0.25]
repetitions = 6
warmup = 1
cpu_threads = 1
timeout_s = 300
"""


def _run(cells, results: Path, quiet: Console, entry: tuple[str, ...]) -> None:
    outcomes = runner.sweep(cells, results, console=quiet, executor=LocalExecutor(entry=entry))
    bad = [o for o in outcomes if o.status not in ("ok", "skipped")]
    if bad:
        raise SystemExit(f"gate_trials: a cell failed ({bad[0].status}: {bad[0].error}); results in {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gate_trials", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per side and trial")
    parser.add_argument("--slowdowns", default="0.1", help="comma-separated injected decode slowdowns (0.1 = 10%%)")
    parser.add_argument("--factor", type=float, default=0.15, help="the gate's --factor")
    parser.add_argument("--alpha", type=float, default=0.01, help="the gate's --alpha")
    parser.add_argument("--mode", default="auto", choices=("auto", "absolute", "ratio"))
    parser.add_argument("--matrix", help="matrix TOML (default: a one-cell tiny-llava matrix, see MATRIX)")
    parser.add_argument("--extra-decode-work", action="store_true",
                        help="one more current side with an extra allocation and kernel in every decode step")
    parser.add_argument("--out", help="folder for the stores and trials.json (default: a new temporary folder)")
    parser.add_argument("--rejudge", metavar="OUT", help="judge an earlier run's stores again; measure nothing")
    args = parser.parse_args(argv)
    if args.rejudge:
        return rejudge(args, Console(stderr=True))
    if args.trials < 1 or args.rounds < 1:
        parser.error("--trials and --rounds must be >= 1")
    slowdowns = [float(s) for s in args.slowdowns.split(",") if s.strip()]
    out = Path(args.out or tempfile.mkdtemp(prefix="gate-trials-"))
    out.mkdir(parents=True, exist_ok=True)
    mx = matrix_mod.load(args.matrix) if args.matrix else matrix_mod.parse(
        matrix_mod.tomllib.loads(MATRIX), source="gate_trials.MATRIX"
    )
    cells = mx.cells()
    methods = sorted({c.method for c in cells if c.method != "full"})
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    console = Console(stderr=True)

    sides: dict[str, tuple[str, ...]] = {"A/A": isolation.CELL_ENTRY}
    step_s = None
    records: list[dict] = []
    started = time.monotonic()
    for trial in range(args.trials):
        tdir = out / f"trial{trial:02d}"
        for r in range(args.rounds):
            _run(cells, tdir / "baseline" / f"round{r}", quiet, isolation.CELL_ENTRY)
            if step_s is None:
                frame = store.load(tdir / "baseline")
                ok = frame[(frame["status"] == "ok") & frame["method"].isin(methods)]
                # Sized from the step the gate judges (its lower decile), not the median, which the machine's load
                # inflates: the first runs of this script sized it from the median (see the README).
                step_s = float(METRICS[DECODE](ok).mean())
                for s in slowdowns:
                    sides[f"+{s:.0%} decode"] = injected_cell.entry(slow_decode_s=s * step_s, methods=methods)
                if args.extra_decode_work:
                    sides["extra decode work"] = injected_cell.entry(extra_decode_work=True, methods=methods)
            for side, entry in sides.items():
                _run(cells, tdir / _slug(side) / f"round{r}", quiet, entry)
        records.extend(_judge(tdir, trial, sides, args))
        done = trial + 1
        eta = (time.monotonic() - started) / done * (args.trials - done)
        console.print(f"trial {done}/{args.trials}: " + ", ".join(
            f"{r['side']} {'FLAGGED' if r['flagged'] else 'pass'}" for r in records if r["trial"] == trial
        ) + f"  (ETA {eta / 60:.1f} min)")

    _summarise(out, sides, records, args, step_s, cells, started, argv, console)
    return 0


def _judge(tdir: Path, trial: int, sides, args, slug: bool = True) -> list[dict]:
    out = []
    for side in sides:
        current = tdir / (_slug(side) if slug else side)
        result = compare(tdir / "baseline", current, factor=args.factor, alpha=args.alpha, mode=args.mode)
        timing = [row for row in result.rows if row["metric"] == DECODE]
        out.append({
            "trial": trial, "side": side, "exit_code": result.exit_code,
            "flagged": bool(result.regressions),
            "counter_flagged": any(r["verdict"] == "more" for r in result.counters),
            "timing_flagged": any(r["verdict"] == "slower" for r in result.rows),
            "counters_present": bool(result.counters),
            "decode_change": [row["change"] - 1 for row in timing],
            "aa_spread": [row["aa_spread"] for row in timing],
            "p_value": [row["p_value"] for row in timing],
        })
    return out


def rejudge(args, console: Console) -> int:
    """Judge the stores of an earlier run of this script again (with today's `bench.compare` and the given factor
    and alpha), without measuring anything."""
    root = Path(args.rejudge)
    sides = {p.name: {} for p in sorted((root / "trial00").iterdir()) if p.is_dir() and p.name != "baseline"}
    # Trials whose every side has all its rounds (a run still in progress has a partial last trial).
    rounds = len(list((root / "trial00" / "baseline").iterdir()))
    trials = sorted(
        int(t.name[5:]) for t in root.glob("trial*")
        if all(len(store.parts([t / side])) and len(list((t / side).iterdir())) == rounds for side in sides)
    )
    records = [r for t in trials for r in _judge(root / f"trial{t:02d}", t, sides, args, slug=False)]
    for side in sides:
        rs = [r for r in records if r["side"] == side]
        console.print(f"{side:>14}: flagged {sum(r['flagged'] for r in rs)}/{len(rs)} at factor {args.factor}, "
                      f"alpha {args.alpha}")
    return 0


def _summarise(out, sides, records, args, step_s, cells, started, argv, console) -> None:
    summary = []
    for side in sides:
        rs = [r for r in records if r["side"] == side]
        changes = [c for r in rs for c in r["decode_change"]]
        spreads = [s for r in rs for s in r["aa_spread"]]
        summary.append({
            "side": side, "trials": len(rs), "flagged": sum(r["flagged"] for r in rs),
            "timing_flagged": sum(r["timing_flagged"] for r in rs),
            "counter_flagged": sum(r["counter_flagged"] for r in rs),
            "counters_present": all(r["counters_present"] for r in rs),
            "decode_change_median": statistics.median(changes) if changes else None,
            "decode_change_range": [min(changes), max(changes)] if changes else None,
            "aa_spread_median": statistics.median(spreads) if spreads else None,
            "aa_spread_max": max(spreads) if spreads else None,
        })
    report = {
        "command": "python -m bench.gate_trials " + " ".join(argv if argv is not None else sys.argv[1:]),
        "baseline_decode_step_s": step_s, "factor": args.factor, "alpha": args.alpha, "rounds": args.rounds,
        "cells": [c.label for c in cells], "minutes": (time.monotonic() - started) / 60, "summary": summary,
        "trials": records,
    }
    (out / "trials.json").write_text(json.dumps(report, indent=1))
    for s in summary:
        counters = "" if s["counters_present"] else " (no counter columns in the rows: timing layer only)"
        console.print(
            f"{s['side']:>14}: flagged {s['flagged']}/{s['trials']} (timing {s['timing_flagged']}, counters "
            f"{s['counter_flagged']}){counters}; decode change median {_pct(s['decode_change_median'])}, range "
            f"{' .. '.join(_pct(v) for v in s['decode_change_range'] or [])}; A/A spread median "
            f"{_pct(s['aa_spread_median'])}, max {_pct(s['aa_spread_max'])}"
        )
    console.print(f"baseline decode step {step_s * 1e3:.2f} ms; {report['minutes']:.1f} min; {out / 'trials.json'}")


def _slug(side: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in side).strip("_")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.1f}%"


if __name__ == "__main__":
    raise SystemExit(main())
