"""The decision section of the page: per workload, the verdict at each quality tolerance (`bench.decision`), a note
on the speed ratios and how they were measured, and the workload's table."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench import decision
from bench.report.tables import Table, decision_table, quality_detail_table


@dataclass
class Workload:
    id: str
    hardware: str
    model: str
    workload: str
    dtype: str
    quality_known: bool
    quality_unit: str
    verdicts: list[decision.Verdict]
    notes: list[str]
    warnings: list[str]
    table: Table
    quality_detail: Table | None


def _full_status(frame: pd.DataFrame, first: pd.Series) -> str | None:
    """Why the full cache of `first`'s workload has no successful cell on its machine (`oom`, ...), if it failed."""
    if frame.empty or "status" not in frame:
        return None
    failed = frame[(frame["method"] == "full") & (frame["status"] != "ok") & (frame["model"] == first["model"])
                   & (frame["batch_size"] == first["batch_size"]) & (frame["new_tokens"] == first["new_tokens"])
                   & (frame["text_tokens"] == first["text_tokens"]) & (frame["device"] == first["device"])]
    if "env_machine_id" in failed:
        failed = failed[failed["env_machine_id"] == first["machine"]]
    return None if failed.empty else str(failed["status"].iloc[0])


def _basis_note(cells: pd.DataFrame) -> str | None:
    """How the compressed cells' speed ratios were measured, in one sentence."""
    bases = cells.loc[~cells["is_full"], "ratio_basis"].dropna().value_counts()
    if bases.empty:
        return None
    words = {"paired": "paired with a full-cache call in the same process (alternating order)",
             "same run": "against the full cache's cell of the same run (not interleaved)",
             "across runs": "against a full-cache cell of another run"}
    parts = [f"{count} {words[basis]}" for basis, count in bases.items()]
    return "Speed ratios: " + "; ".join(parts) + "."


def workloads(cells: pd.DataFrame, frame: pd.DataFrame | None = None) -> list[Workload]:
    """One entry per workload of the cells frame, in its order."""
    out = []
    for workload_id, group in cells.groupby("workload_id", sort=False):
        first = group.iloc[0]
        if not group["is_full"].any() and frame is not None:
            group = group.assign(full_status=_full_status(frame, first))
        notes = [note for note in (decision.speed_note(group), _basis_note(group)) if note]
        if not any(e.known for e in group["floor_ratio"]):
            notes.append("Decode step against the byte floor: not in this store (it needs a GPU run; the byte floor "
                         "is weights + KV bytes over the copy bandwidth measured in the same run).")
        unpaired = group["paired_full_unavailable"].dropna()
        if len(unpaired):
            notes.append(f"Not paired: {unpaired.iloc[0]}.")
        warnings = [f"{label}: {warning}" for label, warning
                    in zip(group["label"], group["ratio_warning"], strict=True) if isinstance(warning, str)]
        quality = bool(first["quality_known"])
        out.append(Workload(
            id=str(workload_id), hardware=first["hardware"], model=first["model"], workload=first["workload"],
            dtype=str(first["dtype"]), quality_known=quality, quality_unit=str(first["quality_unit"]),
            verdicts=decision.verdicts(group, quality), notes=notes, warnings=warnings,
            table=decision_table(group), quality_detail=quality_detail_table(group) if quality else None,
        ))
    return out
