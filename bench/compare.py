"""The regression gate: match two stores' cells by key and flag changes that are both large and significant.

A metric regresses when its median grows by more than `factor` (default 5%) *and* a one-sided Mann-Whitney U test
on the samples (one per repetition: its median decode step, its prefill, its whole call) rejects "no slower" at level
`alpha` - the rule asv uses, so that noise alone neither passes a 5% threshold often nor gets flagged when it does.
With `alpha` = 0.01 that takes at least 5 repetitions a side (interleaved rounds add up).

Absolute times are comparable only on one machine. Across machines (or with `mode="ratio"`) each sample is divided
by the median of the `full`-cache cell of the same workload, machine and run (`bench run` invocation): what is
compared is then "how much slower than the full cache", which a faster or slower machine - or a shared machine
drifting between runs - leaves unchanged. (The `full` cells themselves have no ratio to compare in that mode.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.stats import mannwhitneyu

from bench import store

#: metric -> how to get its samples from one cell's rows (one row per repetition). One sample per repetition: the
#: decode steps of one call are not independent draws (they share the call's machine state), and pooling them would
#: make any drift between two runs look significant.
METRICS = {
    "decode_step_s": lambda rows: np.array([np.median(np.asarray(s, dtype=float)) for s in rows["decode_steps_s"]]),
    "prefill_s": lambda rows: rows["prefill_s"].to_numpy(dtype=float),
    "total_s": lambda rows: rows["total_s"].to_numpy(dtype=float),
}


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict]:
        return [r for r in self.rows if r["verdict"] == "slower"]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    return frame[frame["status"] == "ok"]


def _label(rows: pd.DataFrame) -> str:
    r = rows.iloc[0]
    return f"{r['model']} b{r['batch_size']} t{r['text_tokens']}+{r['new_tokens']} {r['method']}@{r['budget']:g}"


def _ratios(frame: pd.DataFrame, rows: pd.DataFrame, metric: str) -> np.ndarray | None:
    """`metric`'s samples of `rows` divided, run by run, by the median of the `full` cell of the same workload,
    machine and run; None when a run lacks its `full` cell."""
    out = []
    for run_id, run in rows.groupby("run_id"):
        r = run.iloc[0]
        full = frame[
            (frame["shape_key"] == r["shape_key"]) & (frame["env_machine"] == r["env_machine"])
            & (frame["run_id"] == run_id) & (frame["method"] == "full")
        ]
        if full.empty:
            return None
        out.append(METRICS[metric](run) / float(np.median(METRICS[metric](full))))
    return np.concatenate(out)


def compare(
    baseline: str | Path | pd.DataFrame,
    current: str | Path | pd.DataFrame,
    *,
    factor: float = 0.05,
    alpha: float = 0.01,
    mode: str = "auto",
    metrics: tuple[str, ...] = tuple(METRICS),
) -> Comparison:
    """Compare every cell present (and successful) in both stores; see the module docstring for the rule."""
    if mode not in ("auto", "absolute", "ratio"):
        raise ValueError(f"mode must be 'auto', 'absolute' or 'ratio', got {mode!r}")
    base = _ok(baseline if isinstance(baseline, pd.DataFrame) else store.load(baseline))
    cur = _ok(current if isinstance(current, pd.DataFrame) else store.load(current))
    result = Comparison()
    if base.empty or cur.empty:
        result.notes.append("one of the stores holds no successful cell: nothing to compare")
        return result
    keys = sorted(set(base["key"]) & set(cur["key"]))
    only = len(set(base["key"]) ^ set(cur["key"]))
    if only:
        result.notes.append(f"{only} cell(s) present in only one store were not compared")
    for key in keys:
        b, c = base[base["key"] == key], cur[cur["key"] == key]
        common = sorted(set(b["env_machine"]) & set(c["env_machine"]))
        use_ratio = mode == "ratio" or (mode == "auto" and not common)
        if common and not use_ratio:
            b, c = b[b["env_machine"] == common[0]], c[c["env_machine"] == common[0]]
        else:
            b = b[b["env_machine"] == sorted(set(b["env_machine"]))[0]]
            c = c[c["env_machine"] == sorted(set(c["env_machine"]))[0]]
        if use_ratio and b["method"].iloc[0] == "full":
            continue
        for metric in metrics:
            if use_ratio:
                xb, xc = _ratios(base, b, metric), _ratios(cur, c, metric)
                if xb is None or xc is None:
                    result.notes.append(f"{_label(b)}: a run lacks the `full` cell to normalise {metric} by")
                    continue
            else:
                xb, xc = METRICS[metric](b), METRICS[metric](c)
            result.rows.append(_judge(key, _label(b), metric, "ratio" if use_ratio else "absolute", xb, xc,
                                      factor, alpha))
    return result


def _judge(key, label, metric, mode, xb, xc, factor, alpha) -> dict:
    mb, mc = float(np.median(xb)), float(np.median(xc))
    change = mc / mb if mb > 0 else float("inf")
    slower = mannwhitneyu(xc, xb, alternative="greater").pvalue if len(xb) and len(xc) else 1.0
    faster = mannwhitneyu(xc, xb, alternative="less").pvalue if len(xb) and len(xc) else 1.0
    verdict = "same"
    if change > 1 + factor and slower < alpha:
        verdict = "slower"
    elif change < 1 / (1 + factor) and faster < alpha:
        verdict = "faster"
    return {
        "key": key, "cell": label, "metric": metric, "mode": mode, "baseline": mb, "current": mc,
        "change": change, "p_value": float(min(slower, faster)), "n_baseline": len(xb), "n_current": len(xc),
        "verdict": verdict,
    }


def print_table(result: Comparison, console: Console | None = None) -> None:
    console = console or Console(width=160)
    table = Table(title="bench compare: current vs baseline (ratio = relative to the run's full cache)")
    for col in ("cell", "metric", "mode", "baseline", "current", "change", "p", "n", "verdict"):
        table.add_column(col, justify="right" if col not in ("cell", "metric", "mode", "verdict") else "left")
    colours = {"slower": "red", "faster": "green", "same": "dim"}
    for r in result.rows:
        unit = "" if r["mode"] == "ratio" else " ms"
        scale = 1 if r["mode"] == "ratio" else 1e3
        table.add_row(
            r["cell"], r["metric"], r["mode"],
            f"{r['baseline'] * scale:.3f}{unit}", f"{r['current'] * scale:.3f}{unit}",
            f"{(r['change'] - 1) * 100:+.1f}%", f"{r['p_value']:.2g}", f"{r['n_baseline']}/{r['n_current']}",
            f"[{colours[r['verdict']]}]{r['verdict']}[/]",
        )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    n = len(result.regressions)
    console.print(f"[{'red' if n else 'green'}]{n} regression(s)[/] among {len(result.rows)} comparisons")
