"""The report's figures, in page order, each with its caption: what is drawn and why a figure is missing."""

from __future__ import annotations

import pandas as pd
import seaborn as sns

from bench.report import budget_figures, cost_figures
from bench.report.drawing import Figure, make


def quality_missing(cells: pd.DataFrame) -> str | None:
    if cells["quality_known"].any():
        return None
    return ("Quality is not plotted: every model here has random weights (" + ", ".join(sorted(cells["model"].unique()))
            + "), whose outputs are noise. Run a trained model (`embedded`, `smollm2-135m`) for quality.")


def all_figures(cells: pd.DataFrame) -> list[Figure]:
    if cells.empty:
        return [Figure("speed", "Speed vs budget", "", missing="No successful cell in the store.")]
    sns.set_theme(style="whitegrid", context="notebook")
    energy = cells[cells["j_per_token_med"].notna()]
    telemetry = "; ".join(sorted(cells["telemetry_status"].dropna().astype(str).unique()))
    trained = cells[cells["quality_known"]]
    random = sorted(cells.loc[~cells["quality_known"], "model"].unique())
    dropped = (f"Random-weight models left out ({', '.join(random)}): their outputs are noise, so agreement with the "
               "full cache and perplexity measure nothing there." if random else None)
    return [
        make("speed", "Speed vs budget",
             "Decode throughput is batch over the median decode step, from every step of every repetition (a slow "
             "moment caused by another process moves a total, not a median); its interval is a two-level bootstrap "
             "(repetitions, then steps). The speed-up divides the full cache's median step by the cell's: paired "
             "within the cell where it timed a full-cache call beside each repetition. End-to-end throughput is "
             "batch x new tokens over the whole generate call, prefill included - a total per repetition, the "
             "figure the paper reports. Time to first token is the prefill with scoring. Each row is one workload, "
             "with its own scales.", cells, budget_figures.speed),
        make("memory", "Memory vs budget",
             "Every cell of every model. Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's "
             "peak RSS, model and interpreter included (so compression barely moves it). KV cache: bytes held by "
             "all layers after generation (allocated: decode slots included, where the rows record it). One row "
             "per workload (batch sizes are rows); the full cache dashed.", cells, budget_figures.memory),
        make("energy", "Energy per token", "Joules from NVML's total-energy counter over each timed call.", energy,
             budget_figures.energy, missing=None if not energy.empty else
             f"No energy data: energy comes from NVML, unavailable for these cells - {telemetry}."),
        make("quality", "Quality vs budget",
             "Quality loss against the full cache (the quality engine's, with its paired interval, where the rows "
             "carry it; else 1 - ROUGE-L of the generated tokens against the full cache's), ROUGE-L, and the "
             "perplexity of the full cache's continuation under the compressed cache (lower is better).", trained,
             budget_figures.quality, missing=quality_missing(cells), note=dropped if not trained.empty else None),
        make("tradeoff", "Trade-off and Pareto frontier",
             "Each point is one cell (colour: method, shape: budget), with the interval of its speed-up. The thick "
             "grey line joins the Pareto frontier: the cells no other cell beats on both axes (by median). Left: "
             "speed against quality loss (trained models); right: speed against memory (peak memory on GPU; on "
             "CPU the KV cache's bytes, since the process's peak RSS is mostly the interpreter and the model).",
             cells, cost_figures.tradeoff),
        make("kept", "Per-layer kept counts",
             "Prompt entries each layer keeps after compaction, as a fraction of the prompt: PrefixKV sizes layers "
             "from their importance profile, the baselines keep the same fraction everywhere (or a pyramid). With "
             "per-head budgets (head_budgets=\"adaptive\") each KV head is its own line.", cells, cost_figures.kept),
    ]


def cross_figure(cells: pd.DataFrame) -> Figure | None:
    if cells.empty or cells["hardware"].nunique() < 2:
        return None
    return make("cross", "Speed-up on each machine", "", cells, cost_figures.cross)
