"""Figures against the budget: one row of axes per workload (each with its own scales), one column per quantity, one
line per method with its interval, the full cache as a dashed reference line - speed, energy, quality, memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report.drawing import Figure, errorbar, full_line, legend, palette, plt, row_title, with_margins
from bench.uncertainty import CONFIDENCE


@dataclass(frozen=True)
class Panel:
    """One column of axes: the value plotted, its y label (or a function of the workload's cells giving it), and the
    (low, high) columns of its interval."""

    column: str
    label: str | Callable[[pd.DataFrame], str]
    interval: tuple[str, str] | None = None


def estimate_panel(name: str, label: str) -> Panel:
    """A panel of an `Estimate` column of the cells frame (its `_med`, `_lo` and `_hi` floats)."""
    return Panel(f"{name}_med", label, (f"{name}_lo", f"{name}_hi"))


def by_budget(cells: pd.DataFrame, panels: Sequence[Panel], title: str, figure: Figure) -> plt.Figure:
    workloads = list(dict.fromkeys(cells["workload_id"]))
    many_machines = cells["hardware"].nunique() > 1
    colours = palette(cells)
    drawing, axes = plt.subplots(len(workloads), len(panels), squeeze=False,
                                 figsize=(4.3 * len(panels) + 1.8, 3.3 * len(workloads)))
    for i, workload_id in enumerate(workloads):
        workload = cells[cells["workload_id"] == workload_id]
        full = workload[workload["is_full"]]
        budgets = sorted(workload.loc[~workload["is_full"], "budget"].unique())
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            drawn = full_line(ax, full, panel.column, panel.interval)
            if drawn:
                figure.methods.add(full.iloc[0]["method"])
                figure.cells.add((full.iloc[0]["model"], full.iloc[0]["label"]))
            methods = list(dict.fromkeys(workload.loc[~workload["is_full"], "method"]))
            # Methods at one budget often measure alike (memory above all): each is shifted a little sideways, so
            # that none hides another.
            dodge = 0.012 * (max(budgets) - min(budgets) if len(budgets) > 1 else 0.2)
            for method, points in workload[~workload["is_full"]].groupby("method", sort=False):
                points = points.dropna(subset=[panel.column]).sort_values("budget")
                if points.empty:
                    continue
                shift = (methods.index(method) - (len(methods) - 1) / 2) * dodge
                errorbar(ax, points.assign(budget=points["budget"] + shift), "budget", panel.column, colours[method],
                         method, interval=panel.interval)
                figure.methods.add(method)
                figure.cells.update(zip(points["model"], points["label"], strict=True))
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#777")
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:g}" for b in budgets])
            ax.set_xlabel("budget (kept fraction of the prompt cache)")
            ax.set_ylabel(panel.label(workload) if callable(panel.label) else panel.label)
            top = workload[panel.interval[1]] if panel.interval else workload[panel.column]
            with_margins(ax, np.concatenate([workload[panel.column].to_numpy(float), top.to_numpy(float)]))
            if j == 0:
                ax.set_title(row_title(workload, many_machines), fontsize=10, loc="left")
    legend(drawing, axes)
    drawing.suptitle(title, fontsize=13, y=1.0)
    drawing.tight_layout()
    return drawing


def speed(cells: pd.DataFrame, figure: Figure) -> plt.Figure:
    return by_budget(cells, [
        estimate_panel("decode_tps", "decode throughput (tokens/s)\nbatch / median step"),
        estimate_panel("speed_ratio", "decode speed over the full cache's\n(paired where measured)"),
        estimate_panel("e2e_tps", "end-to-end throughput (tokens/s)\ntotal time per call"),
        estimate_panel("ttft_ms", "time to first token (ms)"),
    ], f"Speed vs budget (median and {CONFIDENCE:.0%} interval; dashed: full cache)", figure)


def energy(cells: pd.DataFrame, figure: Figure) -> plt.Figure:
    return by_budget(cells[cells["j_per_token_med"].notna()], [
        estimate_panel("j_per_token", "energy per generated token (J)"),
        estimate_panel("energy_j", "energy per call (J)"),
    ], f"Energy vs budget (median and {CONFIDENCE:.0%} interval; dashed: full cache)", figure)


def _loss_label(workload: pd.DataFrame) -> str:
    units = sorted(set(workload["quality_unit"].dropna().astype(str)))
    return f"quality loss vs full cache\n({', '.join(units)}; lower is better)"


def quality(cells: pd.DataFrame, figure: Figure) -> plt.Figure:
    return by_budget(cells, [
        Panel("quality_loss", _loss_label, ("quality_loss_lo", "quality_loss_hi")),
        Panel("rouge_l", "ROUGE-L vs full-cache output"),
        Panel("perplexity", "perplexity of the full-cache output"),
    ], f"Quality vs budget (trained models; quality-engine losses with their {CONFIDENCE:.0%} interval)", figure)


def _peak_label(workload: pd.DataFrame) -> str:
    source = workload["peak_memory_source"].dropna().unique()
    return "peak memory (MiB)" + (f"\n{', '.join(source)}" if len(source) else "")


def memory(cells: pd.DataFrame, figure: Figure) -> plt.Figure:
    panels = [Panel("peak_memory_mib", _peak_label), Panel("kv_cache_mib", "KV cache held after generation (MiB)")]
    if cells["kv_capacity_mib"].notna().any():
        panels.append(Panel("kv_capacity_mib", "KV cache allocated (MiB)\ndecode slots included"))
    return by_budget(cells, panels, "Memory vs budget (every cell; one row per workload; dashed: full cache)", figure)
