"""Offline calibration: PrefixKV's per-layer keep ratios, estimated from a few samples and reused at inference."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from prefixkv.budget import check_budget
from prefixkv.generation import prefill_scores
from prefixkv.methods.prefixkv import PrefixKV
from prefixkv.profile import Profile


def layer_ratios(
    profiles: Sequence[torch.Tensor], budget: float, min_keep: int = 1, method: PrefixKV | None = None
) -> list[float]:
    """PrefixKV's keep ratio of each layer for one sample (per-layer 1-D importance distributions), with the
    protections and floor of `method` (default: `PrefixKV()`)."""
    method = method or PrefixKV(min_keep=min_keep)
    n = profiles[0].shape[-1]
    scores = [p[None, None] for p in profiles]  # (batch=1, kv_heads=1, n), as the cache hands them over
    return [k / n for k in method.allocate(scores, budget)]


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    budgets: Sequence[float],
    *,
    model_name: str | None = None,
    min_keep: int = 1,
    **method_kwargs,
) -> Profile:
    """Estimate PrefixKV's per-layer keep ratios from `samples` (input dicts, as for `prefixkv.generate`).

    Each sample is prefilled once; its per-layer importance (scored as `PrefixKV(**method_kwargs)` scores: attention
    mass from all prompt queries, averaged over heads and batch) gives, for each budget, the layer sizes of that
    method's online search (its sink and recent protections and layer floor included); the profile stores their
    mean ratio per layer over the samples, and the protections it was made with (use it with the same ones).
    """
    budgets = [check_budget(b) for b in budgets]
    if not budgets:
        raise ValueError("budgets is empty")
    if "profile" in method_kwargs:
        raise ValueError("calibrate makes a profile; do not pass one")
    method = PrefixKV(min_keep=min_keep, **method_kwargs)
    if method.head_budgets != "equal":
        raise ValueError("a profile holds per-layer ratios: calibrate with equal head budgets, and use the profile "
                         "with head_budgets='adaptive' to share each layer's entries among its heads")
    sums: dict[float, list[float]] = {}
    count = 0
    for inputs in samples:
        scores = prefill_scores(model, inputs, method)
        n = scores[0].shape[-1]
        for b in budgets:
            ratios = [k / n for k in method.allocate(scores, b)]
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
        meta={"method": {k: getattr(method, k) for k in PROFILE_FIELDS}},
    )


#: The PrefixKV fields a profile depends on, recorded in it.
PROFILE_FIELDS = ("min_keep", "sinks", "recent", "layer_floor", "visibility_norm", "per_kv_head")
