"""Figures of what a method trades: speed against quality and memory (with the Pareto frontier), the per-layer kept
counts, and the same cells' speed-ups on several machines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from bench import decision
from bench.report.drawing import Figure, budget_markers, errorbar, palette, plt, row_title, with_margins
from bench.report.machines import cross_cells

SPEED_INTERVAL = ("speed_ratio_lo", "speed_ratio_hi")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")


def tradeoff(cells: pd.DataFrame, figure: Figure) -> plt.Figure:
    """Per workload: decode speed over the full cache's against quality loss (trained models) and against memory;
    the Pareto frontier as a thick grey line; budgets told apart by marker shape."""
    workloads = list(dict.fromkeys(cells["workload_id"]))
    many_machines = cells["hardware"].nunique() > 1
    colours, markers = palette(cells), budget_markers(cells)
    drawing, axes = plt.subplots(len(workloads), 2, figsize=(12.0, 3.8 * len(workloads)), squeeze=False)
    for i, workload_id in enumerate(workloads):
        workload = cells[cells["workload_id"] == workload_id]
        axis = decision.memory_axis(workload)
        unit = str(workload["quality_unit"].iloc[0])
        for j, (y, ylabel) in enumerate([
            ("quality_loss", f"quality loss ({unit})\n(lower is better)"),
            (axis, decision.MEMORY_AXES[axis] + " / full cache's\n(lower is better)"),
        ]):
            ax = axes[i][j]
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
            ax.set_xlabel("decode throughput / full cache's (interval: repetitions and steps)")
            if j == 0:
                ax.set_title(row_title(workload, many_machines), fontsize=10, loc="left")
            if y == "quality_loss" and not workload["quality_known"].iloc[0]:
                _note(ax, "quality unknown: random weights\n(ranked by cost only)")
                ax.set_yticks([])
                continue
            points = workload.dropna(subset=["speed_ratio_med", y])
            if points.empty:
                _note(ax, "no full-cache cell here (it failed or was not run):\nno ratio to plot")
                continue
            front = points[decision.pareto(points, {"speed_ratio_med": "max", y: "min"})]
            front = front.sort_values("speed_ratio_med")
            if len(front) > 1:
                ax.plot(front["speed_ratio_med"], front[y], color="#999", linewidth=6, alpha=0.45, zorder=0,
                        solid_capstyle="round")
            for (method, budget), point in points.groupby(["method", "budget"], sort=False):
                errorbar(ax, point, "speed_ratio_med", y, colours[method], method, marker=markers[budget],
                         interval=SPEED_INTERVAL, horizontal=True)
                figure.methods.add(method)
                figure.cells.update(zip(point["model"], point["label"], strict=True))
            ax.set_ylabel(ylabel)
            with_margins(ax, points[y])
    handles = [Line2D([], [], color=colour, marker="o", linestyle="-", label=m) for m, colour in colours.items()]
    handles += [Line2D([], [], color="#444", marker=markers[b], linestyle="", label=f"budget {b:g}")
                for b in sorted(markers) if b != 1.0]
    handles += [Line2D([], [], color="#999", linewidth=6, alpha=0.45, label="Pareto frontier"),
                Line2D([], [], color="black", linestyle="--", label="full cache's speed")]
    drawing.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.97), frameon=False)
    drawing.suptitle("Speed against quality loss and memory (right and down is better)", fontsize=13, y=1.0)
    drawing.tight_layout()
    return drawing


def _heads_differ(kept_per_head) -> bool:
    """Whether a row's [layer][kv_head] kept counts differ between the heads of some layer (per-head budgets)."""
    if not isinstance(kept_per_head, list | np.ndarray) or len(kept_per_head) == 0:
        return False
    return any(len(set(np.asarray(layer).tolist())) > 1 for layer in kept_per_head)


def kept(cells: pd.DataFrame, figure: Figure) -> list[plt.Figure]:
    """Per model: prompt entries kept per layer, every method and decode policy, at one workload (the longest
    prompt at the smallest batch on the first machine); one line per KV head where the heads' counts differ."""
    with_counts = cells[cells["kept_per_layer"].map(lambda counts: counts is not None and len(counts) > 0)]
    out = []
    for model, rows in with_counts.groupby("model", sort=False):
        rows = rows[rows["hardware"] == rows["hardware"].iloc[0]]
        rows = rows[rows["prompt_length"] == rows["prompt_length"].max()]
        rows = rows[rows["batch_size"] == rows["batch_size"].min()]
        fractions = {}
        for _, row in rows.iterrows():
            label = f"{row['method']} @ {row['budget']:g}"
            if _heads_differ(row.get("kept_per_head")):
                for head, counts in enumerate(zip(*row["kept_per_head"], strict=True)):
                    fractions[f"{label} · KV head {head}"] = np.asarray(counts, dtype=float) / row["prompt_length"]
            else:
                fractions[label] = np.asarray(row["kept_per_layer"], dtype=float) / row["prompt_length"]
            figure.methods.add(row["method"])
            figure.cells.add((model, row["label"]))
        matrix = pd.DataFrame(fractions).T
        matrix.columns = [str(i) for i in range(matrix.shape[1])]
        drawing, ax = plt.subplots(figsize=(max(6.5, 0.5 * matrix.shape[1] + 4), 0.32 * len(matrix) + 1.8))
        sns.heatmap(matrix, annot=matrix.shape[1] <= 16, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax,
                    cbar_kws={"label": "kept fraction of the prompt"}, annot_kws={"fontsize": 7})
        ax.set_xlabel("layer")
        ax.set_ylabel("")
        ax.tick_params(axis="y", labelrotation=0)  # seaborn turns the labels of a short heatmap upright: they overlap
        first = rows.iloc[0]
        ax.set_title(f"Prompt entries kept per layer: {model}, {first['workload']}, {first['hardware']}", fontsize=10)
        drawing.tight_layout()
        out.append(drawing)
    return out


def cross(cells: pd.DataFrame, figure: Figure) -> plt.Figure | None:
    """Decode speed-up over each machine's own full cache, for the cells run on more than one machine."""
    shared = cross_cells(cells)
    if shared.empty:
        return None
    groups = list(dict.fromkeys(zip(shared["model"], shared["workload"], strict=True)))
    machines = sorted(shared["hardware"].unique())
    colours = dict(zip(machines, sns.color_palette("Set2", n_colors=len(machines)), strict=True))
    drawing, axes = plt.subplots(len(groups), 1, figsize=(12, 3.4 * len(groups)), squeeze=False)
    for i, (model, workload) in enumerate(groups):
        ax = axes[i][0]
        group = shared[(shared["model"] == model) & (shared["workload"] == workload) & ~shared["is_full"]]
        labels = list(dict.fromkeys(group["label"]))
        width = 0.8 / len(machines)
        for k, machine in enumerate(machines):
            bars = group[group["hardware"] == machine].set_index("label").reindex(labels)
            positions = np.arange(len(labels)) + (k - (len(machines) - 1) / 2) * width
            error = np.vstack([bars["speed_ratio_med"] - bars["speed_ratio_lo"],
                               bars["speed_ratio_hi"] - bars["speed_ratio_med"]]).clip(min=0)
            ax.bar(positions, bars["speed_ratio_med"], width, yerr=np.nan_to_num(error), capsize=2,
                   color=colours[machine], label=machine)
            figure.methods.update(bars["method"].dropna())
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("decode throughput / own full cache")
        ax.set_title(f"{model} · {workload}", fontsize=10, loc="left")
    figure.methods.update(shared.loc[shared["is_full"], "method"])
    handles, names = axes[0][0].get_legend_handles_labels()
    drawing.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.97), frameon=False, title="hardware")
    drawing.suptitle("The same cells on each machine: speed-up over that machine's full cache", fontsize=13, y=1.0)
    drawing.tight_layout()
    return drawing
