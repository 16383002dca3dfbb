"""The report's answer: per workload (model x batch x lengths x hardware), which method at which budget to use for a
given quality tolerance, and one line per machine across its workloads.

Input is one workload's cells, one row each, with the columns `bench.report.cells` computes: `label`
(method@budget), `method`, `budget`, `is_full`, `decode_tps` and `speed_ratio` (`Estimate`s: decode throughput, and
its ratio to the full cache, paired within the cell where it could be), `ratio_basis`, `peak_ratio` and `kv_ratio`
(memory over the full cache's), `quality_loss` and `quality_loss_hi` (the upper end of its 95% interval where the
quality engine measured it; the point itself for 1 - ROUGE-L), `quality_unit`, `j_per_token` (`Estimate`).

The rule, stated so a reader can check it. A compressed cell is *within* a tolerance X when its quality loss is at
most X - with the quality engine, when the upper end of its interval is (`quality_loss_hi <= X`), so a cell is
never called good enough on a lucky sample. Among the cells within X:
1. those measurably faster than the full cache (their speed ratio's interval above 1): the fastest by median, and
   every one whose interval overlaps it, are tied; the tied cell with the best quality (then the least memory) is
   recommended, the others named as indistinguishable;
2. else, those with no measurable speed difference (the interval contains 1) that hold less memory: the one with the
   least memory is recommended for memory, saying that speed does not decide;
3. else the full cache stays, with the reason (nothing within X, or everything within X measurably slower).
Where quality is unknown (random weights) every compressed cell is considered: cost only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.uncertainty import Estimate, separated

#: Quality losses at which the report answers, in the unit of the workload's quality figure (1 - ROUGE-L of the
#: output against the full cache's, or the quality engine's unit).
TOLERANCES = (0.01, 0.1, 0.3, 0.5)
MEMORY_AXES = {"peak_ratio": "peak memory", "kv_ratio": "KV cache"}


@dataclass
class Verdict:
    """The answer for one workload at one tolerance (None: quality unknown, cost only)."""

    tolerance: float | None
    text: str
    choice: str | None = None  # label of the recommended cell; None when the full cache stays
    tied: list[str] = field(default_factory=list)  # labels indistinguishable in speed from the choice


def pareto(frame: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    """Boolean Series: True for the rows no other row dominates. `objectives` maps a column to "max" or "min";
    rows with a NaN objective are never on the frontier. Medians only: a point the intervals cannot separate from
    a dominating one is still called dominated, so read the frontier with the intervals beside it."""
    columns = list(objectives)
    values = np.column_stack([
        frame[c].to_numpy(dtype=float) * (1.0 if objectives[c] == "max" else -1.0) for c in columns
    ]) if len(frame) else np.empty((0, len(columns)))
    finite = np.isfinite(values).all(axis=1)
    front = np.zeros(len(frame), dtype=bool)
    for i in np.flatnonzero(finite):
        others = values[finite]
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        front[i] = not dominated
    return pd.Series(front, index=frame.index)


def memory_axis(cells: pd.DataFrame) -> str:
    """The memory a workload is judged on: peak memory on GPU (allocator peak: model, activations and cache), the KV
    cache's bytes on CPU, whose peak RSS is dominated by the interpreter and the model."""
    gpu = cells["device"].astype(str).str.startswith("cuda").all()
    return "peak_ratio" if gpu and cells["peak_ratio"].notna().any() else "kv_ratio"


def _no_difference(e: Estimate) -> bool:
    """A ratio with an interval that contains 1."""
    return e.known and e.n >= 2 and e.lo <= 1.0 <= e.hi and e.lo < e.hi


def _ratio(e: Estimate) -> str:
    """`1.23x [1.05-1.40]`, `no measurable difference [0.95-1.08x]`, or `1.23x (one repetition, no interval)`."""
    if not e.known:
        return "-"
    if e.n < 2:
        return f"{e.median:.2f}x (one repetition, no interval)"
    if _no_difference(e):
        return f"no measurable difference [{e.lo:.2f}-{e.hi:.2f}x]"
    return f"{e.median:.2f}x [{e.lo:.2f}-{e.hi:.2f}]"


def _loss(row: pd.Series) -> str:
    loss, lo, hi = row["quality_loss"], row.get("quality_loss_lo", math.nan), row["quality_loss_hi"]
    if not math.isfinite(loss):
        return "quality unknown"
    interval = f" [{lo:.2f}-{hi:.2f}]" if math.isfinite(lo) and lo < hi else ""
    return f"quality loss {loss:.2f}{interval} ({row['quality_unit']})"


def _costs(row: pd.Series, axis: str) -> str:
    basis = {"paired": "paired in the same process", "same run": "same run",
             "across runs": "across runs: see the warning"}.get(row.get("ratio_basis"), "")
    ratio = row["speed_ratio"]
    if _no_difference(ratio):
        speed = f"no measurable difference in decode speed [{ratio.lo:.2f}-{ratio.hi:.2f}x the full cache's]"
    else:
        speed = f"decode {_ratio(ratio)} the full cache's"
    parts = [speed + (f" ({basis})" if basis else "")]
    # On a GPU both memories say something; on a CPU the peak is the process's RSS (interpreter and model).
    for column in (axis, "kv_ratio") if axis == "peak_ratio" else (axis,):
        value = row.get(column, math.nan)
        if math.isfinite(value):
            parts.append(f"{value:.2f}x its {MEMORY_AXES[column]}")
    energy = row.get("j_per_token")
    if isinstance(energy, Estimate) and energy.known:
        parts.append(f"{energy.median:.3g} J/token" + (f" [{energy.lo:.3g}-{energy.hi:.3g}]" if energy.n > 1 else ""))
    return ", ".join(parts)


def within(cells: pd.DataFrame, tolerance: float | None) -> pd.Series:
    """True for the cells within `tolerance` (module docstring); every cell when `tolerance` is None."""
    if tolerance is None:
        return pd.Series(True, index=cells.index)
    return cells["is_full"] | (cells["quality_loss_hi"] <= tolerance + 1e-9)


def faster(ratio: Estimate) -> bool:
    return ratio.known and ratio.n >= 2 and ratio.lo > 1.0


def slower(ratio: Estimate) -> bool:
    return ratio.known and ratio.n >= 2 and ratio.hi < 1.0


def recommend(cells: pd.DataFrame, tolerance: float | None) -> Verdict:
    """The verdict for one workload's `cells` (module docstring); `tolerance` None ranks by cost only."""
    if cells.empty:
        return Verdict(tolerance, "No successful cell for this workload.")
    if not cells["is_full"].any():
        return _without_full(cells, tolerance)
    axis = memory_axis(cells)
    compressed = cells[~cells["is_full"] & cells["speed_ratio"].map(lambda e: e.known)]
    pool = compressed[within(compressed, tolerance)]
    if pool.empty:
        text = "Keep the full cache: no compressed cell stays within this quality loss"
        scored = compressed.dropna(subset=["quality_loss_hi"])
        if not scored.empty:
            closest = scored.loc[scored["quality_loss_hi"].idxmin()]
            text += f": the closest, {closest['label']}, has {_loss(closest)}"
        return Verdict(tolerance, text + ".")
    quality_order = ["quality_loss", axis] if tolerance is not None else [axis]
    quick = pool[pool["speed_ratio"].map(faster)]
    if not quick.empty:
        best = quick.loc[quick["speed_ratio"].map(lambda e: e.median).idxmax()]
        tied = quick[[not separated(e, best["speed_ratio"]) for e in quick["speed_ratio"]]]
        choice = tied.sort_values(quality_order, na_position="last").iloc[0]
        text = f"Use {choice['method']} at budget {choice['budget']:g}: {_costs(choice, axis)}"
        if tolerance is not None:
            text += f"; {_loss(choice)}"
        others = [label for label in tied["label"] if label != choice["label"]]
        if others:
            why = "better quality, then less memory" if tolerance is not None else "less memory"
            text += (f". Indistinguishable in decode speed from {', '.join(others)} (intervals overlap); chosen for "
                     f"{why}")
        return Verdict(tolerance, text + ".", choice["label"], others)
    even = pool[~pool["speed_ratio"].map(slower) & (pool[axis] < 1)]
    if not even.empty:
        choice = even.sort_values([axis, "quality_loss"], na_position="last").iloc[0]
        text = (f"Use {choice['method']} at budget {choice['budget']:g} to save memory: {_costs(choice, axis)}"
                + (f"; {_loss(choice)}" if tolerance is not None else "")
                + ". No compressed cell is measurably faster here: speed does not decide, memory does.")
        return Verdict(tolerance, text, choice["label"], [])
    ratios = [e.median for e in pool["speed_ratio"]]
    return Verdict(tolerance, "Keep the full cache: every compressed cell within this quality loss is measurably "
                              f"slower ({min(ratios):.2f}-{max(ratios):.2f}x its decode throughput).")


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
    others = [label for label in tied["label"] if label != choice["label"]]
    if others:
        text += f"; indistinguishable from {', '.join(others)} (chosen for the smallest KV cache)"
    return Verdict(tolerance, text + ".", choice["label"], others)


def verdicts(cells: pd.DataFrame, quality_known: bool, tolerances: Sequence[float] = TOLERANCES) -> list[Verdict]:
    """One verdict per tolerance where quality is known, else one cost-only verdict."""
    if len(cells) and cells["is_full"].all():
        return [Verdict(None, "Only the full cache ran for this workload: no compressed cell to compare with.")]
    if not quality_known:
        return [recommend(cells, None)]
    return [recommend(cells, t) for t in tolerances]


def speed_note(cells: pd.DataFrame) -> str | None:
    """A sentence on how the compressed cells compare in speed, when none was measurably faster or some slower."""
    ratios = [e for e in cells.loc[~cells["is_full"], "speed_ratio"] if isinstance(e, Estimate) and e.known]
    if not ratios:
        return None
    n_slower, n_faster = sum(map(slower, ratios)), sum(map(faster, ratios))
    medians = [e.median for e in ratios]
    span = f"{min(medians):.2f}-{max(medians):.2f}x" if len(medians) > 1 else f"{medians[0]:.2f}x"
    if n_slower == len(ratios):
        return (f"Every compressed cell here was slower than the full cache ({span} its decode throughput): at "
                "this size compression costs more than the attention over the full cache it saves.")
    if n_slower:
        return (f"{n_slower} of {len(ratios)} compressed cells were measurably slower than the full cache, "
                f"{n_faster} measurably faster (ratios {span}; the rest show no measurable difference).")
    if not n_faster:
        if len(ratios) == 1:
            return f"The compressed cell was not measurably faster or slower than the full cache (ratio {span})."
        return f"No compressed cell was measurably faster or slower than the full cache (ratios {span})."
    return None
