"""The line the page opens with: per machine, across its workloads, the method@budget to deploy at the smallest
quality tolerance at which one qualifies - or why nothing beats the full cache.

A method@budget qualifies at tolerance X on a machine when, in every workload of that machine where it ran beside a
full-cache cell, it is within X by the per-workload rule of `bench.decision` (`quality_loss_hi <= X`), not measurably
slower than the full cache, and either measurably faster or smaller in memory. Among those that qualify: the one that
ran in the most workloads first (the line says in how many of them), then the one measurably faster everywhere,
then (among those) the highest worst-case speed ratio, then the least memory, then the least quality loss - the
per-workload rule's order where speed does not decide. Trained models decide where the machine has any; a
machine with random-weight models only is ranked by cost.
"""

from __future__ import annotations

import pandas as pd

from bench.decision import MEMORY_AXES, TOLERANCES, faster, memory_axis, slower, within


def headlines(cells: pd.DataFrame) -> list[str]:
    """One sentence per machine of `cells` (the report's cells frame)."""
    if cells.empty:
        return ["No successful cell in the store: nothing to recommend."]
    return [_machine(hardware, group) for hardware, group in cells.groupby("hardware", sort=False)]


def _qualifies(row: pd.Series, tolerance: float | None, axis: str) -> bool:
    ratio = row["speed_ratio"]
    if not ratio.known or slower(ratio):
        return False
    if tolerance is not None and not row["quality_loss_hi"] <= tolerance + 1e-9:
        return False
    return faster(ratio) or row[axis] < 1


def _candidates(scope: list[pd.DataFrame]) -> dict[str, list[tuple[pd.Series, str]]]:
    """label -> (cell, memory axis) in each workload of `scope` where that label ran."""
    found: dict[str, list[tuple[pd.Series, str]]] = {}
    for workload in scope:
        axis = memory_axis(workload)
        for _, row in workload[~workload["is_full"]].iterrows():
            found.setdefault(row["label"], []).append((row, axis))
    return found


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}-{fmt.format(high)}"


def _describe(label: str, items: list[tuple[pd.Series, str]], quality: bool, workloads: int) -> str:
    ratios = [row["speed_ratio"] for row, _ in items]
    medians = [r.median for r in ratios]
    if all(map(faster, ratios)):
        speed = f"{_span(medians, '{:.2f}')}x the full cache's decode throughput"
    else:
        lows, highs = [r.lo for r in ratios], [r.hi for r in ratios]
        speed = f"no measurable decode difference ({min(lows):.2f}-{max(highs):.2f}x)"
    axis = items[0][1]
    memory = [row[axis] * 100 for row, _ in items]
    text = f"{label}, {speed}, {_span(memory, '{:.0f}')}% of the full cache's {MEMORY_AXES[axis]}"
    if quality:
        losses = [row["quality_loss_hi"] for row, _ in items]
        text += f", quality loss at most {max(losses):.2f}"
    if len(items) == workloads and workloads > 1:
        text += f" (in each of its {workloads} workloads)"
    elif len(items) < workloads:
        models = ", ".join(dict.fromkeys(f"{row['model']} {row['workload']}" for row, _ in items))
        text += f" (ran in {len(items)} of the {workloads} workloads: {models})"
    return text


def _best(scope: list[pd.DataFrame], tolerance: float | None) -> str | None:
    qualified = {label: items for label, items in _candidates(scope).items()
                 if all(_qualifies(row, tolerance, axis) for row, axis in items)}
    if not qualified:
        return None

    def rank(label: str) -> tuple:
        items = qualified[label]
        ratios = [row["speed_ratio"] for row, _ in items]
        everywhere = all(map(faster, ratios))
        # A median ratio whose interval holds 1 is noise: then memory decides, then quality, as in each workload.
        speed = min(r.median for r in ratios) if everywhere else 0.0
        loss = max(0.0 if pd.isna(row.get("quality_loss")) else row["quality_loss"] for row, _ in items)
        return (len(items), everywhere, speed, -max(row[axis] for row, axis in items), -loss)

    label = max(qualified, key=rank)
    return _describe(label, qualified[label], tolerance is not None, len(scope))


def _why_not(scope: list[pd.DataFrame], tolerance: float | None) -> str:
    compressed = pd.concat([w[~w["is_full"]] for w in scope])
    compressed = compressed[compressed["speed_ratio"].map(lambda e: e.known)]
    if compressed.empty:
        return "no compressed cell has a speed ratio to the full cache"
    inside = compressed[within(compressed, tolerance)]
    if inside.empty:
        closest = compressed.loc[compressed["quality_loss_hi"].idxmin()]
        return (f"every compressed cell loses more than {tolerance:g} (the closest, {closest['label']} on "
                f"{closest['model']} {closest['workload']}, {closest['quality_loss_hi']:.2f})")
    if inside["speed_ratio"].map(slower).all():
        medians = [e.median for e in inside["speed_ratio"]]
        return f"every compressed cell within it is measurably slower ({_span(medians, '{:.2f}')}x)"
    # Some method@budget qualifies in one workload but not in another: name the closest and where it falls short.
    for label, items in sorted(_candidates(scope).items(), key=lambda kv: -len(kv[1])):
        good = [row for row, axis in items if _qualifies(row, tolerance, axis)]
        if good:
            short = [row for row, axis in items if not _qualifies(row, tolerance, axis)]
            where = "; ".join(f"{row['model']} {row['workload']}: {_shortfall(row, tolerance)}" for row in short)
            return f"{label} qualifies on {len(good)} of the {len(items)} workloads where it ran, not on {where}"
    return "no compressed cell within it is measurably faster or smaller than the full cache"


def _shortfall(row: pd.Series, tolerance: float | None) -> str:
    if tolerance is not None and not row["quality_loss_hi"] <= tolerance + 1e-9:
        return f"quality loss {row['quality_loss_hi']:.2f}"
    if slower(row["speed_ratio"]):
        return f"measurably slower ({row['speed_ratio'].median:.2f}x)"
    return "neither faster nor smaller"


def _machine(hardware: str, cells: pd.DataFrame) -> str:
    workloads = [w for _, w in cells.groupby("workload_id", sort=False)
                 if w["is_full"].any() and not w["is_full"].all()]
    if not workloads:
        return (f"On {hardware}: no workload has both a successful full-cache cell and a compressed one, so no "
                "method is compared with the full cache (the verdicts below say what ran).")
    trained = [w for w in workloads if w["quality_known"].iloc[0]]
    scope = trained or workloads
    if not trained:
        best = _best(scope, None)
        where = f"On {hardware} (random-weight models only: ranked by cost, quality unknown)"
        if best:
            return f"{where}: {best}."
        return f"{where}: nothing beats the full cache, because {_why_not(scope, None)}."
    units = sorted({str(u) for w in scope for u in w.loc[~w["is_full"], "quality_unit"] if isinstance(u, str)})
    unit = f" ({', '.join(units)})" if units else ""
    missed: tuple[float, str] | None = None
    for tolerance in TOLERANCES:
        best = _best(scope, tolerance)
        if best:
            text = f"On {hardware}, at quality loss <= {tolerance:g}{unit}: {best}"
            if missed:
                text += f". Nothing qualifies at <= {missed[0]:g}: {missed[1]}"
            return text + "."
        missed = (tolerance, _why_not(scope, tolerance))
    return (f"On {hardware}: nothing beats the full cache at quality loss <= {TOLERANCES[-1]:g}{unit}, because "
            f"{missed[1] if missed else 'no cell qualifies'}.")
