"""The uniform ablation: PrefixKV's importance scores with the same cache size in every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method, recent_mask, top_k_positions


@dataclass
class Uniform(Method):
    """PrefixKV's scores and top-k selection, every layer the same size: isolates what PrefixKV's adaptive
    allocation buys (ablation of Wang et al., arXiv 2412.03409). Scores: (batch, kv_heads, n).

    `recent` protects the last `recent` prompt entries from eviction (0: pure top-k, as specified). Attention
    accumulated under the causal mask favours early positions - the last entry is seen by one query, the first by
    all - so pure top-k tends to drop the instruction at the end of a prompt; H2O and SnapKV protect a recent
    window for this reason.
    """

    name = "uniform"

    recent: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"{self.name}: recent must be an integer >= 0, got {self.recent!r}")

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        protect = recent_mask(scores.shape[-1], min(self.recent, keep), scores.device) if self.recent else None
        return top_k_positions(scores, keep, protect=protect)
