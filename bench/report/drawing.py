"""What every figure of the report shares: the `Figure` record the page renders, PNG encoding, the method palette,
error bars, the full cache's reference line, axes with margins and one legend per figure."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.report.cells import methods_in  # noqa: E402

#: Budget markers: budgets are told apart by shape, so no text label can overlap.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


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
    cells: set[tuple[str, str]] = field(default_factory=set)  # (model, method@budget) of every cell drawn

    @property
    def png(self) -> str | None:
        return self.pngs[0] if self.pngs else None


def encode(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def save_png(figure: plt.Figure, path) -> None:
    """Write `figure` to `path` as a PNG, atomically (a temporary name, then a rename), and close it."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    os.replace(tmp, path)


def palette(cells: pd.DataFrame) -> dict[str, tuple]:
    order = methods_in(cells)
    colours = sns.color_palette("tab10", n_colors=max(10, len(order)))
    return dict(zip(order, colours[: len(order)], strict=True))


def budget_markers(cells: pd.DataFrame) -> dict[float, str]:
    budgets = sorted(cells.loc[~cells["is_full"], "budget"].unique())
    markers = {budget: MARKERS[i % len(MARKERS)] for i, budget in enumerate(budgets)}
    markers.setdefault(1.0, "*")  # the full cache
    return markers


def row_title(workload: pd.DataFrame, many_machines: bool) -> str:
    first = workload.iloc[0]
    return f"{first['model']} · {first['workload']}" + (f"\n{first['hardware']}" if many_machines else "")


def errorbar(ax, points: pd.DataFrame, x: str, y: str, colour, label: str, *, marker: str = "o",
             interval: tuple[str, str] | None = None, horizontal: bool = False) -> None:
    """Points with their interval: `interval` names the (low, high) columns of the value on the interval's axis
    (x when `horizontal`); without one, no bar."""
    value = points[x if horizontal else y]
    if interval is None:
        error = np.zeros((2, len(points)))
    else:
        error = np.vstack([value - points[interval[0]], points[interval[1]] - value]).clip(min=0)
    bars = {"xerr" if horizontal else "yerr": np.nan_to_num(error)}
    ax.errorbar(points[x], points[y], **bars, marker=marker, capsize=3, color=colour, label=label, linewidth=1.4,
                markersize=5)


def full_line(ax, full: pd.DataFrame, y: str, interval: tuple[str, str] | None) -> bool:
    """The full cache as a dashed horizontal reference line with its interval shaded; True when drawn."""
    if full.empty or not np.isfinite(full.iloc[0][y]):
        return False
    first = full.iloc[0]
    ax.axhline(first[y], color="black", linestyle="--", linewidth=1.1, label="full cache")
    if interval is not None and np.isfinite(first[interval[0]]) and first[interval[1]] > first[interval[0]]:
        ax.axhspan(first[interval[0]], first[interval[1]], color="black", alpha=0.08, linewidth=0)
    return True


def with_margins(ax, ys: pd.Series | np.ndarray, *, from_zero: bool = True) -> None:
    """Room around the data on both axes, so that no point sits on the frame: x padded by a tenth of its range,
    y from 0 (or the data) to 12% above its highest value."""
    ax.margins(x=0.1)
    values = np.asarray(ys, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    top = float(values.max())
    if from_zero:
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    else:
        low = float(values.min())
        pad = 0.12 * (top - low) if top > low else 0.12 * abs(top) or 0.1
        ax.set_ylim(low - pad, top + pad)


def legend(figure: plt.Figure, axes, title: str | None = "method") -> None:
    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.97),
                      frameon=False, title=title)


def make(figure_id: str, title: str, caption: str, data: pd.DataFrame,
         draw: Callable[[pd.DataFrame, Figure], plt.Figure | list[plt.Figure] | None], missing: str | None = None,
         note: str | None = None) -> Figure:
    """A `Figure` drawn by `draw(data, figure)` (which records what it drew), or saying why there is none."""
    figure = Figure(figure_id, title, caption, note=note, expected=set(methods_in(data)))
    if missing:
        figure.missing = missing
        return figure
    if data.empty:
        figure.missing = "No data for this figure in the store."
        return figure
    made = draw(data, figure)
    made = [made] if isinstance(made, plt.Figure) else list(made or [])
    if not made:
        figure.missing = "No data for this figure in the store."
    figure.pngs = [encode(m) for m in made]
    return figure
