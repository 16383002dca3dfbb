"""The "across machines" section, when the store holds several: the same cells' absolute and relative speed on
each machine, and the fastest cell of each workload on each."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report.numbers import est_lines, num, ratio_lines, ratio_words, times
from bench.report.tables import Entry, Table


def cross_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells (model, workload, method, budget) run on more than one machine, one row per machine."""
    if cells.empty or cells["hardware"].nunique() < 2:
        return cells.iloc[0:0]
    identity = ["model", "workload", "method", "budget"]
    machines = cells.groupby(identity)["hardware"].transform("nunique")
    return cells[machines > 1]


@dataclass
class Cross:
    hardware: list[str]
    table: Table | None
    winners: Table
    note: str | None


def _side_by_side(shared: pd.DataFrame, machines: list[str]) -> Table:
    rows = []
    for (model, workload, method, budget), group in shared.groupby(["model", "workload", "method", "budget"],
                                                                    sort=False):
        group = group.set_index("hardware")
        row = [Entry(model, "l"), Entry(workload, "l"), Entry(method, "l"), Entry(f"{budget:g}")]
        for machine in machines:
            if machine not in group.index:
                row += [Entry("not run", "grey")] * 3
                continue
            cell = group.loc[machine]
            floor = times(cell["floor_ratio"]) if cell["floor_ratio"].known else "-"
            tps, tps_interval = est_lines(cell["decode_tps"])
            ratio, ratio_interval = ratio_lines(cell["speed_ratio"])
            row += [Entry(tps, detail=tps_interval), Entry(ratio, "words", ratio_interval), Entry(floor)]
        rows.append(row)
    columns = ["model", "workload", "method", "budget"]
    for machine in machines:
        columns += [f"{machine}: decode tok/s", f"{machine}: x full", f"{machine}: step / floor"]
    return Table(columns, rows)


def _fastest(cells: pd.DataFrame, machines: list[str]) -> Table:
    rows = []
    for (model, workload), group in cells.groupby(["model", "workload"], sort=False):
        row = [Entry(model, "l"), Entry(workload, "l")]
        for machine in machines:
            here = group[(group["hardware"] == machine) & group["decode_tps_med"].notna()]
            if here.empty:
                row.append(Entry("not run", "grey"))
                continue
            best = here.loc[here["decode_tps_med"].idxmax()]
            ratio = best["speed_ratio"]
            if not ratio.known:
                text = f"{best['label']}: {num(best['decode_tps_med'])} tok/s (no full cache to compare)"
            elif best["is_full"]:
                text = f"{best['label']} (the full cache itself)"
            else:
                text = f"{best['label']}: {ratio_words(ratio)} the full cache"
            row.append(Entry(text, "l wrap"))
        rows.append(row)
    return Table(["model", "workload", *[f"fastest on {machine}" for machine in machines]], rows)


def cross_section(cells: pd.DataFrame) -> Cross | None:
    """The section, or None with fewer than two machines."""
    if cells.empty or cells["hardware"].nunique() < 2:
        return None
    machines = sorted(cells["hardware"].unique())
    shared = cross_cells(cells)
    note = None if len(shared) else ("No cell ran on more than one machine (workloads differ), so there is no "
                                     "like-for-like comparison; the fastest cell of each workload on each machine "
                                     "follows.")
    return Cross(machines, _side_by_side(shared, machines) if len(shared) else None, _fastest(cells, machines), note)
