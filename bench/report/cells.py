"""The report's data: one row per (cell, machine) from a store's rows, in plain pandas (no drawing).

Speeds come from the decode steps of every repetition (`bench.uncertainty.step_cis`): the median step and the lower
decile, decode tokens/s as batch over the median step, each with its two-level bootstrap interval. The end-to-end
figure (new tokens over the whole call) is a total per repetition, kept and labelled as such.

Each cell is compared with the full cache of its workload on its machine (`ratio_basis` says how):
- `paired`: the cell timed its own full-cache call beside each repetition, in the same process (`bench.cell`): the
  ratio's two sides saw the same load;
- `same run`: the full cache's cell of the same run (`run_id`), measured before or after;
- `across runs`: only a full-cache cell of another run exists (a resumed store): its load was another moment's, so
  the ratio carries a warning (`ratio_warning`);
- `reference`: the full cache itself.

Quality: where the rows carry the quality engine's columns (`quality_loss` with its paired interval
`quality_loss_lo`/`quality_loss_hi`, `quality_unit`, `quality_samples`, `quality_source`, `quality_detail`), those;
otherwise 1 - ROUGE-L of the output against the full cache's (`quality_loss_hi` = the point, no interval). Models
with random weights have no quality (NaN), whatever their rows say.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from bench import labels
from bench.uncertainty import Estimate, median_ci, ratio_ci, step_cis, step_ratio_ci

MIB = 2**20
POLICY_ORDER = ("grow", "fixed_position", "score")
ROUGE_UNIT = "1 - ROUGE-L"
#: Per-repetition figures: name -> one sample per repetition from the cell's rows.
PER_REPETITION: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "e2e_tps": lambda rows: _column(rows, "tokens_per_s"),
    "ttft_ms": lambda rows: _column(rows, "ttft_s") * 1e3,
    "score_ms": lambda rows: _column(rows, "score_s") * 1e3,
    "compact_ms": lambda rows: _column(rows, "compact_s") * 1e3,
    "j_per_token": lambda rows: _column(rows, "j_per_token"),
    "energy_j": lambda rows: _column(rows, "energy_j"),
    "floor_ratio": lambda rows: _column(rows, "decode_floor_ratio"),
    "copy_gbps": lambda rows: _column(rows, "copy_bandwidth_gbps"),
}
#: Figures kept as `Estimate`s, each with `<name>_med/_lo/_hi` float columns for plotting.
ESTIMATES = ("decode_tps", "step_ms", "step_p10_ms", *PER_REPETITION)
#: Optional row columns carried as they are (present only where the rows have them).
CARRIED = ("kv_bytes_per_head", "kv_capacity_bytes_per_head", "kept_per_head", "quality_detail", "quality_source")


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    if name not in rows:
        return np.array([], dtype=float)
    return pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=float)


def _number(value) -> float:
    try:
        number = float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan
    return number


def _step_groups(rows: pd.DataFrame, name: str) -> list:
    """One sequence of decode-step seconds per repetition (None where a repetition has none)."""
    if name not in rows:
        return []
    return [None if steps is None or (isinstance(steps, float) and math.isnan(steps)) else steps
            for steps in rows[name]]


def hardware(ok: pd.DataFrame) -> pd.Series:
    """`NVIDIA H100 80GB HBM3` or `CPU: AMD EPYC 7B13` per row; two machines of one part stay apart."""
    gpu = ok["device"].astype(str).str.startswith("cuda")
    name = ok["device_name"] if "device_name" in ok else pd.Series(None, index=ok.index)
    env_gpu = ok["env_gpu"] if "env_gpu" in ok else pd.Series(None, index=ok.index)
    cpu = ok["env_cpu"] if "env_cpu" in ok else pd.Series("unknown CPU", index=ok.index)
    gpu_name = name.astype(object).where(name.notna(), env_gpu)
    part = pd.Series(np.where(gpu, gpu_name.astype(str), "CPU: " + cpu.astype(str)), index=ok.index)
    machine = ok["env_machine_id"].astype(str) if "env_machine_id" in ok else pd.Series("", index=ok.index)
    shared = part.groupby(part).transform(lambda rows: machine[rows.index].nunique() > 1)
    return part.where(~shared, part + " (" + machine + ")")


def method_order(name: str, decode: str, label: str) -> tuple:
    from prefixkv import METHODS

    known = list(METHODS)
    return (known.index(name) if name in known else len(known), name,
            POLICY_ORDER.index(decode) if decode in POLICY_ORDER else len(POLICY_ORDER), label)


def methods_in(frame: pd.DataFrame) -> list[str]:
    """The method labels of `frame` in report order: full first, then the registry's order, decode policies after."""
    if frame.empty:
        return []
    pairs = frame.drop_duplicates("method")[["method_name", "decode", "method"]]
    return [label for *_, label in sorted(method_order(*pair) for pair in pairs.itertuples(index=False))]


def _quality(first: pd.Series, known: bool) -> dict:
    """The quality columns (module docstring) from a cell's first row."""
    rouge = _number(first.get("rouge_l"))
    engine = _number(first.get("quality_loss_hi"))
    out = {"quality_from_engine": known and math.isfinite(engine)}
    if out["quality_from_engine"]:
        out.update(quality_loss=_number(first.get("quality_loss")),
                   quality_loss_lo=_number(first.get("quality_loss_lo")), quality_loss_hi=engine,
                   quality_unit=str(first.get("quality_loss_unit") or "quality loss"),
                   quality_samples=_number(first.get("quality_samples")),
                   allocation_gain=_number(first.get("allocation_gain")),
                   allocation_gain_lo=_number(first.get("allocation_gain_lo")),
                   allocation_gain_hi=_number(first.get("allocation_gain_hi")),
                   allocation_gain_unit=first.get("allocation_gain_unit"))
    else:
        loss = 1.0 - rouge if known else math.nan
        out.update(quality_loss=loss, quality_loss_lo=loss, quality_loss_hi=loss, quality_unit=ROUGE_UNIT,
                   quality_samples=math.nan, allocation_gain=math.nan, allocation_gain_lo=math.nan,
                   allocation_gain_hi=math.nan, allocation_gain_unit=None)
    return out


def _one_cell(rows: pd.DataFrame) -> dict:
    first, last = rows.iloc[0], rows.iloc[-1]
    decode = first["decode"] if isinstance(first.get("decode"), str) else "grow"
    kwargs = first.get("method_kwargs") if isinstance(first.get("method_kwargs"), str) else None
    prompt = first.get("prompt_length")
    known = labels.quality_known(str(first["model"]))
    cell = {
        "key": first["key"], "machine": first["env_machine_id"], "run_id": first.get("run_id"),
        "hardware": first["hardware"], "device": first["device"], "model": first["model"], "dtype": first.get("dtype"),
        "batch_size": int(first["batch_size"]), "text_tokens": first.get("text_tokens"),
        "new_tokens": int(first["new_tokens"]), "prompt_length": int(prompt) if pd.notna(prompt) else None,
        "method_name": first["method"], "decode": decode, "budget": float(first["budget"]),
        "method": labels.method(first["method"], decode, kwargs), "is_full": first["method"] == "full",
        "n": len(rows), "quality_known": known,
        "peak_memory_mib": _number(first.get("peak_memory_bytes")) / MIB,
        "peak_memory_source": first.get("peak_memory_source"),
        "kv_cache_mib": _number(first.get("kv_bytes_total")) / MIB,
        "kv_capacity_mib": _number(first.get("kv_capacity_bytes_total")) / MIB,
        "token_agreement": _number(first.get("token_agreement")), "rouge_l": _number(first.get("rouge_l")),
        "perplexity": _number(first.get("perplexity")), "kept_per_layer": first.get("kept_per_layer"),
        "kept_per_head": first.get("kept_per_head"),
        "telemetry_status": first.get("telemetry_status"),
        "load_before": _number(first.get("load_avg_1min_before")),
        "load_after": _number(last.get("load_avg_1min_after")),
        "cpu_steal": _number(first.get("cpu_steal_fraction")),
        "gpu_clock_before": _number(first.get("gpu_sm_clock_mhz_before")),
        "gpu_clock_after": _number(last.get("gpu_sm_clock_mhz_after")),
        "paired_full_unavailable": first.get("paired_full_unavailable"),
        **{name: first.get(name) for name in CARRIED if name in rows},
        **_quality(first, known),
    }
    cell["workload"] = labels.workload(cell["batch_size"], cell["prompt_length"], cell["new_tokens"],
                                       cell["text_tokens"])
    cell["label"] = f"{cell['method']}@{cell['budget']:g}"
    steps = _step_groups(rows, "decode_steps_s")
    cell["_steps"] = steps
    cell["_paired_steps"] = _step_groups(rows, "paired_full_decode_steps_s")
    cell["_e2e"] = _column(rows, "tokens_per_s")
    cell["_paired_e2e_ratio"] = _column(rows, "paired_full_total_s") / _column(rows, "total_s") \
        if "paired_full_total_s" in rows else np.array([])
    median_step, p10_step = step_cis(steps, (0.5, 0.1))
    cell["step_ms"], cell["step_p10_ms"] = median_step.scale(1e3), p10_step.scale(1e3)
    cell["decode_tps"] = median_step.reciprocal(cell["batch_size"])
    for name, samples in PER_REPETITION.items():
        cell[name] = median_ci(samples(rows))
    return cell


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, machine) of the successful rows (module docstring), sorted in report order."""
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["hardware"] = hardware(ok)
    ok["env_machine_id"] = ok.get("env_machine_id", "")
    table = pd.DataFrame([_one_cell(rows) for _, rows in ok.groupby(["key", "env_machine_id"], sort=False)])
    table["workload_id"] = (table["hardware"] + " | " + table["model"].astype(str) + " | "
                            + table["dtype"].astype(str) + " | " + table["workload"])
    _one_quality_unit_per_workload(table)
    add_ratios(table)
    for name in (*ESTIMATES, "speed_ratio", "e2e_ratio"):
        table[f"{name}_med"] = [e.median for e in table[name]]
        table[f"{name}_lo"] = [e.lo for e in table[name]]
        table[f"{name}_hi"] = [e.hi for e in table[name]]
    table["_order"] = [method_order(m, d, label) for m, d, label
                       in zip(table["method_name"], table["decode"], table["method"], strict=True)]
    order = ["hardware", "model", "batch_size", "prompt_length", "new_tokens", "_order", "budget"]
    return table.sort_values(order, key=lambda s: s.map(str) if s.name == "_order" else s).reset_index(drop=True)


def _one_quality_unit_per_workload(table: pd.DataFrame) -> None:
    """Where the quality engine measured any compressed cell of a workload, the workload is judged in its unit: the
    full cache is its own reference (loss 0), and a cell without the engine's figures has no quality there (its
    1 - ROUGE-L is another unit)."""
    for _, index in table.groupby("workload_id").groups.items():
        group = table.loc[index]
        engine = group[group["quality_from_engine"] & ~group["is_full"]]
        if engine.empty:
            continue
        unit = engine["quality_unit"].iloc[0]
        for i in index:
            if table.at[i, "is_full"]:
                table.loc[i, ["quality_loss", "quality_loss_lo", "quality_loss_hi"]] = 0.0
            elif not table.at[i, "quality_from_engine"]:
                table.loc[i, ["quality_loss", "quality_loss_lo", "quality_loss_hi"]] = math.nan
            table.at[i, "quality_unit"] = unit


def _full_for(group: pd.DataFrame, run_id) -> tuple[pd.Series | None, str | None]:
    """The full-cache cell a cell of `run_id` is divided by when it has no paired call: (cell, basis)."""
    fulls = group[group["is_full"]]
    if fulls.empty:
        return None, None
    same = fulls[fulls["run_id"] == run_id]
    return (same.iloc[0], "same run") if len(same) else (fulls.iloc[0], "across runs")


def _load(row: pd.Series) -> str:
    before, after = row["load_before"], row["load_after"]
    if not math.isfinite(before):
        return "load not recorded"
    return f"load {before:.1f}" + (f"-{after:.1f}" if math.isfinite(after) and round(after, 1) != round(before, 1)
                                   else "")


def add_ratios(table: pd.DataFrame) -> None:
    """Speed and memory ratios to the full cache of each cell's workload and machine (module docstring)."""
    table["speed_ratio"] = [Estimate.missing()] * len(table)
    table["e2e_ratio"] = [Estimate.missing()] * len(table)
    table["ratio_basis"] = None
    table["ratio_warning"] = None
    for column in ("peak_ratio", "kv_ratio"):
        table[column] = math.nan
    for _, index in table.groupby(["workload_id", "machine"]).groups.items():
        group = table.loc[index]
        for i in index:
            row = table.loc[i]
            full, basis = _full_for(group, row["run_id"])
            if row["is_full"]:
                table.at[i, "speed_ratio"] = table.at[i, "e2e_ratio"] = Estimate(1.0, 1.0, 1.0, int(row["n"]))
                table.at[i, "ratio_basis"] = "reference"
            elif any(steps is not None and len(steps) for steps in row["_paired_steps"]):
                table.at[i, "speed_ratio"] = step_ratio_ci(row["_paired_steps"], row["_steps"], paired=True)
                table.at[i, "e2e_ratio"] = median_ci(row["_paired_e2e_ratio"])
                table.at[i, "ratio_basis"] = "paired"
            elif full is not None:
                table.at[i, "speed_ratio"] = step_ratio_ci(full["_steps"], row["_steps"], paired=False)
                table.at[i, "e2e_ratio"] = ratio_ci(row["_e2e"], full["_e2e"])
                table.at[i, "ratio_basis"] = basis
                if basis == "across runs":
                    table.at[i, "ratio_warning"] = (
                        f"across runs: the full cache was measured in run {full['run_id']} ({_load(full)}), this "
                        f"cell in run {row['run_id']} ({_load(row)}); the machine's load at two moments is not the "
                        "method - re-run the full cache with this cell (`--force`) for a ratio that means something")
            if full is not None:
                table.at[i, "peak_ratio"] = row["peak_memory_mib"] / full["peak_memory_mib"]
                table.at[i, "kv_ratio"] = row["kv_cache_mib"] / full["kv_cache_mib"] if full["kv_cache_mib"] \
                    else math.nan
