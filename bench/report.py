"""The HTML report: one self-contained file (figures embedded as base64 PNG) answering "which method, at which
budget, on which hardware, at what batch size and length, costs what time, memory and energy, and keeps what
quality". Figures facet by hardware, so stores merged from several GPUs show them side by side.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from bench import paper, store  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
MIB = 2**20
#: Methods whose per-layer sizes the heatmap contrasts: PrefixKV's adaptive allocation vs fixed allocations.
HEATMAP_METHODS = ("prefixkv", "uniform", "pyramidkv", "snapkv", "h2o", "streaming_llm")


@dataclass
class Figure:
    id: str
    title: str
    caption: str
    png: str | None = None  # base64
    missing: str | None = None  # why there is no figure


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, machine) of the successful rows: medians over repetitions, decode steps pooled."""
    ok = frame[frame["status"] == "ok"].copy()
    if ok.empty:
        return ok
    ok["hardware"] = np.where(
        ok["device"].astype(str).str.startswith("cuda"),
        ok["device_name"].fillna(ok["env_gpu"]).astype(str),
        "CPU: " + ok["env_cpu"].astype(str),
    )
    group = ["key", "env_machine_id"]
    numeric = ["tokens_per_s", "decode_tokens_per_s", "prefill_s", "ttft_s", "score_s", "compact_s", "total_s",
               "energy_j", "j_per_token"]
    # All-null columns (energy on CPU) come back as objects; medians need numbers (NaN where unmeasured).
    ok[numeric] = ok[numeric].apply(pd.to_numeric, errors="coerce")
    first = ok.groupby(group, sort=False).first()
    medians = ok.groupby(group, sort=False)[numeric].median()
    steps = ok.groupby(group, sort=False)["decode_steps_s"].apply(
        lambda s: float(np.median(np.concatenate([np.asarray(x, dtype=float) for x in s]))) if len(s) else np.nan
    )
    out = first.drop(columns=medians.columns).join(medians)
    out["decode_ms_per_step"] = steps * 1e3
    out["prefill_ms"] = out["prefill_s"] * 1e3
    out["ttft_ms"] = out["ttft_s"] * 1e3
    out["peak_memory_mib"] = out["peak_memory_bytes"] / MIB
    out["kv_cache_mib"] = out["kv_bytes_total"] / MIB
    out["shape"] = (
        "b" + out["batch_size"].astype(str) + " · " + out["prompt_length"].astype(str) + "+"
        + out["new_tokens"].astype(str) + " tok"
    )
    # A method under a decode policy other than `grow` is its own line in every figure: "prefixkv / score".
    out["decode"] = out["decode"].fillna("grow") if "decode" in out else "grow"
    out["method_name"] = out["method"]
    out["method"] = np.where(out["decode"] == "grow", out["method"], out["method"] + " / " + out["decode"])
    return out.reset_index()


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _grid(n: int, ncols: int, w: float = 5.0, h: float = 3.6):
    nrows = max(1, (n + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    return fig, axes


def _facet(data: pd.DataFrame, panels: Sequence[tuple[str, str]], x: str, xlabel: str, title: str,
           style: str | None = "shape", log_x: bool = False) -> plt.Figure:
    """Rows: hardware; columns: `panels` (y column, y label); lines: method (colour) x `style`."""
    hardware = sorted(data["hardware"].unique())
    fig, axes = plt.subplots(len(hardware), len(panels), figsize=(5.2 * len(panels), 3.8 * len(hardware)),
                             squeeze=False)
    order = sorted(data["method"].unique())
    for i, hw in enumerate(hardware):
        sub = data[data["hardware"] == hw]
        for j, (y, ylabel) in enumerate(panels):
            ax = axes[i][j]
            d = sub.dropna(subset=[y])
            if d.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            else:
                sns.lineplot(data=d, x=x, y=y, hue="method", hue_order=order, style=style if style else None,
                             markers=True, dashes=False, ax=ax, legend=(i == 0 and j == len(panels) - 1))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel.split(' (')[0]} - {hw}" if len(hardware) > 1 else ylabel.split(" (")[0])
            if log_x:
                ax.set_xscale("log", base=2)
    for ax in axes.flat:
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(title, fontsize=13, y=1.02)
    fig.tight_layout()
    return fig


def _fig_speed(c: pd.DataFrame) -> plt.Figure:
    return _facet(
        c, [("decode_tokens_per_s", "decode throughput (tokens/s)"), ("decode_ms_per_step", "decode latency (ms/step)"),
            ("ttft_ms", "time to first token (ms)")],
        x="budget", xlabel="budget (kept fraction of the prompt cache)",
        title="Speed vs budget (full cache at budget 1.0; median over repetitions)",
    )


def _fig_memory(c: pd.DataFrame) -> plt.Figure:
    d = _lowest_budget(c)
    source = d["peak_memory_source"].dropna().unique()
    return _facet(
        d, [("peak_memory_mib", f"peak memory (MiB; {', '.join(source)})"),
            ("kv_cache_mib", "KV cache after generation (MiB)")],
        x="batch_size", xlabel="batch size", style=None, log_x=d["batch_size"].nunique() > 2,
        title="Memory vs batch size (each method at its lowest budget in the store)",
    )


def _fig_energy(c: pd.DataFrame) -> plt.Figure:
    return _facet(
        c, [("j_per_token", "energy per generated token (J/token)"), ("energy_j", "energy per generate call (J)")],
        x="budget", xlabel="budget", title="Energy (NVML total-energy counter over each timed call)",
    )


def _fig_quality(c: pd.DataFrame) -> plt.Figure:
    return _facet(
        c, [("token_agreement", "token agreement with full cache (fraction)"),
            ("rouge_l", "ROUGE-L vs full-cache output (F1)"),
            ("perplexity", "perplexity of the full-cache continuation")],
        x="budget", xlabel="budget", title="Quality vs budget (1.0 = identical to the full cache)",
    )


def _fig_tradeoff(c: pd.DataFrame) -> plt.Figure:
    hardware = sorted(c["hardware"].unique())
    shapes = sorted(c["shape"].unique())
    fig, axes = plt.subplots(len(hardware), len(shapes), figsize=(5.4 * len(shapes), 4.0 * len(hardware)),
                             squeeze=False)
    order = sorted(c["method"].unique())
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for i, hw in enumerate(hardware):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            d = c[(c["hardware"] == hw) & (c["shape"] == shape)].sort_values("budget")
            for method, m in d.groupby("method"):
                ax.plot(m["decode_tokens_per_s"], m["rouge_l"], marker="o", color=palette[method], label=method)
                for _, r in m.iterrows():
                    ax.annotate(f"{r['budget']:g}", (r["decode_tokens_per_s"], r["rouge_l"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("decode throughput (tokens/s)")
            ax.set_ylabel("ROUGE-L vs full cache")
            ax.set_title(f"{shape}" + (f" - {hw}" if len(hardware) > 1 else ""))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, title="method")
    fig.suptitle("Efficiency-quality trade-off (labels: budget; up and right is better)", fontsize=13, y=1.02)
    fig.tight_layout()
    return fig


def _fig_kept(c: pd.DataFrame) -> plt.Figure | None:
    d = c[c["method_name"].isin(HEATMAP_METHODS) & (c["decode"] == "grow")]
    if d.empty:
        return None
    # One workload: the longest prompt at the smallest batch, on the first hardware.
    d = d[d["hardware"] == sorted(d["hardware"].unique())[0]]
    d = d[d["prompt_length"] == d["prompt_length"].max()]
    d = d[d["batch_size"] == d["batch_size"].min()]
    d = d.sort_values(["method", "budget"])
    rows = {f"{r['method']} @ {r['budget']:g}": np.asarray(r["kept_per_layer"], dtype=float) / r["prompt_length"]
            for _, r in d.iterrows()}
    matrix = pd.DataFrame(rows).T
    matrix.columns = [str(i) for i in range(matrix.shape[1])]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * matrix.shape[1] + 3), 0.45 * len(matrix) + 2.4))
    sns.heatmap(matrix, annot=matrix.shape[1] <= 16, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax,
                cbar_kws={"label": "kept fraction of the prompt"}, annot_kws={"fontsize": 7})
    ax.set_xlabel("layer")
    ax.set_ylabel("method @ budget")
    r = d.iloc[0]
    ax.set_title(f"Prompt entries kept per layer ({r['model']}, {r['shape']}, {r['hardware']})")
    fig.tight_layout()
    return fig


def _lowest_budget(c: pd.DataFrame) -> pd.DataFrame:
    low = c.groupby("method")["budget"].transform("min")
    return c[c["budget"] == low]


def _figure(fid: str, title: str, caption: str, make: Callable[[], plt.Figure | None], missing: str | None) -> Figure:
    if missing:
        return Figure(fid, title, caption, missing=missing)
    fig = make()
    if fig is None:
        return Figure(fid, title, caption, missing="no data for this figure in the store")
    return Figure(fid, title, caption, png=_png(fig))


def figures(c: pd.DataFrame) -> list[Figure]:
    none = "no successful cell in the store" if c.empty else None
    has_energy = not c.empty and c["j_per_token"].notna().any()
    energy_missing = none or (None if has_energy else (
        "No energy data: energy comes from NVML, unavailable for these cells ("
        + "; ".join(sorted(c["telemetry_status"].dropna().astype(str).unique())) + ")."
    ))
    sns.set_theme(style="whitegrid", context="notebook")
    return [
        _figure("speed", "Throughput and latency vs budget",
                "Decode tokens/s (all sequences of the batch), median ms per decode step, and time to first token "
                "(prefill, scoring included).", lambda: _fig_speed(c), none),
        _figure("memory", "Memory vs batch size",
                "Peak memory: torch.cuda.max_memory_allocated on GPU, the process's peak RSS on CPU (model "
                "included). KV cache: bytes held by all layers after generation.", lambda: _fig_memory(c), none),
        _figure("energy", "Energy per token", "Joules from NVML's total-energy counter, per generated token.",
                lambda: _fig_energy(c), energy_missing),
        _figure("quality", "Quality vs budget",
                "Agreement and ROUGE-L of the generated tokens with the full cache's; perplexity of the full "
                "cache's continuation under the compressed cache (lower is better).", lambda: _fig_quality(c), none),
        _figure("tradeoff", "Efficiency-quality trade-off",
                "Each point is one budget; a method dominates where its curve lies up and to the right.",
                lambda: _fig_tradeoff(c), none),
        _figure("kept", "Per-layer kept counts",
                "PrefixKV sizes each layer from its importance profile; the baselines keep the same fraction in "
                "every layer (or a fixed pyramid).", lambda: _fig_kept(c), none),
    ]


SUMMARY_COLUMNS = {
    "hardware": "hardware", "model": "model", "shape": "workload", "method": "method", "budget": "budget",
    "decode_tokens_per_s": "decode tok/s", "decode_ms_per_step": "ms/step", "ttft_ms": "TTFT ms",
    "score_s": "score s", "compact_s": "compact s", "peak_memory_mib": "peak MiB", "kv_cache_mib": "KV MiB",
    "j_per_token": "J/token", "token_agreement": "agreement", "rouge_l": "ROUGE-L", "perplexity": "perplexity",
}
ENV_COLUMNS = [
    "run_id", "matrix", "env_machine", "env_gpu_count", "env_driver", "env_cuda", "env_torch", "env_triton",
    "env_transformers", "env_python", "env_cpu", "env_cpu_count", "env_host", "env_git_commit", "env_date",
]


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, classes="data", border=0, na_rep="-", float_format=lambda v: f"{v:,.4g}")


def write_report(results: Sequence[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Render the stores under `results` into the HTML file `out`; return its path."""
    frame = store.load(*results)
    if frame.empty:
        frame = pd.DataFrame(columns=["status"])
    c = cells(frame)
    figs = figures(c)
    published, measured = paper.comparison(frame)
    summary = c[[k for k in SUMMARY_COLUMNS if k in c]].rename(columns=SUMMARY_COLUMNS) if not c.empty else c
    if not summary.empty:
        summary = summary.sort_values(["hardware", "model", "workload", "method", "budget"])
    failed = frame[frame["status"] != "ok"] if "status" in frame else frame.iloc[0:0]
    fail_cols = [k for k in ("model", "device", "batch_size", "text_tokens", "new_tokens", "method", "budget",
                             "status", "error") if k in failed]
    env_cols = [k for k in ENV_COLUMNS if k in frame]
    env = frame[env_cols].drop_duplicates("run_id") if "run_id" in frame else frame.iloc[0:0]
    template = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    page = template.get_template("report.html.j2").render(
        title=title or f"KV-cache benchmark: {', '.join(html.escape(Path(r).name) for r in results)}",
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        n_rows=len(frame), n_cells=len(c), n_failed=len(failed),
        hardware=sorted(c["hardware"].unique()) if not c.empty else [],
        figures=figs,
        summary=_table(summary) if not summary.empty else None,
        failures=_table(failed[fail_cols]) if len(failed) else None,
        environment=_table(env) if len(env) else None,
        paper_source=paper.SOURCE,
        paper_published=_table(published),
        paper_measured=_table(measured) if len(measured) else None,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
