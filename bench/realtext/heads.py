"""Per-head kept counts on a real model: `python -m bench.realtext.heads --out PNG [--budget 0.2] [--samples 4]`.

For each (layer, KV head) of the model, the prompt entries each variant keeps at one budget - per-head budgets
(`head_budgets="adaptive"`) beside the same method's per-layer allocation, where every head of a layer keeps the
same count - averaged over real-text prompts (windows of `bench.realtext.corpus`). Scores come from the library's
own prefill scorer (`prefixkv.prefill_scores`), allocation and selection from each method (`Method.plan`), so the
counts are what the cache would hold. Writes the figure (PNG) and the counts (JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

import prefixkv
from bench.realtext import corpus
from bench.realtext.evaluate import Variant, parse_methods

DEFAULT_VARIANTS = "prefixkv,prefixkv[head_budgets=adaptive],snapkv[head_budgets=adaptive]"


def kept_per_head(method: prefixkv.Method, scores: Sequence[torch.Tensor], budget: float) -> list[list[int]]:
    """[layer][kv_head] prompt entries `method` keeps from one prompt's per-layer (batch, kv_heads, n) scores."""
    counts = []
    for positions in method.plan(scores, budget):
        if isinstance(positions, torch.Tensor):  # every head of the layer alike
            counts.append([positions.shape[-1]] * positions.shape[1])
        else:
            counts.append([p.shape[-1] for p in positions])
    return counts


@torch.inference_mode()
def head_counts(
    model, tokenizer, variants: Sequence[Variant], budget: float, length: int, samples: int
) -> pd.DataFrame:
    """Long frame (variant, layer, kv_head, kept), `kept` the mean over `samples` prompts of `length` tokens."""
    prompts = [c.prompt for c in corpus.continuation_samples(tokenizer, length, samples, continuation=1, seed=7)]
    device = next(model.parameters()).device
    records = []
    for variant in variants:
        method = prefixkv.build_method(variant.method, **variant.kwargs)
        for sample, prompt in enumerate(prompts):
            inputs = {"input_ids": prompt.to(device), "attention_mask": torch.ones_like(prompt, device=device)}
            scores = prefixkv.prefill_scores(model, inputs, method)
            for layer, heads in enumerate(kept_per_head(method, scores, budget)):
                records += [
                    {"variant": variant.label, "sample": sample, "layer": layer, "kv_head": h, "kept": k}
                    for h, k in enumerate(heads)
                ]
    frame = pd.DataFrame.from_records(records)
    return frame.groupby(["variant", "layer", "kv_head"], sort=False, as_index=False)["kept"].mean()


def figure(counts: pd.DataFrame, path: Path, *, title: str) -> Path:
    """One panel per variant: kept entries per layer, one line per KV head; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report.drawing import save_png

    variants = list(dict.fromkeys(counts["variant"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        rows = counts[counts["variant"] == variant]
        for head, line in rows.groupby("kv_head"):
            ax.plot(line["layer"], line["kept"], marker=".", linewidth=1.2, label=f"KV head {head}")
        ax.set_title(variant.replace(",", ",\n", 1), fontsize=8)
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("prompt entries kept")
    axes[0][-1].legend(frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.heads", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a fetched model name, or a converted directory")
    parser.add_argument("--methods", default=DEFAULT_VARIANTS, help="comma-separated name[key=value,...] variants")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--length", type=int, default=512, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=4, help="prompts averaged over")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG); the counts go beside it (JSON)")
    args = parser.parse_args(argv)
    try:
        variants = parse_methods(args.methods)
        budget = prefixkv.check_budget(args.budget)
        if args.length < 1 or args.samples < 1:
            raise ValueError(f"--length and --samples must be >= 1, got {args.length} and {args.samples}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.models import load_or_exit

    model, tokenizer = load_or_exit(args.model)
    counts = head_counts(model, tokenizer, variants, budget, args.length, args.samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{args.model}: prompt entries kept per layer and KV head at budget {budget:g} ({args.length}-token " \
            f"prompts, mean of {args.samples})"
    figure(counts, args.out, title=title)
    data = args.out.with_suffix(".json")
    tmp = data.with_name(f".{data.name}.tmp")
    tmp.write_text(json.dumps({"model": args.model, "budget": budget, "length": args.length, "samples": args.samples,
                               "counts": counts.to_dict(orient="records")}, indent=1) + "\n")
    os.replace(tmp, data)
    print(f"wrote {args.out} and {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
