"""KV-cache memory of measured cells, as plain pandas frames (no figures): what a memory figure draws.

- `kv_memory(rows)`: per result row, the KV bytes held after generation, the bytes allocated (decode slots
  included) and their ratio - 1.0 plus the unused planned decode slots, whatever the per-head budgets, because the
  packed layout allocates the sum of what the heads keep (`prefixkv.packed`);
- `head_memory(rows)`: per (result row, layer, KV head), the prompt entries kept, the bytes held and the bytes
  allocated, from the `kept_per_head` / `kv_bytes_per_head` / `kv_capacity_bytes_per_head` columns.

Rows written before those columns existed (or failed cells) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

MIB = 2**20
#: Identifying columns carried over when a row has them.
ID_COLUMNS = ("key", "model", "device", "batch_size", "prompt_length", "new_tokens", "method", "method_kwargs",
              "budget", "rep")


def _ids(rows: pd.DataFrame, id_columns: Sequence[str]) -> list[str]:
    return [c for c in id_columns if c in rows.columns]


def kv_memory(rows: pd.DataFrame, id_columns: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """One line per row that has both figures: `kv_held_mib`, `kv_allocated_mib`, `allocated_over_held`."""
    needed = {"kv_bytes_total", "kv_capacity_bytes_total"}
    if not needed <= set(rows.columns):
        return pd.DataFrame(columns=[*_ids(rows, id_columns), "kv_held_mib", "kv_allocated_mib", "allocated_over_held"])
    rows = rows.dropna(subset=sorted(needed))
    out = rows[_ids(rows, id_columns)].copy()
    out["kv_held_mib"] = rows["kv_bytes_total"].astype(float) / MIB
    out["kv_allocated_mib"] = rows["kv_capacity_bytes_total"].astype(float) / MIB
    out["allocated_over_held"] = out["kv_allocated_mib"] / out["kv_held_mib"].where(out["kv_held_mib"] > 0)
    return out.reset_index(drop=True)


def head_memory(rows: pd.DataFrame, id_columns: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """Long frame: one line per (row, layer, kv_head) with `kept` (prompt entries kept), `kv_mib` (bytes held, keys +
    values, the whole batch) and `kv_allocated_mib` (bytes allocated, decode slots included; NaN for rows written
    before that column existed)."""
    ids = _ids(rows, id_columns)
    columns = [*ids, "layer", "kv_head", "kept", "kv_mib", "kv_allocated_mib"]
    if not {"kept_per_head", "kv_bytes_per_head"} <= set(rows.columns):
        return pd.DataFrame(columns=columns)
    records = []
    for _, row in rows.iterrows():
        kept, held = row["kept_per_head"], row["kv_bytes_per_head"]
        if kept is None or held is None or len(kept) == 0:
            continue
        allocated = row.get("kv_capacity_bytes_per_head")
        if allocated is None or len(allocated) == 0:
            allocated = [[float("nan")] * len(layer) for layer in kept]
        base = {c: row[c] for c in ids}
        for layer, heads in enumerate(zip(kept, held, allocated, strict=True)):
            for head, (k, b, a) in enumerate(zip(*heads, strict=True)):
                records.append({**base, "layer": layer, "kv_head": head, "kept": int(k), "kv_mib": float(b) / MIB,
                                "kv_allocated_mib": float(a) / MIB})
    return pd.DataFrame.from_records(records, columns=columns)
