"""The HTML report: one self-contained file (figures embedded as base64 PNG) that answers "which method, at which
budget, on which hardware" for each workload (model x batch x lengths), with the uncertainty of every figure shown.

Order of the page: the decision (per workload: a recommendation per quality tolerance, the Pareto frontier, the
cells with intervals and ratios to the full cache), the cross-hardware comparison when the store holds several
machines, the figures, the paper's published figures beside ours, the summary table, failures, environments.

Every speed and energy figure is a median over the cell's repetitions with a 95% bootstrap interval
(`bench.uncertainty`); ratios to the full cache compare a cell with the full cache of the same workload on the same
machine, so they travel across machines where absolute figures do not.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from bench import decision, labels, paper, store  # noqa: E402
from bench.uncertainty import CONFIDENCE, Estimate, median_ci, ratio_ci  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
MATRICES = Path(__file__).parent / "matrices"
MIB = 2**20
POLICY_ORDER = ("grow", "fixed_position", "score")
#: Budget markers in the trade-off figure: budgets are told apart by shape, so no text label can overlap.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
#: Per-cell figures: name -> the row column holding one sample per repetition (or a function of the rows).
SAMPLES: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "decode_tps": lambda r: _col(r, "decode_tokens_per_s"),
    "e2e_tps": lambda r: _col(r, "tokens_per_s"),
    "step_ms": lambda r: np.array([np.median(np.asarray(s, dtype=float)) * 1e3 if s is not None and len(s) else np.nan
                                   for s in r["decode_steps_s"]]) if "decode_steps_s" in r else np.array([]),
    "ttft_ms": lambda r: _col(r, "ttft_s") * 1e3,
    "score_ms": lambda r: _col(r, "score_s") * 1e3,
    "compact_ms": lambda r: _col(r, "compact_s") * 1e3,
    "j_per_token": lambda r: _col(r, "j_per_token"),
    "energy_j": lambda r: _col(r, "energy_j"),
    "floor_ratio": lambda r: _col(r, "decode_floor_ratio"),
    "copy_gbps": lambda r: _col(r, "copy_bandwidth_gbps"),
}


def _col(rows: pd.DataFrame, name: str) -> np.ndarray:
    if name not in rows:
        return np.array([], dtype=float)
    return pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=float)


# --- numbers ------------------------------------------------------------------------------------------------------


def num(v: float | None, digits: int = 3) -> str:
    """One format for every number on the page: thousands separators, `digits` significant digits, never an
    exponent (`26,640`, `2,469`, `551`, `12.3`, `0.0412`); `-` for a missing value."""
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"  # counts (batch, repetitions) are integers, never "3.00"
    v = float(v)
    if not math.isfinite(v):
        return "-"
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    if decimals and abs(round(v, decimals)) >= 10 ** (digits - decimals):  # 0.9995 rounds up to 1.00, not 1.000
        decimals -= 1
    return f"{v:,.{decimals}f}"


def est(e: Estimate | None, suffix: str = "") -> str:
    """`551 [512-575]`: the median and its interval (the interval is left out with one repetition)."""
    if not isinstance(e, Estimate) or not e.known:
        return "-"
    if e.n < 2 or e.lo == e.hi:
        return f"{num(e.median)}{suffix}"
    return f"{num(e.median)}{suffix} [{num(e.lo)}-{num(e.hi)}]"


def ratio(e: Estimate | float | None) -> str:
    """`1.23x [1.05-1.40]` (or `0.84x` for a plain float)."""
    if isinstance(e, Estimate):
        if not e.known:
            return "-"
        return f"{e.median:.2f}x" + (f" [{e.lo:.2f}-{e.hi:.2f}]" if e.n > 1 and e.lo != e.hi else "")
    if e is None or not math.isfinite(float(e)):
        return "-"
    return f"{float(e):.2f}x"


# --- cells ----------------------------------------------------------------------------------------------------------


def _hardware(ok: pd.DataFrame) -> pd.Series:
    gpu = ok["device"].astype(str).str.startswith("cuda")
    name = ok["device_name"] if "device_name" in ok else pd.Series(None, index=ok.index)
    env_gpu = ok["env_gpu"] if "env_gpu" in ok else pd.Series(None, index=ok.index)
    cpu = ok["env_cpu"] if "env_cpu" in ok else pd.Series("unknown CPU", index=ok.index)
    hw = pd.Series(np.where(gpu, name.fillna(env_gpu).astype(str), "CPU: " + cpu.astype(str)), index=ok.index)
    # Two machines with the same part (two H100 hosts) stay apart: their runs are not pooled.
    machine = ok["env_machine_id"].astype(str) if "env_machine_id" in ok else pd.Series("", index=ok.index)
    shared = hw.groupby(hw).transform(lambda s: machine[s.index].nunique() > 1)
    return hw.where(~shared, hw + " (" + machine + ")")


def _method_order(name: str, decode: str, label: str) -> tuple:
    from prefixkv import METHODS

    known = list(METHODS)
    return (known.index(name) if name in known else len(known), name,
            POLICY_ORDER.index(decode) if decode in POLICY_ORDER else len(POLICY_ORDER), label)


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, machine) of the successful rows: each figure of `SAMPLES` as an `Estimate` (median and
    interval over the repetitions, with `<name>_med/_lo/_hi` float columns for plotting), the configuration,
    memory, quality, and the ratios to the same machine's full cache of the same workload."""
    if frame.empty or "status" not in frame:
        return pd.DataFrame()
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["hardware"] = _hardware(ok)
    ok["env_machine_id"] = ok.get("env_machine_id", "")
    out = []
    for (_, _), rows in ok.groupby(["key", "env_machine_id"], sort=False):
        r = rows.iloc[0]
        decode = r["decode"] if isinstance(r.get("decode"), str) else "grow"
        kwargs = r.get("method_kwargs") if isinstance(r.get("method_kwargs"), str) else None
        prompt = r.get("prompt_length")
        row = {
            "key": r["key"], "machine": r["env_machine_id"], "run_id": r.get("run_id"), "hardware": r["hardware"],
            "device": r["device"], "model": r["model"], "dtype": r.get("dtype"),
            "batch_size": int(r["batch_size"]), "text_tokens": r.get("text_tokens"),
            "new_tokens": int(r["new_tokens"]), "prompt_length": int(prompt) if pd.notna(prompt) else None,
            "method_name": r["method"], "decode": decode, "budget": float(r["budget"]),
            "method": labels.method(r["method"], decode, kwargs),
            "is_full": r["method"] == "full", "n": len(rows),
            "quality_known": labels.quality_known(str(r["model"])),
            "peak_memory_mib": _float(r.get("peak_memory_bytes")) / MIB,
            "peak_memory_source": r.get("peak_memory_source"),
            "kv_cache_mib": _float(r.get("kv_bytes_total")) / MIB,
            "kv_allocated_mib": _float(r.get("kv_capacity_bytes_total")) / MIB,
            "token_agreement": _float(r.get("token_agreement")), "rouge_l": _float(r.get("rouge_l")),
            "perplexity": _float(r.get("perplexity")),
            "kept_per_layer": r.get("kept_per_layer"),
            "kept_per_head": r.get("kept_per_head"),
            "telemetry_status": r.get("telemetry_status"),
        }
        row["workload"] = labels.workload(row["batch_size"], row["prompt_length"], row["new_tokens"],
                                          row["text_tokens"])
        row["label"] = f"{row['method']}@{row['budget']:g}"
        for name, get in SAMPLES.items():
            samples = get(rows)
            row[f"_s_{name}"] = samples
            e = median_ci(samples)
            row[name] = e
            row[f"{name}_med"], row[f"{name}_lo"], row[f"{name}_hi"] = e.median, e.lo, e.hi
        out.append(row)
    c = pd.DataFrame(out)
    c["workload_id"] = (c["hardware"] + " | " + c["model"].astype(str) + " | " + c["dtype"].astype(str) + " | "
                        + c["workload"])
    c["quality_loss"] = np.where(c["quality_known"], 1.0 - c["rouge_l"], np.nan)
    _add_ratios(c)
    order = [_method_order(m, d, lbl) for m, d, lbl in zip(c["method_name"], c["decode"], c["method"], strict=True)]
    c["_order"] = order
    c = c.sort_values(["hardware", "model", "batch_size", "prompt_length", "new_tokens", "_order", "budget"],
                      key=lambda s: s.map(str) if s.name == "_order" else s).reset_index(drop=True)
    return c


def _float(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _add_ratios(c: pd.DataFrame) -> None:
    """Columns comparing each cell with the full cache of its workload on its machine (NaN without one)."""
    c["speed_ratio"] = [Estimate.missing()] * len(c)
    c["e2e_ratio"] = [Estimate.missing()] * len(c)
    for col in ("peak_ratio", "kv_ratio"):
        c[col] = math.nan
    for _, idx in c.groupby(["workload_id", "machine"]).groups.items():
        group = c.loc[idx]
        full = group[group["is_full"]]
        if full.empty:
            continue
        f = full.iloc[0]
        for i in idx:
            if c.at[i, "is_full"]:  # the reference itself: exactly 1, its own noise shows in its absolute interval
                c.at[i, "speed_ratio"] = c.at[i, "e2e_ratio"] = Estimate(1.0, 1.0, 1.0, int(c.at[i, "n"]))
            else:
                c.at[i, "speed_ratio"] = ratio_ci(c.at[i, "_s_decode_tps"], f["_s_decode_tps"])
                c.at[i, "e2e_ratio"] = ratio_ci(c.at[i, "_s_e2e_tps"], f["_s_e2e_tps"])
            c.at[i, "peak_ratio"] = c.at[i, "peak_memory_mib"] / f["peak_memory_mib"]
            c.at[i, "kv_ratio"] = c.at[i, "kv_cache_mib"] / f["kv_cache_mib"] if f["kv_cache_mib"] else math.nan
    for name in ("speed_ratio", "e2e_ratio"):
        c[f"{name}_med"] = [e.median for e in c[name]]
        c[f"{name}_lo"] = [e.lo for e in c[name]]
        c[f"{name}_hi"] = [e.hi for e in c[name]]


def methods_in(c: pd.DataFrame) -> list[str]:
    """The method labels of `c` in report order: full first, then the registry's order, decode policies after."""
    if c.empty:
        return []
    pairs = c.drop_duplicates("method")[["method_name", "decode", "method"]]
    return [lbl for *_, lbl in sorted(_method_order(m, d, lbl) for m, d, lbl in pairs.itertuples(index=False))]


# --- figures ------------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    id: str
    title: str
    caption: str
    pngs: list[str] = field(default_factory=list)  # base64
    missing: str | None = None  # why there is no figure
    note: str | None = None  # a visible caveat above the figure (e.g. data left out)
    methods: set[str] = field(default_factory=set)  # method labels drawn with data
    expected: set[str] = field(default_factory=set)  # method labels the store offers this figure

    @property
    def png(self) -> str | None:
        return self.pngs[0] if self.pngs else None


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _palette(c: pd.DataFrame) -> dict[str, tuple]:
    order = methods_in(c)
    colours = sns.color_palette("tab10", n_colors=max(10, len(order)))
    return dict(zip(order, colours[: len(order)], strict=True))


def _row_title(w: pd.DataFrame, many_hw: bool) -> str:
    r = w.iloc[0]
    return f"{r['model']} · {r['workload']}" + (f"\n{r['hardware']}" if many_hw else "")


def _errorbar(ax, m: pd.DataFrame, x: str, y: str, colour, label: str, marker: str = "o", xerr: bool = False):
    v = x if xerr else y
    err = np.vstack([m[f"{v}_med"] - m[f"{v}_lo"], m[f"{v}_hi"] - m[f"{v}_med"]]).clip(min=0)
    kw = {"xerr": np.nan_to_num(err)} if xerr else {"yerr": np.nan_to_num(err)}
    xs, ys = (m[f"{x}_med"], m[y]) if xerr else (m[x], m[f"{y}_med"])
    ax.errorbar(xs, ys, **kw, marker=marker, capsize=3, color=colour, label=label, linewidth=1.4, markersize=5)


def _full_line(ax, full: pd.DataFrame, y: str) -> bool:
    """The full cache as a dashed horizontal reference line with its interval shaded; True when drawn."""
    if full.empty or not np.isfinite(full.iloc[0][f"{y}_med"]):
        return False
    f = full.iloc[0]
    ax.axhline(f[f"{y}_med"], color="black", linestyle="--", linewidth=1.1, label="full cache")
    if np.isfinite(f[f"{y}_lo"]) and f[f"{y}_hi"] > f[f"{y}_lo"]:
        ax.axhspan(f[f"{y}_lo"], f[f"{y}_hi"], color="black", alpha=0.08, linewidth=0)
    return True


def _by_budget(c: pd.DataFrame, panels: Sequence[tuple[str, str]], title: str, fig_: Figure,
               scalar: bool = False) -> plt.Figure:
    """Rows: workloads (each with its own y axes); columns: `panels` (value, label); x: budget; one line per method
    with its interval as error bars; the full cache as a reference line."""
    workloads = list(dict.fromkeys(c["workload_id"]))
    many_hw = c["hardware"].nunique() > 1
    palette = _palette(c)
    fig, axes = plt.subplots(len(workloads), len(panels), figsize=(4.6 * len(panels) + 1.8, 3.3 * len(workloads)),
                             squeeze=False)
    for i, wid in enumerate(workloads):
        w = c[c["workload_id"] == wid]
        budgets = sorted(w.loc[~w["is_full"], "budget"].unique())
        for j, (y, ylabel) in enumerate(panels):
            ax = axes[i][j]
            col = y if scalar else f"{y}_med"
            drawn = _full_line(ax, w[w["is_full"]], y) if not scalar else False
            for method, m in w[~w["is_full"]].groupby("method", sort=False):
                m = m.dropna(subset=[col]).sort_values("budget")
                if m.empty:
                    continue
                if scalar:
                    ax.plot(m["budget"], m[y], marker="o", color=palette[method], label=method)
                else:
                    _errorbar(ax, m, "budget", y, palette[method], method)
                fig_.methods.add(method)
                drawn = True
            if drawn and not w[w["is_full"]].empty and np.isfinite(w[w["is_full"]].iloc[0][col]):
                fig_.methods.add(w[w["is_full"]].iloc[0]["method"])
            if not drawn:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#777")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets])
            if budgets:
                pad = 0.05 * max(budgets[-1] - budgets[0], 0.2)
                ax.set_xlim(budgets[0] - pad, budgets[-1] + pad)
            ax.set_xlabel("budget (kept fraction of the prompt cache)")
            ax.set_ylabel(ylabel)
            top = w[y if scalar else f"{y}_hi"].max()
            ax.set_ylim(0, float(top) * 1.12 if np.isfinite(top) and top > 0 else None)
            if j == 0:
                ax.set_title(_row_title(w, many_hw), fontsize=10, loc="left")
    _legend(fig, axes)
    fig.suptitle(title, fontsize=13, y=1.0)
    fig.tight_layout()
    return fig


def _legend(fig: plt.Figure, axes) -> None:
    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lbl, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.97),
                   frameon=False, title="method")


def _fig_speed(c: pd.DataFrame, f: Figure) -> plt.Figure:
    return _by_budget(
        c, [("decode_tps", "decode throughput (tokens/s)"), ("e2e_tps", "end-to-end throughput (tokens/s)"),
            ("ttft_ms", "time to first token (ms)")],
        f"Speed vs budget (median and {CONFIDENCE:.0%} interval over repetitions; dashed: full cache)", f,
    )


def _fig_energy(c: pd.DataFrame, f: Figure) -> plt.Figure:
    d = c[c["j_per_token_med"].notna()]
    return _by_budget(d, [("j_per_token", "energy per generated token (J)"), ("energy_j", "energy per call (J)")],
                      f"Energy vs budget (median and {CONFIDENCE:.0%} interval; dashed: full cache)", f)


def _fig_quality(c: pd.DataFrame, f: Figure) -> plt.Figure:
    return _by_budget(
        c, [("rouge_l", "ROUGE-L vs full-cache output"), ("token_agreement", "token agreement with full cache"),
            ("perplexity", "perplexity of the full-cache output")],
        "Quality vs budget (trained models only; the full cache scores 1.0 on the first two)", f, scalar=True,
    )


def _fig_memory(c: pd.DataFrame, f: Figure) -> plt.Figure:
    """Rows: (hardware, model, lengths); x: batch size (integer ticks); markers, so one batch size still shows."""
    low = c[c["is_full"] | (c["budget"] == c.groupby("method")["budget"].transform("min"))].copy()
    low["lengths"] = low["prompt_length"].astype(str) + "+" + low["new_tokens"].astype(str) + " tok"
    groups = list(dict.fromkeys(zip(low["hardware"], low["model"], low["lengths"], strict=True)))
    many_hw = low["hardware"].nunique() > 1
    palette = _palette(c)
    panels = [("peak_memory_mib", "peak memory (MiB)"),
              ("kv_cache_mib", "KV cache after generation (MiB)\nheld (filled), allocated (hollow)")]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11.0, 3.3 * len(groups)), squeeze=False)
    for i, (hw, model, lengths) in enumerate(groups):
        g = low[(low["hardware"] == hw) & (low["model"] == model) & (low["lengths"] == lengths)]
        batches = sorted(g["batch_size"].unique())
        for j, (y, ylabel) in enumerate(panels):
            ax = axes[i][j]
            for method, m in g.groupby("method", sort=False):
                m = m.dropna(subset=[y]).sort_values("batch_size")
                if m.empty:
                    continue
                at = "" if m["is_full"].iloc[0] else f" @ {m['budget'].iloc[0]:g}"
                ax.plot(m["batch_size"], m[y], marker="o", markersize=7, color=palette[method], label=method + at,
                        linestyle="--" if m["is_full"].iloc[0] else "-")
                allocated = m.dropna(subset=["kv_allocated_mib"]) if y == "kv_cache_mib" else m.iloc[:0]
                if not allocated.empty:  # hollow: the bytes allocated (planned decode slots included)
                    ax.plot(allocated["batch_size"], allocated["kv_allocated_mib"], marker="o", markersize=9,
                            markerfacecolor="none", linestyle=":", color=palette[method])
                f.methods.add(method)
            if len(batches) > 2 and batches[-1] / batches[0] > 8:
                ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(batches))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(b) for b in batches])
            if len(batches) == 1:
                ax.set_xlim(batches[0] - 1, batches[0] + 1)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size")
            source = g["peak_memory_source"].dropna().unique()
            ax.set_ylabel(ylabel if j or not len(source) else f"{ylabel}\n{', '.join(source)}")
            if j == 0:
                ax.set_title(f"{model} · {lengths}" + (f"\n{hw}" if many_hw else ""), fontsize=10, loc="left")
    handles: dict[str, object] = {}
    for ax in axes.ravel():
        for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lbl, h)
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.97), frameon=False,
               title="method @ its lowest budget")
    fig.suptitle("Memory vs batch size", fontsize=13, y=1.0)
    fig.tight_layout()
    return fig


MEMORY_AXES = {"peak_ratio": "peak memory", "kv_ratio": "KV cache"}


def memory_axis(w: pd.DataFrame) -> str:
    """The memory a workload's frontier is drawn against: peak memory on GPU (allocator peak: model, activations
    and cache), the KV cache's bytes on CPU, whose peak RSS is dominated by the interpreter and the model."""
    gpu = w["device"].astype(str).str.startswith("cuda").all()
    return "peak_ratio" if gpu and w["peak_ratio"].notna().any() else "kv_ratio"


def _fig_tradeoff(c: pd.DataFrame, f: Figure) -> plt.Figure:
    """Per workload: decode speed-up over the full cache against quality (trained models) and against peak memory;
    the Pareto frontier as a grey step line; budgets told apart by marker shape."""
    workloads = list(dict.fromkeys(c["workload_id"]))
    many_hw = c["hardware"].nunique() > 1
    palette = _palette(c)
    budgets = sorted(c.loc[~c["is_full"], "budget"].unique())
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets)}
    marker[1.0] = marker.get(1.0, "*")  # the full cache
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12.0, 3.8 * len(workloads)), squeeze=False)
    for i, wid in enumerate(workloads):
        w = c[c["workload_id"] == wid]
        quality = bool(w["quality_known"].iloc[0])
        memory = memory_axis(w)
        for j, (y, ylabel, sense) in enumerate([
            ("rouge_l", "ROUGE-L vs full cache\n(higher is better)", "max"),
            (memory, MEMORY_AXES[memory] + " / full cache's\n(lower is better)", "min"),
        ]):
            ax = axes[i][j]
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
            if y == "rouge_l" and not quality:
                ax.text(0.5, 0.5, "quality unknown: random weights\n(ranked by cost only)", ha="center",
                        va="center", transform=ax.transAxes, color="#777")
                ax.set_xlabel("decode throughput / full cache's")
                ax.set_yticks([])
                if j == 0:
                    ax.set_title(_row_title(w, many_hw), fontsize=10, loc="left")
                continue
            d = w.dropna(subset=["speed_ratio_med", y])
            if d.empty:
                ax.text(0.5, 0.5, "no full-cache cell here (it failed or was not run):\nno ratio to plot", ha="center",
                        va="center", transform=ax.transAxes, color="#777")
            front = d[decision.pareto(d, {"speed_ratio_med": "max", y: sense})].sort_values("speed_ratio_med")
            if len(front) > 1:
                ax.plot(front["speed_ratio_med"], front[y], color="#999", linewidth=6, alpha=0.45, zorder=0,
                        solid_capstyle="round")
            for (method, budget), m in d.groupby(["method", "budget"], sort=False):
                _errorbar(ax, m, "speed_ratio", y, palette[method], method, marker=marker[budget], xerr=True)
                f.methods.add(method)
            ax.set_xlabel("decode throughput / full cache's (interval: repetitions)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0, top=max(1.05, float(d[y].max()) * 1.05) if len(d) else 1.05)
            if j == 0:
                ax.set_title(_row_title(w, many_hw), fontsize=10, loc="left")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=col, marker="o", linestyle="-", label=m) for m, col in palette.items()]
    handles += [Line2D([], [], color="#444", marker=marker[b], linestyle="", label=f"budget {b:g}") for b in budgets]
    handles += [Line2D([], [], color="#999", linewidth=6, alpha=0.45, label="Pareto frontier"),
                Line2D([], [], color="black", linestyle="--", label="full cache's speed")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.97), frameon=False)
    fig.suptitle("Efficiency-quality and efficiency-memory trade-off (right and up / right and down is better)",
                 fontsize=13, y=1.0)
    fig.tight_layout()
    return fig


def _heads_differ(kept_per_head) -> bool:
    """Whether a row's [layer][kv_head] kept counts differ between the heads of some layer (per-head budgets)."""
    if not isinstance(kept_per_head, list | np.ndarray) or len(kept_per_head) == 0:
        return False
    return any(len(set(np.asarray(layer).tolist())) > 1 for layer in kept_per_head)


def _fig_kept(c: pd.DataFrame, f: Figure) -> list[plt.Figure]:
    """Per model: prompt entries kept per layer, every method and decode policy, at one workload (the longest
    prompt at the smallest batch on the first hardware); one line per KV head where the heads' counts differ."""
    d = c[c["kept_per_layer"].map(lambda k: k is not None and len(k) > 0)]
    out = []
    for model, m in d.groupby("model", sort=False):
        m = m[m["hardware"] == m["hardware"].iloc[0]]
        m = m[m["prompt_length"] == m["prompt_length"].max()]
        m = m[m["batch_size"] == m["batch_size"].min()]
        rows = {}
        for _, r in m.iterrows():
            label = f"{r['method']} @ {r['budget']:g}"
            if _heads_differ(r.get("kept_per_head")):
                for head, kept in enumerate(zip(*r["kept_per_head"], strict=True)):
                    rows[f"{label} · KV head {head}"] = np.asarray(kept, dtype=float) / r["prompt_length"]
            else:
                rows[label] = np.asarray(r["kept_per_layer"], dtype=float) / r["prompt_length"]
            f.methods.add(r["method"])
        matrix = pd.DataFrame(rows).T
        matrix.columns = [str(i) for i in range(matrix.shape[1])]
        fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * matrix.shape[1] + 4), 0.32 * len(matrix) + 1.8))
        sns.heatmap(matrix, annot=matrix.shape[1] <= 16, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax,
                    cbar_kws={"label": "kept fraction of the prompt"}, annot_kws={"fontsize": 7})
        ax.set_xlabel("layer")
        ax.set_ylabel("")
        r = m.iloc[0]
        ax.set_title(f"Prompt entries kept per layer: {model}, {r['workload']}, {r['hardware']}", fontsize=10)
        fig.tight_layout()
        out.append(fig)
    return out


def _fig_cross(c: pd.DataFrame, f: Figure) -> plt.Figure | None:
    """Decode speed-up over each machine's own full cache, for the cells run on more than one machine."""
    x = cross_cells(c)
    if x.empty:
        return None
    groups = list(dict.fromkeys(zip(x["model"], x["workload"], strict=True)))
    hardware = sorted(x["hardware"].unique())
    colours = dict(zip(hardware, sns.color_palette("Set2", n_colors=len(hardware)), strict=True))
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.4 * len(groups)), squeeze=False)
    for i, (model, wl) in enumerate(groups):
        ax = axes[i][0]
        g = x[(x["model"] == model) & (x["workload"] == wl) & ~x["is_full"]]
        cellsl = list(dict.fromkeys(g["label"]))
        width = 0.8 / len(hardware)
        for k, hw in enumerate(hardware):
            h = g[g["hardware"] == hw].set_index("label").reindex(cellsl)
            pos = np.arange(len(cellsl)) + (k - (len(hardware) - 1) / 2) * width
            err = np.vstack([h["speed_ratio_med"] - h["speed_ratio_lo"],
                             h["speed_ratio_hi"] - h["speed_ratio_med"]]).clip(min=0)
            ax.bar(pos, h["speed_ratio_med"], width, yerr=np.nan_to_num(err), capsize=2, color=colours[hw], label=hw)
            f.methods.update(h["method"].dropna())
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(cellsl)))
        ax.set_xticklabels(cellsl, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("decode throughput / own full cache")
        ax.set_title(f"{model} · {wl}", fontsize=10, loc="left")
    f.methods.update(x.loc[x["is_full"], "method"])
    handles, lbls = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, lbls, loc="upper left", bbox_to_anchor=(1.0, 0.97), frameon=False, title="hardware")
    fig.suptitle("The same cells on each machine: speed-up over that machine's full cache", fontsize=13, y=1.0)
    fig.tight_layout()
    return fig


def _make(fid: str, title: str, caption: str, data: pd.DataFrame, draw, missing: str | None = None,
          note: str | None = None) -> Figure:
    f = Figure(fid, title, caption, note=note, expected=set(methods_in(data)))
    if missing:
        f.missing = missing
        return f
    if data.empty:
        f.missing = "No data for this figure in the store."
        return f
    made = draw(data, f)
    made = [made] if isinstance(made, plt.Figure) else list(made or [])
    if not made:
        f.missing = "No data for this figure in the store."
    f.pngs = [_png(m) for m in made]
    return f


def _quality_missing(c: pd.DataFrame) -> str | None:
    if c["quality_known"].any():
        return None
    return ("Quality is not plotted: every model here has random weights (" + ", ".join(sorted(c["model"].unique()))
            + "), whose outputs are noise. Run a trained model (`embedded`) for quality.")


def figures(c: pd.DataFrame) -> list[Figure]:
    if c.empty:
        return [Figure("speed", "Speed vs budget", "", missing="No successful cell in the store.")]
    sns.set_theme(style="whitegrid", context="notebook")
    energy = c[c["j_per_token_med"].notna()]
    telemetry = "; ".join(sorted(c["telemetry_status"].dropna().astype(str).unique()))
    trained = c[c["quality_known"]]
    random = sorted(c.loc[~c["quality_known"], "model"].unique())
    dropped = (f"Random-weight models left out ({', '.join(random)}): their outputs are noise, so agreement with the "
               "full cache and perplexity measure nothing there." if random else None)
    return [
        _make("speed", "Speed vs budget",
              "Decode throughput counts the tokens of the decode loop only (batch x decode steps over their time: no "
              "prefill, scoring or compaction). End-to-end throughput is batch x new tokens over the whole generate "
              "call, prefill included - the figure the paper reports; it is the lower of the two. Time to first "
              "token is the prefill with scoring. Each axis row is one workload, with its own scale.", c, _fig_speed),
        _make("memory", "Memory vs batch size",
              "Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS, model and "
              "interpreter included (so compression barely moves it). KV cache: bytes held by all layers after "
              "generation (filled markers) and bytes allocated, planned decode slots included (hollow markers, "
              "dotted; per-head budgets allocate the sum of what the heads keep). Each method at its lowest budget in "
              "the store; the full cache dashed.", c, _fig_memory),
        _make("energy", "Energy per token", "Joules from NVML's total-energy counter over each timed call.", energy,
              _fig_energy, missing=None if not energy.empty else
              f"No energy data: energy comes from NVML, unavailable for these cells ({telemetry})."),
        _make("quality", "Quality vs budget",
              "ROUGE-L and token agreement of the generated tokens with the full cache's, and the perplexity of the "
              "full cache's continuation under the compressed cache (lower is better).", trained, _fig_quality,
              missing=_quality_missing(c),
              note=dropped if not trained.empty else None),
        _make("tradeoff", "Trade-off and Pareto frontier",
              "Each point is one cell (colour: method, shape: budget), with the interval of its speed-up over the "
              "repetitions. The thick grey line joins the Pareto frontier: the cells no other cell beats on both "
              "axes (by median). Left: speed against quality (trained models); right: speed against memory (peak "
              "memory on GPU; on CPU the KV cache's bytes, since the process's peak RSS is mostly the interpreter "
              "and the model).", c, _fig_tradeoff),
        _make("kept", "Per-layer kept counts",
              "Prompt entries each layer keeps after compaction, as a fraction of the prompt: PrefixKV sizes layers "
              "from their importance profile, the baselines keep the same fraction everywhere (or a pyramid). With "
              "per-head budgets (head_budgets=\"adaptive\") each KV head is its own line.", c,
              _fig_kept),
    ]


# --- tables -------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    columns: list[str]
    rows: list[list[tuple[str, str]]]  # (text, css class)


def _quality_cells(r: pd.Series) -> list[tuple[str, str]]:
    cls = "" if r["quality_known"] else "grey"
    fixed = [("-" if not math.isfinite(v) else f"{v:.2f}") for v in (r["rouge_l"], r["token_agreement"])]
    return [(fixed[0], cls), (fixed[1], cls), (num(r["perplexity"]), cls)]


def _floor(r: pd.Series) -> str:
    e = r["floor_ratio"]
    return ratio(e) if e.known else "-"


def decision_table(w: pd.DataFrame) -> Table:
    q = decision.pareto(w, {"speed_ratio_med": "max", "rouge_l": "max"}) if w["quality_known"].iloc[0] else None
    memory = memory_axis(w)
    m = decision.pareto(w, {"speed_ratio_med": "max", memory: "min"})
    columns = ["method", "budget", "reps", "decode tok/s", "x full (decode)", "x full (end-to-end)",
               "peak memory x full", "KV cache x full", "J/token", "step / byte floor", "ROUGE-L", "agreement",
               "perplexity", "on the frontier of speed and"]
    rows = []
    for i, r in w.iterrows():
        front = []
        if q is not None and q[i]:
            front.append("quality")
        if m[i]:
            front.append("peak memory" if memory == "peak_ratio" else "KV cache")
        rows.append([
            (r["method"], "l"), (f"{r['budget']:g}", ""), (str(r["n"]), ""), (est(r["decode_tps"]), ""),
            (ratio(r["speed_ratio"]), ""), (ratio(r["e2e_ratio"]), ""), (ratio(r["peak_ratio"]), ""),
            (ratio(r["kv_ratio"]), ""), (est(r["j_per_token"]), ""), (_floor(r), ""), *_quality_cells(r),
            (", ".join(front), "l"),
        ])
    # Columns with nothing measured here (energy and the byte floor on CPU) go: the notes above say why.
    keep = [j for j, col in enumerate(columns)
            if col not in ("J/token", "step / byte floor") or any(row[j][0] != "-" for row in rows)]
    return Table([columns[j] for j in keep], [[row[j] for j in keep] for row in rows])


SUMMARY = [
    ("hardware", "hardware"), ("model", "model"), ("workload", "workload"), ("method", "method"),
    ("budget", "budget"), ("n", "reps"), ("decode_tps", "decode tok/s"), ("speed_ratio", "x full (decode)"),
    ("e2e_tps", "end-to-end tok/s"), ("step_ms", "ms / decode step"), ("ttft_ms", "TTFT ms"),
    ("score_ms", "scoring ms"), ("compact_ms", "compaction ms"), ("peak_memory_mib", "peak MiB"),
    ("kv_cache_mib", "KV cache MiB"), ("j_per_token", "J/token"), ("floor_ratio", "step / byte floor"),
    ("copy_gbps", "copy GB/s"),
]


def summary_table(c: pd.DataFrame) -> Table:
    rows = []
    for _, r in c.iterrows():
        row = []
        for key, _ in SUMMARY:
            v = r[key]
            if key == "speed_ratio" or key == "floor_ratio":
                row.append((ratio(v) if v.known else "-", ""))
            elif isinstance(v, Estimate):
                row.append((est(v), ""))
            elif key == "budget":
                row.append((f"{v:g}", ""))
            elif isinstance(v, str):
                row.append((v, "l"))
            else:
                row.append((num(v), ""))
        rows.append(row + _quality_cells(r))
    return Table([h for _, h in SUMMARY] + ["ROUGE-L", "agreement", "perplexity"], rows)


def frame_table(frame: pd.DataFrame) -> Table:
    rows = []
    for _, r in frame.iterrows():
        rows.append([(num(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else
                      ("-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)), "l")
                     for v in r])
    return Table([str(c).replace("_", " ") for c in frame.columns], rows)


# --- decision and cross-hardware sections -------------------------------------------------------------------------


@dataclass
class Workload:
    id: str
    hardware: str
    model: str
    workload: str
    dtype: str
    quality_known: bool
    verdicts: list[decision.Verdict]
    slower: str | None
    floor_note: str | None
    table: Table


def _full_status(frame: pd.DataFrame, r: pd.Series) -> str | None:
    """Why the full cache of `r`'s workload has no successful cell on `r`'s machine (`oom`, ...), if it failed."""
    if frame.empty or "status" not in frame:
        return None
    f = frame[(frame["method"] == "full") & (frame["status"] != "ok") & (frame["model"] == r["model"])
              & (frame["batch_size"] == r["batch_size"]) & (frame["new_tokens"] == r["new_tokens"])
              & (frame["text_tokens"] == r["text_tokens"]) & (frame["device"] == r["device"])]
    if "env_machine_id" in f:
        f = f[f["env_machine_id"] == r["machine"]]
    return None if f.empty else str(f["status"].iloc[0])


def decisions(c: pd.DataFrame, frame: pd.DataFrame | None = None) -> list[Workload]:
    out = []
    for wid, w in c.groupby("workload_id", sort=False):
        r = w.iloc[0]
        if not w["is_full"].any() and frame is not None:
            w = w.assign(full_status=_full_status(frame, r))
        floor = None
        if not any(e.known for e in w["floor_ratio"]):
            floor = ("Decode step against the byte floor: not in this store (it needs a GPU run; the byte floor is "
                     "weights + KV bytes over the copy bandwidth measured in the same run).")
        out.append(Workload(
            id=str(wid), hardware=r["hardware"], model=r["model"], workload=r["workload"], dtype=str(r["dtype"]),
            quality_known=bool(r["quality_known"]), verdicts=decision.verdicts(w, bool(r["quality_known"])),
            slower=decision.slower_note(w), floor_note=floor, table=decision_table(w),
        ))
    return out


def cross_cells(c: pd.DataFrame) -> pd.DataFrame:
    """The cells (model, workload, method, budget) run on more than one hardware, one row per hardware."""
    if c.empty or c["hardware"].nunique() < 2:
        return c.iloc[0:0]
    ident = ["model", "workload", "method", "budget"]
    n = c.groupby(ident)["hardware"].transform("nunique")
    return c[n > 1]


@dataclass
class Cross:
    hardware: list[str]
    table: Table | None
    winners: Table
    note: str | None


def cross_section(c: pd.DataFrame) -> Cross | None:
    """Side by side when the store holds several machines: the same cells' absolute and relative speed on each, and
    the fastest cell of each workload on each machine."""
    if c.empty or c["hardware"].nunique() < 2:
        return None
    hardware = sorted(c["hardware"].unique())
    x = cross_cells(c)
    table, note = None, None
    if x.empty:
        note = ("No cell ran on more than one machine (workloads differ), so there is no like-for-like comparison; "
                "the fastest cell of each workload on each machine follows.")
    else:
        rows = []
        for (model, wl, method, budget), g in x.groupby(["model", "workload", "method", "budget"], sort=False):
            g = g.set_index("hardware")
            row = [(model, "l"), (wl, "l"), (method, "l"), (f"{budget:g}", "")]
            for hw in hardware:
                if hw in g.index:
                    h = g.loc[hw]
                    row += [(est(h["decode_tps"]), ""), (ratio(h["speed_ratio"]), ""), (_floor(h), "")]
                else:
                    row += [("not run", "grey")] * 3
            rows.append(row)
        cols = ["model", "workload", "method", "budget"]
        for hw in hardware:
            cols += [f"{hw}: decode tok/s", f"{hw}: x full", f"{hw}: step / floor"]
        table = Table(cols, rows)
    wrows = []
    for (model, wl), g in c.groupby(["model", "workload"], sort=False):
        row = [(model, "l"), (wl, "l")]
        for hw in hardware:
            h = g[(g["hardware"] == hw) & g["decode_tps_med"].notna()]
            if h.empty:
                row.append(("not run", "grey"))
                continue
            b = h.loc[h["decode_tps_med"].idxmax()]
            e = b["speed_ratio"]
            if not e.known:
                text = f"{b['label']}: {num(b['decode_tps_med'])} tok/s (no full cache to compare)"
            else:
                text = f"{b['label']}: {ratio(e)} the full cache"
                if b["is_full"] or (e.n > 1 and e.lo <= 1 <= e.hi):
                    text += " (within noise of the full cache)" if not b["is_full"] else ""
            row.append((text, "l"))
        wrows.append(row)
    winners = Table(["model", "workload", *[f"fastest on {hw}" for hw in hardware]], wrows)
    return Cross(hardware, table, winners, note)


# --- the matrix behind the store ------------------------------------------------------------------------------------


def planned(frame: pd.DataFrame) -> list[str]:
    """One sentence per (matrix, machine): how many cells the named matrix file expands to, how many of them the
    store holds, ok and failed. Matrices are looked up by name in bench/matrices; a store run from another file
    says so."""
    if frame.empty or "matrix" not in frame or "key" not in frame:
        return []
    from bench.matrix import MatrixError, load

    out = []
    for (name, machine), g in frame.groupby(["matrix", "env_machine"] if "env_machine" in frame else ["matrix"],
                                            dropna=False):
        status = g.groupby("key")["status"].first()
        ok, failed = int((status == "ok").sum()), int((status != "ok").sum())
        where = f" on {machine}" if isinstance(machine, str) else ""
        path = MATRICES / f"{name}.toml"
        try:
            keys = {cell.key for cell in load(path).cells()} if path.is_file() else None
        except MatrixError:
            keys = None
        if keys is None:
            out.append(f"matrix {name!r}{where}: {len(status)} cells in the store, {ok} ok, {failed} failed "
                       "(its file is not in bench/matrices, so the number planned is unknown)")
            continue
        held = set(status.index) & keys
        extra = len(set(status.index) - keys)
        text = (f"matrix {name!r}{where}: bench/matrices/{name}.toml has {len(keys)} cells; {len(held)} of them in "
                f"the store ({ok} ok, {failed} failed), {len(keys) - len(held)} not run")
        if extra:
            text += f"; {extra} more from command-line overrides"
        out.append(text)
    return out


# --- the page -----------------------------------------------------------------------------------------------------

ENV_COLUMNS = [
    "run_id", "matrix", "env_machine", "env_gpu_count", "env_driver", "env_cuda", "env_torch", "env_triton",
    "env_transformers", "env_python", "env_cpu", "env_cpu_count", "env_host", "env_git_commit", "env_date",
]


def _failures(frame: pd.DataFrame) -> Table | None:
    if frame.empty or "status" not in frame:
        return None
    failed = frame[frame["status"] != "ok"]
    if failed.empty:
        return None
    rows = []
    for _, r in failed.iterrows():
        text = int(r["text_tokens"]) if pd.notna(r.get("text_tokens")) else None
        prompt = labels.prompt_tokens(str(r["model"]), text) if text is not None else None
        rows.append([(str(r.get("model")), "l"), (str(r.get("device")), "l"),
                     (labels.workload(r["batch_size"], prompt, r["new_tokens"], text), "l"),
                     (labels.method(r["method"], None, r.get("method_kwargs")), "l"), (f"{r['budget']:g}", ""),
                     (str(r["status"]), "l"), (str(r.get("error") or ""), "l")])
    return Table(["model", "device", "workload", "method", "budget", "status", "error"], rows)


def write_report(results: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Render the stores under `results` into the HTML file `out`; return its path."""
    frame = store.load(*results)
    c = cells(frame)
    figs = figures(c)
    published, measured = paper.comparison(frame)
    env_cols = [k for k in ENV_COLUMNS if k in frame]
    env = frame[env_cols].drop_duplicates("run_id") if "run_id" in frame else frame.iloc[0:0]
    n_failed = int((frame.groupby("key")["status"].first() != "ok").sum()) if "key" in frame else 0
    template = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    page = template.get_template("report.html.j2").render(
        title=title or f"KV-cache benchmark: {', '.join(Path(r).name for r in results)}",
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        n_rows=len(frame), n_cells=len(c), n_failed=n_failed, planned=planned(frame),
        hardware=sorted(c["hardware"].unique()) if not c.empty else [],
        confidence=f"{CONFIDENCE:.0%}", tolerances=decision.TOLERANCES,
        decisions=decisions(c, frame) if not c.empty else [],
        cross=cross_section(c),
        cross_figure=_make("cross", "Speed-up on each machine", "", c, _fig_cross) if c.get("hardware") is not None
        and c["hardware"].nunique() > 1 else None,
        figures=figs,
        summary=summary_table(c) if not c.empty else None,
        failures=_failures(frame),
        environment=frame_table(env) if len(env) else None,
        paper_source=paper.SOURCE,
        paper_published=frame_table(paper.published_display()),
        paper_measured=frame_table(paper.display(measured)) if len(measured) else None,
        paper_sentence=paper.sentence(measured),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out

