"""Offline calibration: PrefixKV's per-layer keep ratios, estimated from a few samples and reused at inference."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from prefixkv.allocation import prefix_allocation
from prefixkv.budget import check_budget
from prefixkv.generation import prefill_scores
from prefixkv.methods.base import layer_profiles
from prefixkv.profile import Profile


def layer_ratios(profiles: Sequence[torch.Tensor], budget: float, min_keep: int = 1) -> list[float]:
    """PrefixKV's keep ratio of each layer for one sample (per-layer 1-D importance distributions)."""
    n = profiles[0].shape[-1]
    return [k / n for k in prefix_allocation(profiles, budget, min_keep=min_keep)]


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    budgets: Sequence[float],
    *,
    model_name: str | None = None,
    min_keep: int = 1,
) -> Profile:
    """Estimate PrefixKV's per-layer keep ratios from `samples` (input dicts, as for `prefixkv.generate`).

    Each sample is prefilled once; its per-layer importance (attention mass from all prompt queries, averaged over
    heads and batch) gives, for each budget, the layer sizes of PrefixKV's search; the profile stores their mean
    ratio per layer over the samples.
    """
    budgets = [check_budget(b) for b in budgets]
    if not budgets:
        raise ValueError("budgets is empty")
    sums: dict[float, list[float]] = {}
    count = 0
    for inputs in samples:
        profiles = layer_profiles(prefill_scores(model, inputs, "uniform"))  # uniform's scores are PrefixKV's
        for b in budgets:
            ratios = layer_ratios(profiles, b, min_keep)
            sums[b] = [s + r for s, r in zip(sums.get(b, [0.0] * len(ratios)), ratios, strict=True)]
        count += 1
    if count == 0:
        raise ValueError("no calibration samples given")
    name = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
    return Profile(
        model=name,
        num_layers=len(next(iter(sums.values()))),
        budgets={b: [s / count for s in sums[b]] for b in budgets},
        samples=count,
    )
