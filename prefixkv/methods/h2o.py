"""H2O: heavy hitters (largest accumulated attention) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method, recent_mask, top_k_positions


@dataclass
class H2O(Method):
    """Keeps, per KV head, the entries with the largest accumulated attention plus the most recent ones
    (Zhang et al., arXiv 2306.14048). Every layer keeps the same number of entries.

    `recent_ratio` of each layer's budget goes to the most recent entries, the rest to heavy hitters.
    Scores: (batch, kv_heads, n), the attention each entry received from every prompt query.
    """

    name = "h2o"

    per_kv_head: bool = True
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio!r}")

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        recent = recent_mask(scores.shape[-1], round(keep * self.recent_ratio), scores.device)
        return top_k_positions(scores, keep, protect=recent)
