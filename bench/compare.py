"""The regression gate: match two stores' cells by key; fail on more work per decode step first, on slower steps second.

Layer 1, deterministic counters. Every row carries per-decode-step counters (aten operations, host syncs, bytes
allocated, kernel launches) and the compiler's graph breaks and recompiles (`COUNTERS`). They do not depend on the
machine's load, so any increase beyond a small fixed tolerance (`COUNTERS[name]`, widened to the spread the counter
itself shows between repetitions of one store, which is 0 for a deterministic counter) is a regression, whatever
the noise. Stores written before these columns existed are compared on timing alone (a note says so).

Layer 2, timing. One sample per repetition (its lower-decile decode step, its prefill, its whole call), pooled over the
repetitions and runs (interleaved rounds) of a store. A metric regresses when its median grows by more than the
larger of `factor` and the A/A spread *and* a one-sided Mann-Whitney U test rejects "no slower" at level `alpha`.
The A/A spread is what the same code measures against itself in each store: the largest relative gap between the
medians of two runs of one store (or, in a store of one run, between its odd and even repetitions), the larger of
the two stores'. It is printed beside every verdict, so that a "same" on a noisy machine says how blind it was.

Absolute times are comparable only on one machine. Across machines (or with `mode="ratio"`) each sample is divided
by the median of the `full`-cache cell of the same workload and machine - from the same run when the store has
one there, else from any run of that store (a resumed store may hold the `full` cell in an earlier run). What is
compared is then "how much slower than the full cache", which a faster or slower machine leaves unchanged.

What the gate refuses to judge, it says: a timing sample that is not a finite number > 0 (a NaN prefill, an empty
list of decode steps, a zero or negative time) makes its cell and metric *unusable*, as does a cell with no `full`
cell to normalise by in ratio mode, and a part of either store that failed validation (quarantined on read: the cell
it held would otherwise vanish from the comparison unseen). A store that is missing, unreadable, holds no successful
cell or lacks a column the comparison needs raises `CompareError`.

`Comparison.exit_code`, the first that applies: 2 something was unusable (the gate cannot vouch for the stores), 3 a
cell that succeeded in the baseline is missing or failed in the current store (a crash is the worst regression),
1 a regression, 0 none. The CLI adds 2 for `CompareError` and 4 for an internal error (`bench.cli`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from scipy.stats import mannwhitneyu

from bench import labels, store

EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE, EXIT_MISSING = 0, 1, 2, 3


def _p10(steps) -> float:
    """The lower decile of one repetition's decode steps; NaN (unusable) when it has none."""
    steps = np.asarray(steps if steps is not None else [], dtype=float).reshape(-1)
    return float(np.percentile(steps, 10)) if steps.size else math.nan


#: metric -> how to get its samples from one cell's rows (one row per repetition). One sample per repetition: the
#: decode steps of one call are not independent draws (they share the call's machine state), and pooling them would
#: make any drift between two runs look significant. The decode step is taken at its lower decile, not its median:
#: another process on a shared core only ever adds time to a step, and on the 2-core machines the median step of
#: consecutive runs of one code moved between 2.4 and 7 ms while the lower decile stayed within about 20%; work added
#: to every step (the regression sought) moves the lower decile as much as the median.
METRICS = {
    "decode_step_p10_s": lambda rows: np.array([_p10(s) for s in rows["decode_steps_s"]], dtype=float),
    "prefill_s": lambda rows: rows["prefill_s"].to_numpy(dtype=float),
    "total_s": lambda rows: rows["total_s"].to_numpy(dtype=float),
}

#: The column each metric is read from.
SOURCES = {"decode_step_p10_s": "decode_steps_s", "prefill_s": "prefill_s", "total_s": "total_s"}
#: Columns every compared store needs (besides each judged metric's `SOURCES` column).
REQUIRED = ("key", "status", "method", "shape_key", "env_machine")

#: The metrics judged by default. `total_s` is left out: it adds the median decode steps (load-sensitive, unlike their
#: lower decile) to the prefill, and alone made 2 of 14 A/A trials fail on the 2-core machines (README, gate section).
GATED = ("decode_step_p10_s", "prefill_s")

#: Deterministic counter -> the increase it tolerates (in its own unit, per decode step where it says so). Half a unit:
#: one more operation, launch, sync or byte per step, or one more graph break or recompile, fails.
COUNTERS = {
    "decode_aten_ops_per_step": 0.5,
    "decode_kernel_launches_per_step": 0.5,
    "decode_host_syncs_per_step": 0.5,
    "decode_alloc_bytes_per_step": 0.5,
    "compile_graph_breaks": 0.5,
    "compile_recompiles": 0.5,
}


class CompareError(ValueError):
    """Bad input to the gate: a store that cannot be compared (missing, unreadable, no successful cell, a required
    column missing) or a bad argument; one line."""


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)  # timing layer
    counters: list[dict] = field(default_factory=list)  # counter layer
    missing: list[dict] = field(default_factory=list)  # baseline cells missing or failed in the current store
    unusable: list[str] = field(default_factory=list)  # what could not be judged, one line each
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict]:
        return [r for r in self.counters + self.rows if r["verdict"] in ("slower", "more")]

    @property
    def exit_code(self) -> int:
        if self.unusable:
            return EXIT_UNUSABLE
        if self.missing:
            return EXIT_MISSING
        return EXIT_REGRESSION if self.regressions else EXIT_OK

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.counters + self.rows)


def _load(source: str | Path | pd.DataFrame, role: str, metrics: tuple[str, ...], invalid: list[str]) -> pd.DataFrame:
    """A store's rows, checked at the gate's door; parts that fail validation are appended to `invalid`."""
    if isinstance(source, pd.DataFrame):
        frame = source
    else:
        if not Path(source).is_dir():
            raise CompareError(f"{role} results directory {str(source)!r} does not exist")
        frame = store.load(source, on_invalid=lambda path, why: invalid.append(
            f"{role} part {path} failed validation ({why}): its cell cannot be compared"))
        if frame.empty:
            raise CompareError(f"{role} results directory {str(source)!r} holds no readable part")
    if frame.empty or "status" not in frame or not (frame["status"] == "ok").any():
        raise CompareError(f"{role} store {_name(source)} holds no successful cell")
    ok = frame[frame["status"] == "ok"]
    for column in (*REQUIRED, *(SOURCES[m] for m in metrics)):
        # A timing without a value is judged unusable per cell (`_bad_timings`); an identity without one is bad input.
        if column not in frame or (column in REQUIRED and ok[column].isna().any()):
            where = "has no column" if column not in frame else "has rows without a value in column"
            raise CompareError(f"{role} store {_name(source)} {where} {column!r}, which the comparison needs")
    return frame


def _name(source) -> str:
    return "(a DataFrame)" if isinstance(source, pd.DataFrame) else repr(str(source))


def _label(rows: pd.DataFrame) -> str:
    """The cell's label as the CLI and the report print it (`bench.labels.cell`)."""
    r = rows.iloc[0]
    try:
        kwargs = json.loads(r["method_kwargs"]) if isinstance(r.get("method_kwargs"), str) else {}
        prompt = r.get("prompt_length")
        prompt = int(prompt) if isinstance(prompt, int | float) and prompt == prompt else None
        return labels.cell(str(r["model"]), str(r.get("device", "?")), int(r["batch_size"]), int(r["text_tokens"]),
                           int(r["new_tokens"]), str(r["method"]), float(r["budget"]), kwargs, prompt)
    except (KeyError, TypeError, ValueError):  # a row missing configuration columns (a hand-made store)
        return str(r.get("key", "?"))


def _runs(rows: pd.DataFrame) -> list[pd.DataFrame]:
    if "run_id" not in rows:
        return [rows]
    return [run for _, run in rows.groupby("run_id", sort=True)]


def _full_rows(frame: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """The rows of the `full` cell of `run`'s workload and machine: from `run` itself when that run has one, else
    from every run of `frame` that has it (empty when there is none)."""
    r = run.iloc[0]
    full = frame[(frame["shape_key"] == r["shape_key"]) & (frame["env_machine"] == r["env_machine"])
                 & (frame["method"] == "full")]
    if "run_id" in full:
        same = full[full["run_id"] == r["run_id"]]
        full = same if not same.empty else full
    return full


def _samples(frame: pd.DataFrame, rows: pd.DataFrame, metric: str, ratio: bool, bad: dict) -> list[np.ndarray] | str:
    """`metric`'s samples of `rows`, one array per run, divided by the matching `full` median when `ratio`; or why
    they cannot be had."""
    out = []
    for run in _runs(rows):
        x = METRICS[metric](run)
        if ratio:
            full = _full_rows(frame, run)
            if full.empty:
                return f"no `full` cell of this workload and machine to normalise {metric} by"
            unusable = [bad[k, metric] for k in full["key"].unique() if (k, metric) in bad]
            if unusable:
                return f"the `full` cell it is normalised by is unusable ({unusable[0]})"
            x = x / float(np.median(METRICS[metric](full)))
        out.append(x)
    return out


def _bad_timings(frame: pd.DataFrame, role: str, metrics: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """(cell key, metric) -> why, for every cell of `frame` with a timing sample that is not a finite number > 0 (a
    repetition's decode steps: every step, and at least one)."""
    out = {}
    for key, rows in frame.groupby("key", sort=True):
        for metric in metrics:
            values = [np.asarray(v if v is not None else [], dtype=float).reshape(-1) for v in rows[SOURCES[metric]]]
            bad = [v for v in values if v.size == 0 or not bool(np.all(np.isfinite(v) & (v > 0)))]
            if bad:
                example = "no value" if bad[0].size == 0 else f"{bad[0][~(np.isfinite(bad[0]) & (bad[0] > 0))][0]:g}"
                out[key, metric] = (f"{role}: {len(bad)} of {len(values)} repetitions hold a {SOURCES[metric]} that is "
                                    f"not a finite number > 0 ({example})")
    return out


def aa_spread(runs: list[np.ndarray]) -> float:
    """What the same code measures against itself: the largest relative gap between the medians of two runs, or in a
    single run, between its odd and even repetitions (0 when there is too little to tell)."""
    if len(runs) == 1:
        x = runs[0]
        runs = [x[0::2], x[1::2]] if len(x) >= 2 else []
    medians = [float(np.median(r)) for r in runs if len(r)]
    gaps = [abs(a / b - 1) for a, b in itertools.permutations(medians, 2) if b > 0]
    return max(gaps, default=0.0)


def _pick_machine(b: pd.DataFrame, c: pd.DataFrame, use_ratio: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    common = sorted(set(b["env_machine"]) & set(c["env_machine"]))
    if common and not use_ratio:
        return b[b["env_machine"] == common[0]], c[c["env_machine"] == common[0]]
    return (b[b["env_machine"] == sorted(set(b["env_machine"]))[0]],
            c[c["env_machine"] == sorted(set(c["env_machine"]))[0]])


def compare(
    baseline: str | Path | pd.DataFrame,
    current: str | Path | pd.DataFrame,
    *,
    factor: float = 0.15,
    alpha: float = 0.01,
    mode: str = "auto",
    metrics: tuple[str, ...] = GATED,
    counters: dict[str, float] | None = None,
) -> Comparison:
    """Compare every cell that succeeded in the baseline against the current store; see the module docstring.
    CompareError (one line) for bad arguments or a store that cannot be compared."""
    if mode not in ("auto", "absolute", "ratio"):
        raise CompareError(f"mode must be 'auto', 'absolute' or 'ratio', got {mode!r}")
    if not (isinstance(factor, int | float) and math.isfinite(factor) and factor >= 0):
        raise CompareError(f"factor (--factor) must be a finite number >= 0, got {factor!r}")
    if not (isinstance(alpha, int | float) and 0 < alpha < 1):
        raise CompareError(f"alpha (--alpha) must be in (0, 1), got {alpha!r}")
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise CompareError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}" if unknown
                           else "no timing metric to judge")
    counters = COUNTERS if counters is None else counters
    result = Comparison()
    base_all = _load(baseline, "baseline", metrics, result.unusable)
    cur_all = _load(current, "current", metrics, result.unusable)
    base, cur = base_all[base_all["status"] == "ok"], cur_all[cur_all["status"] == "ok"]
    bad = {**_bad_timings(base, "baseline", metrics), **_bad_timings(cur, "current", metrics)}

    for key in sorted(set(base["key"]) - set(cur["key"])):
        failed = cur_all[cur_all["key"] == key]
        b = base[base["key"] == key]
        if failed.empty:
            result.missing.append({"key": key, "cell": _label(b), "status": "absent", "error": None})
        else:
            f = failed.iloc[0]
            result.missing.append({"key": key, "cell": _label(b), "status": f["status"], "error": f.get("error")})
    new = set(cur["key"]) - set(base_all["key"])
    if new:
        result.notes.append(f"{len(new)} cell(s) of the current store are not in the baseline: not compared")
    failed_base = set(base_all["key"]) - set(base["key"])
    if failed_base:
        result.notes.append(f"{len(failed_base)} cell(s) failed in the baseline: nothing to compare them with")

    absent_counters = set()
    for key in sorted(set(base["key"]) & set(cur["key"])):
        b, c = base[base["key"] == key], cur[cur["key"] == key]
        common = set(b["env_machine"]) & set(c["env_machine"])
        use_ratio = mode == "ratio" or (mode == "auto" and not common)
        b, c = _pick_machine(b, c, use_ratio)
        label = _label(b)
        for name, tolerance in counters.items():
            if name not in b or name not in c or b[name].isna().all() or c[name].isna().all():
                absent_counters.add(name)
                continue
            result.counters.append(_judge_counter(key, label, name, b[name].dropna().to_numpy(float),
                                                  c[name].dropna().to_numpy(float), tolerance))
        if use_ratio and b["method"].iloc[0] == "full":
            continue  # the normaliser: its ratio is 1 by definition
        for metric in metrics:
            if (key, metric) in bad:
                result.unusable.append(f"{label}: {metric} cannot be judged: {bad[key, metric]}")
                continue
            xb = _samples(base, b, metric, use_ratio, bad)
            xc = _samples(cur, c, metric, use_ratio, bad)
            why = next((x for x in (xb, xc) if isinstance(x, str)), None)
            if why is not None:
                result.unusable.append(f"{label}: {metric} cannot be judged: {why}")
                continue
            result.rows.append(_judge(key, label, metric, "ratio" if use_ratio else "absolute", xb, xc, factor, alpha))
    if absent_counters:
        result.notes.append(
            f"counter(s) {', '.join(sorted(absent_counters))} absent from one store (older rows, or not measured on "
            "this device): those cells are judged on timing alone"
        )
    if not (result.rows or result.counters or result.missing or result.unusable):
        result.unusable.append("nothing was compared: the stores share no cell that both ran successfully")
    return result


def _judge_counter(key, label, name, xb: np.ndarray, xc: np.ndarray, tolerance: float) -> dict:
    mb, mc = float(np.median(xb)), float(np.median(xc))
    spread = max(float(np.ptp(xb)) if len(xb) else 0.0, float(np.ptp(xc)) if len(xc) else 0.0)
    allowed = max(tolerance, spread)
    verdict = "more" if mc > mb + allowed else "fewer" if mc < mb - allowed else "same"
    return {"key": key, "cell": label, "metric": name, "layer": "counter", "baseline": mb, "current": mc,
            "change": mc - mb, "aa_spread": spread, "threshold": allowed, "verdict": verdict}


def _judge(key, label, metric, mode, runs_b, runs_c, factor, alpha) -> dict:
    xb, xc = np.concatenate(runs_b), np.concatenate(runs_c)
    mb, mc = float(np.median(xb)), float(np.median(xc))
    change = mc / mb if mb > 0 else float("inf")
    spread = max(aa_spread(runs_b), aa_spread(runs_c))
    threshold = max(factor, spread)
    slower = mannwhitneyu(xc, xb, alternative="greater").pvalue if len(xb) and len(xc) else 1.0
    faster = mannwhitneyu(xc, xb, alternative="less").pvalue if len(xb) and len(xc) else 1.0
    verdict = "same"
    if change > 1 + threshold and slower < alpha:
        verdict = "slower"
    elif change < 1 / (1 + threshold) and faster < alpha:
        verdict = "faster"
    return {
        "key": key, "cell": label, "metric": metric, "layer": "timing", "mode": mode, "baseline": mb, "current": mc,
        "change": change, "aa_spread": spread, "threshold": threshold, "p_value": float(min(slower, faster)),
        "n_baseline": len(xb), "n_current": len(xc), "verdict": verdict,
    }


def print_table(result: Comparison, console: Console | None = None) -> None:
    console = console or Console(width=180)
    colours = {"slower": "red", "more": "red", "faster": "green", "fewer": "green", "same": "dim"}
    if result.counters:
        table = Table(title="layer 1: deterministic counters (any increase beyond the threshold fails)")
        for col in ("cell", "counter", "baseline", "current", "change", "A/A spread", "threshold", "verdict"):
            table.add_column(col, justify="left" if col in ("cell", "counter", "verdict") else "right")
        for r in result.counters:
            table.add_row(
                escape(r["cell"]), r["metric"], f"{r['baseline']:,.1f}", f"{r['current']:,.1f}", f"{r['change']:+,.1f}",
                f"{r['aa_spread']:,.1f}", f"{r['threshold']:,.1f}", f"[{colours[r['verdict']]}]{r['verdict']}[/]",
            )
        console.print(table)
    if result.rows:
        table = Table(title="layer 2: timing, current vs baseline (ratio = relative to the full cache)")
        for col in ("cell", "metric", "mode", "baseline", "current", "change", "A/A spread", "p", "n", "verdict"):
            table.add_column(col, justify="left" if col in ("cell", "metric", "mode", "verdict") else "right")
        for r in result.rows:
            unit = "" if r["mode"] == "ratio" else " ms"
            scale = 1 if r["mode"] == "ratio" else 1e3
            table.add_row(
                escape(r["cell"]), r["metric"], r["mode"],
                f"{r['baseline'] * scale:.3f}{unit}", f"{r['current'] * scale:.3f}{unit}",
                f"{(r['change'] - 1) * 100:+.1f}%", f"±{r['aa_spread'] * 100:.1f}%", f"{r['p_value']:.2g}",
                f"{r['n_baseline']}/{r['n_current']}", f"[{colours[r['verdict']]}]{r['verdict']}[/]",
            )
        console.print(table)
    for m in result.missing:
        why = m["status"] if not m["error"] else f"{m['status']}: {str(m['error'])[:200]}"
        console.print(f"[red]missing:[/] {escape(m['cell'])} ({m['key']}) succeeded in the baseline, current: "
                      f"{escape(why)}")
    for line in result.unusable:
        console.print(f"[red]unusable:[/] {escape(line)}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    n = len(result.regressions)
    bad = n or result.missing or result.unusable
    console.print(
        f"[{'red' if bad else 'green'}]{n} regression(s), {len(result.missing)} missing cell(s), "
        f"{len(result.unusable)} unusable[/] among {len(result.counters)} counter and {len(result.rows)} timing "
        f"comparisons (exit {result.exit_code})",
        markup=True,
    )
