"""The page's tables: per workload the decision table, every cell in three tables (speed; memory, quality and the
machine's load; on GPU energy, the byte floor and clocks), failures, and plain frames (the paper's figures, the
environment). A table holds text, never numbers: every value is formatted here (`bench.report.numbers`), its
interval on a second, smaller line, so that tables stay narrow enough to be read whole at 1000 px."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench import decision, labels
from bench.report.numbers import est_lines, num, ratio_lines, times
from bench.uncertainty import Estimate


@dataclass(frozen=True)
class Entry:
    """One table cell: its text, a CSS class (`l` left-aligned, `grey`, `warn`), an optional second line (an
    interval) and an optional tooltip."""

    text: str
    css: str = ""
    detail: str | None = None
    tooltip: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Entry]]
    #: (row index, heading): a full-width heading row before that row (the workload of the rows that follow).
    groups: list[tuple[int, str]] = field(default_factory=list)

    def drop_empty(self, optional: set[str], always: set[str] = frozenset()) -> Table:
        """The table without the `optional` columns that hold nothing measured (energy and the byte floor on CPU),
        nor the `always` columns."""
        keep = [j for j, column in enumerate(self.columns) if column not in always
                and (column not in optional or any(row[j].text != "-" for row in self.rows))]
        return Table([self.columns[j] for j in keep], [[row[j] for j in keep] for row in self.rows], self.groups)


def _estimate(value: Estimate) -> Entry:
    text, detail = est_lines(value)
    return Entry(text, detail=detail)


def _ratio(ratio: Estimate) -> Entry:
    text, detail = ratio_lines(ratio)
    return Entry(text, "words", detail)  # "no measurable difference" wraps onto two lines


def _speed_ratio(row: pd.Series) -> Entry:
    text, detail = ratio_lines(row["speed_ratio"])
    if row.get("ratio_basis") == "across runs":
        return Entry(text + " (across runs)", "words warn", detail, row.get("ratio_warning"))
    return Entry(text, "words", detail)


def _fixed(value: float, quality_known: bool = True) -> Entry:
    return Entry("-" if not math.isfinite(value) else f"{value:.2f}", "" if quality_known else "grey")


def _quality_loss(row: pd.Series) -> Entry:
    css = "" if row["quality_known"] else "grey"
    loss = row["quality_loss"]
    if not math.isfinite(loss):
        return Entry("-", css)
    lo, hi = row["quality_loss_lo"], row["quality_loss_hi"]
    detail = f"{lo:.2f}-{hi:.2f}" if row["quality_from_engine"] and math.isfinite(lo) and lo < hi else None
    return Entry(f"{loss:.2f}", css, detail, row["quality_unit"])


def _allocation_gain(row: pd.Series) -> Entry:
    """PrefixKV's paired gain over its uniform ablation with the same scores (the quality engine's; positive:
    the adaptive allocation is better), '~' where its interval contains 0."""
    gain = row.get("allocation_gain", math.nan)
    if not isinstance(gain, float) or not math.isfinite(gain):
        return Entry("-")
    lo, hi = row["allocation_gain_lo"], row["allocation_gain_hi"]
    same = " ~" if lo <= 0 <= hi else ""
    return Entry(f"{gain:+.3f}{same}", detail=f"{lo:+.3f} to {hi:+.3f}", tooltip=row["allocation_gain_unit"])


def _grey_quality(row: pd.Series) -> list[Entry]:
    css = "" if row["quality_known"] else "grey"
    return [Entry(_fixed(row["rouge_l"]).text, css), Entry(_fixed(row["token_agreement"]).text, css),
            Entry(num(row["perplexity"]), css)]


def _floor(row: pd.Series) -> Entry:
    ratio = row["floor_ratio"]
    if not ratio.known:
        return Entry("-")
    text, detail = est_lines(ratio)
    return Entry(f"{ratio.median:.2f}x", detail=detail)


def decision_table(workload: pd.DataFrame) -> Table:
    """One workload's cells: speed, memory and quality against the full cache, and the Pareto frontiers."""
    quality = bool(workload["quality_known"].iloc[0])
    on_quality = decision.pareto(workload, {"speed_ratio_med": "max", "quality_loss": "min"}) if quality else None
    axis = decision.memory_axis(workload)
    on_memory = decision.pareto(workload, {"speed_ratio_med": "max", axis: "min"})
    unit = str(workload["quality_unit"].iloc[0])
    columns = ["method", "budget", "reps", "decode tok/s", "x full (decode)", "x full (end-to-end, total time)",
               "peak memory x full", "KV cache x full", "J/token", f"quality loss ({unit})",
               "allocation gain over uniform", "ROUGE-L", "on the frontier of speed and"]
    rows = []
    for index, row in workload.iterrows():
        front = []
        if on_quality is not None and on_quality[index]:
            front.append("quality")
        if on_memory[index]:
            front.append(decision.MEMORY_AXES[axis])
        rows.append([
            Entry(row["method"], "l"), Entry(f"{row['budget']:g}"), Entry(str(row["n"])), _estimate(row["decode_tps"]),
            _speed_ratio(row), _ratio(row["e2e_ratio"]), Entry(times(row["peak_ratio"])),
            Entry(times(row["kv_ratio"])), _estimate(row["j_per_token"]), _quality_loss(row),
            _allocation_gain(row), _grey_quality(row)[0], Entry(", ".join(front), "s"),
        ])
    # Random weights: their quality columns would compare noise with noise.
    gain = "allocation gain over uniform"
    return Table(columns, rows).drop_empty({"J/token", gain}, always=set() if quality else {columns[-4], gain,
                                                                                              columns[-2]})


def _grouped(cells: pd.DataFrame, columns: list[str], make_row, optional: set[str]) -> Table:
    rows, groups = [], []
    for _, group in cells.groupby("workload_id", sort=False):
        first = group.iloc[0]
        groups.append((len(rows), f"{first['model']} · {first['workload']} · {first['hardware']} · {first['dtype']}"))
        rows.extend(make_row(row) for _, row in group.iterrows())
    return Table(columns, rows, groups).drop_empty(optional)


def speed_table(cells: pd.DataFrame) -> Table:
    """Every cell's speed: decode from its steps (median and lower decile), end-to-end from its total time."""
    columns = ["method", "budget", "reps", "decode tok/s", "x full (decode)", "compared with", "ms / step (median)",
               "ms / step (lower decile)", "end-to-end tok/s (total time)", "TTFT ms", "scoring ms",
               "compaction ms"]

    def make_row(row: pd.Series) -> list[Entry]:
        return [Entry(row["method"], "l"), Entry(f"{row['budget']:g}"), Entry(str(row["n"])),
                _estimate(row["decode_tps"]), _speed_ratio(row), Entry(row.get("ratio_basis") or "-", "s"),
                _estimate(row["step_ms"]), _estimate(row["step_p10_ms"]), _estimate(row["e2e_tps"]),
                _estimate(row["ttft_ms"]), _estimate(row["score_ms"]), _estimate(row["compact_ms"])]

    return _grouped(cells, columns, make_row, set())


def gpu_table(cells: pd.DataFrame) -> Table | None:
    """Every GPU cell's energy, decode step over its byte floor, copy bandwidth and SM clock around it; None without
    a GPU cell."""
    gpu = cells[cells["device"].astype(str).str.startswith("cuda")]
    if gpu.empty:
        return None
    columns = ["method", "budget", "J/token", "energy per call J", "step / byte floor", "copy GB/s",
               "SM MHz before → after"]

    def make_row(row: pd.Series) -> list[Entry]:
        return [Entry(row["method"], "l"), Entry(f"{row['budget']:g}"), _estimate(row["j_per_token"]),
                _estimate(row["energy_j"]), _floor(row), _estimate(row["copy_gbps"]),
                Entry(_pair(row["gpu_clock_before"], row["gpu_clock_after"], ".0f"))]

    return _grouped(gpu, columns, make_row, set())


def _pair(before: float, after: float, digits: str) -> str:
    if not math.isfinite(before):
        return "-"
    if not math.isfinite(after) or format(before, digits) == format(after, digits):
        return format(before, digits)
    return f"{format(before, digits)} → {format(after, digits)}"


def memory_quality_table(cells: pd.DataFrame) -> Table:
    """Every cell's memory, quality and the machine's load around it."""
    columns = ["method", "budget", "peak MiB", "KV cache MiB", "KV allocated MiB", "peak x full", "KV x full",
               "quality loss", "ROUGE-L", "agreement", "perplexity", "load (1 min) before → after", "CPU steal"]

    def make_row(row: pd.Series) -> list[Entry]:
        steal = row["cpu_steal"]
        return [Entry(row["method"], "l"), Entry(f"{row['budget']:g}"), Entry(num(row["peak_memory_mib"])),
                Entry(num(row["kv_cache_mib"])), Entry(num(row["kv_capacity_mib"])), Entry(times(row["peak_ratio"])),
                Entry(times(row["kv_ratio"])), _quality_loss(row), *_grey_quality(row),
                Entry(_pair(row["load_before"], row["load_after"], ".1f")),
                Entry("-" if not math.isfinite(steal) else f"{steal:.1%}")]

    return _grouped(cells, columns, make_row, {"KV allocated MiB", "CPU steal"})


def quality_detail_table(workload: pd.DataFrame) -> Table | None:
    """Per task of the quality engine (`quality_detail`), each cell's loss and interval; None without the engine."""
    if "quality_detail" not in workload or not workload["quality_from_engine"].any():
        return None
    import json

    per_cell = {}
    for _, row in workload[workload["quality_from_engine"] & ~workload["is_full"]].iterrows():
        try:
            per_cell[row["label"]] = json.loads(row["quality_detail"]) if isinstance(row["quality_detail"], str) else {}
        except ValueError:
            per_cell[row["label"]] = {}
    tasks = sorted({task for detail in per_cell.values() for task in detail})
    if not tasks:
        return None
    rows = []
    for label, detail in per_cell.items():
        row = [Entry(label, "l")]
        for task in tasks:
            figures = detail.get(task)
            if not figures or figures.get("loss") is None:
                row.append(Entry("-"))
                continue
            lo, hi = figures.get("lo"), figures.get("hi")
            row.append(Entry(f"{figures['loss']:.3f}", detail=f"{lo:.3f}-{hi:.3f}" if lo is not None and hi is not None
                             else None, tooltip=f"{figures.get('unit', '')}, n={figures.get('n', '?')}"))
        rows.append(row)
    return Table(["cell", *tasks], rows)


def frame_table(frame: pd.DataFrame) -> Table:
    """A plain frame (the paper's rows), every value formatted by `num`."""
    rows = [[Entry(_plain(value), "" if _numeric(value) else "s") for value in row] for _, row in frame.iterrows()]
    return Table([str(column).replace("_", " ") for column in frame.columns], rows)


def _numeric(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def transposed_table(frame: pd.DataFrame, key: str) -> Table:
    """One column per row of `frame` (named by its `key`), one row per other field: the environment of a few runs,
    which would be fifteen columns wide the other way round."""
    fields = [column for column in frame.columns if column != key]
    rows = [[Entry(str(name).removeprefix("env_").replace("_", " "), "l"),
             *(Entry(_plain(value), "l") for value in frame[name])] for name in fields]
    return Table(["", *(str(value) for value in frame[key])], rows)


def _plain(value) -> str:
    if _numeric(value):
        return num(value)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def failures_table(frame: pd.DataFrame) -> Table | None:
    if frame.empty or "status" not in frame:
        return None
    failed = frame[frame["status"] != "ok"]
    if failed.empty:
        return None
    rows = []
    for _, row in failed.iterrows():
        text = int(row["text_tokens"]) if pd.notna(row.get("text_tokens")) else None
        prompt = labels.prompt_tokens(str(row["model"]), text) if text is not None else None
        rows.append([Entry(str(row.get("model")), "l"), Entry(str(row.get("device")), "l"),
                     Entry(labels.workload(row["batch_size"], prompt, row["new_tokens"], text), "l"),
                     Entry(labels.method(row["method"], None, row.get("method_kwargs")), "l"),
                     Entry(f"{row['budget']:g}"), Entry(str(row["status"]), "l"),
                     Entry(str(row.get("error") or ""), "l wrap")])
    return Table(["model", "device", "workload", "method", "budget", "status", "error"], rows)
