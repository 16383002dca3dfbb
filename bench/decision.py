"""The report's answer: per workload (model x batch x lengths x hardware), which cells are on the Pareto frontier of
speed, memory and quality, and which method at which budget to use for a given quality tolerance.

Input is one workload's cells, one row each, with the columns the report computes (`bench.report.cells`):
`label` (method@budget), `is_full`, `decode_tps` and `speed_ratio` (`Estimate`s: decode throughput and its ratio to
the same run's full cache), `peak_ratio` (peak memory over the full cache's), `quality_loss` (1 - ROUGE-L of the
generated tokens against the full cache's; NaN where unknown), `rouge_l` and `j_per_token` (`Estimate`).

The rule, stated so a reader can check it: among the cells whose quality loss is within the tolerance (the full
cache always is), take the fastest by median decode throughput; every cell whose interval overlaps the fastest's is
tied with it. If the full cache is among the tied, nothing is recommended over it: the repetitions do not show a
speed-up. Otherwise the tied cell with the best quality (then the least memory) is recommended, and the others are
named as indistinguishable in speed. Where quality is unknown (random weights) cells are ranked by cost only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.uncertainty import Estimate, separated

#: Quality losses (1 - ROUGE-L against the full cache's output) at which the report answers.
TOLERANCES = (0.01, 0.1, 0.3, 0.5)


@dataclass
class Verdict:
    """The answer for one workload at one tolerance (None: quality unknown, cost only)."""

    tolerance: float | None
    text: str
    choice: str | None = None  # label of the recommended cell; None when the full cache stays
    tied: list[str] = field(default_factory=list)  # labels indistinguishable in speed from the fastest


def pareto(frame: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    """Boolean Series: True for the rows no other row dominates. `objectives` maps a column to "max" or "min";
    rows with a NaN objective are never on the frontier. Medians only: a point the intervals cannot separate from
    a dominating one is still called dominated, so read the frontier with the intervals beside it."""
    cols = list(objectives)
    values = np.column_stack([
        frame[c].to_numpy(dtype=float) * (1.0 if objectives[c] == "max" else -1.0) for c in cols
    ]) if len(frame) else np.empty((0, len(cols)))
    ok = np.isfinite(values).all(axis=1)
    front = np.zeros(len(frame), dtype=bool)
    for i in np.flatnonzero(ok):
        others = values[ok]
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        front[i] = not dominated
    return pd.Series(front, index=frame.index)


def _num(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else (f"{v:.2f}" if abs(v) < 10 else f"{v:,.0f}")


def _x(e: Estimate) -> str:
    """`1.23x [1.05-1.40]`, or `1.23x (n=1)` without an interval."""
    if not e.known:
        return "-"
    if e.n < 2:
        return f"{e.median:.2f}x (one repetition, no interval)"
    return f"{e.median:.2f}x [{e.lo:.2f}-{e.hi:.2f}]"


def _costs(row: pd.Series) -> str:
    parts = [f"{_x(row['speed_ratio'])} the full cache's decode throughput"]
    if math.isfinite(row.get("peak_ratio", math.nan)):
        parts.append(f"{row['peak_ratio']:.2f}x its peak memory")
    if math.isfinite(row.get("kv_ratio", math.nan)):
        parts.append(f"{row['kv_ratio']:.2f}x its KV cache")
    j = row.get("j_per_token")
    if isinstance(j, Estimate) and j.known:
        parts.append(f"{j.median:.3g} J/token" + (f" [{j.lo:.3g}-{j.hi:.3g}]" if j.n > 1 else ""))
    return ", ".join(parts)


def recommend(cells: pd.DataFrame, tolerance: float | None) -> Verdict:
    """The verdict for one workload's `cells` (see the module docstring); `tolerance` None ranks by cost only."""
    if cells.empty:
        return Verdict(tolerance, "No successful cell for this workload.")
    if not cells["is_full"].any():
        return _without_full(cells, tolerance)
    full = cells[cells["is_full"]].iloc[0]
    pool = cells[cells["decode_tps"].map(lambda e: e.known)]
    if tolerance is not None:
        pool = pool[pool["is_full"] | (pool["quality_loss"] <= tolerance + 1e-9)]
    best = pool.loc[pool["decode_tps"].map(lambda e: e.median).idxmax()]
    tied = pool[[not separated(e, best["decode_tps"]) for e in pool["decode_tps"]]]
    where = "within this tolerance " if tolerance is not None else ""
    if pool["is_full"].all():
        comp = cells[~cells["is_full"]].dropna(subset=["quality_loss"])
        text = "Keep the full cache: no compressed cell stays within this quality loss"
        if not comp.empty:
            closest = comp.loc[comp["quality_loss"].idxmin()]
            text += f" (the closest, {closest['label']}, loses {closest['quality_loss']:.2f})"
        return Verdict(tolerance, text + ".")
    if best["is_full"]:
        others = [lbl for lbl in tied["label"] if lbl != full["label"]]
        text = f"Keep the full cache: no compressed cell {where}is faster"
        if others:
            text += f" ({', '.join(others)} are within its interval)"
        return Verdict(tolerance, text + ".", None, others)
    if tied["is_full"].any():
        return Verdict(
            tolerance,
            f"No recommendation: the fastest cell {where}({best['label']}, {_x(best['speed_ratio'])} the full "
            f"cache's decode throughput) is indistinguishable from the full cache over its repetitions; keep the "
            f"full cache unless memory decides (it takes {best.get('peak_ratio', math.nan):.2f}x the full cache's "
            "peak memory).",
            None, list(tied["label"]),
        )
    order = ["quality_loss", "peak_ratio"] if tolerance is not None else ["peak_ratio"]
    choice = tied.sort_values(order, na_position="last").iloc[0]
    text = f"Use {choice['method']} at budget {choice['budget']:g}: {_costs(choice)}"
    if tolerance is not None and math.isfinite(choice["quality_loss"]):
        text += f"; ROUGE-L {1 - choice['quality_loss']:.2f} against the full cache's output"
    others = [lbl for lbl in tied["label"] if lbl != choice["label"]]
    if others:
        why = "better quality, then less memory" if tolerance is not None else "less peak memory"
        text += (f". Indistinguishable in decode throughput from {', '.join(others)} (intervals overlap); chosen "
                 f"for {why}")
    return Verdict(tolerance, text + ".", choice["label"], others)


def _without_full(cells: pd.DataFrame, tolerance: float | None) -> Verdict:
    """No full cache to compare with (it failed, e.g. out of memory, or was not run): rank the cells that ran by
    absolute decode throughput; quality, measured against the full cache's output, is then unknown too."""
    status = cells["full_status"].iloc[0] if "full_status" in cells else None
    why = (f"The full cache did not run here ({status}): every cell below is measured against no baseline"
           if status else "No full-cache cell for this workload, so no ratio and no quality")
    pool = cells[cells["decode_tps"].map(lambda e: e.known)]
    if pool.empty:
        return Verdict(tolerance, why + ".")
    best = pool.loc[pool["decode_tps"].map(lambda e: e.median).idxmax()]
    tied = pool[[not separated(e, best["decode_tps"]) for e in pool["decode_tps"]]]
    choice = tied.sort_values("kv_cache_mib" if "kv_cache_mib" in tied else "budget").iloc[0]
    e = choice["decode_tps"]
    text = (f"{why}. Fastest: {choice['method']} at budget {choice['budget']:g}, {e.median:,.0f} decode tokens/s"
            + (f" [{e.lo:,.0f}-{e.hi:,.0f}]" if e.n > 1 else ""))
    others = [lbl for lbl in tied["label"] if lbl != choice["label"]]
    if others:
        text += f"; indistinguishable from {', '.join(others)} (chosen for the smallest KV cache)"
    return Verdict(tolerance, text + ".", choice["label"], others)


def verdicts(cells: pd.DataFrame, quality_known: bool, tolerances: Sequence[float] = TOLERANCES) -> list[Verdict]:
    """One verdict per tolerance where quality is known, else one cost-only verdict."""
    if not quality_known:
        return [recommend(cells, None)]
    return [recommend(cells, t) for t in tolerances]


def slower_note(cells: pd.DataFrame) -> str | None:
    """A sentence when compressed cells were slower than the full cache (their ratio's interval below 1)."""
    comp = cells[~cells["is_full"]]
    ratios = [e for e in comp["speed_ratio"] if isinstance(e, Estimate) and e.known]
    if not ratios:
        return None
    slower = [e for e in ratios if e.hi < 1 and e.n > 1]
    faster = [e for e in ratios if e.lo > 1 and e.n > 1]
    meds = [e.median for e in ratios]
    span = f"{min(meds):.2f}-{max(meds):.2f}x" if len(meds) > 1 else f"{meds[0]:.2f}x"
    if len(slower) == len(ratios):
        return (f"Every compressed cell here was slower than the full cache ({span} its decode throughput): at "
                "this size compression costs more than the attention over the full cache it saves.")
    if slower:
        return (f"{len(slower)} of {len(ratios)} compressed cells were measurably slower than the full cache, "
                f"{len(faster)} measurably faster (ratios {span}; the rest are within noise).")
    if not faster:
        return f"No compressed cell was measurably faster or slower than the full cache (ratios {span})."
    return None
