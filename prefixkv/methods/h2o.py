"""H2O: heavy hitters (largest accumulated attention) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method, top_k_positions


@dataclass
class H2O(Method):
    """Keeps, per KV head, the entries with the largest accumulated attention plus the most recent ones
    (Zhang et al., arXiv 2306.14048). Every layer keeps the same number of entries.

    `recent_ratio` of each layer's budget goes to the most recent entries (at least `recent` of them), the rest to
    heavy hitters; H2O has no attention sinks (`sinks=0`). Scores: (batch, kv_heads, n), the attention each entry
    received from every prompt query.
    """

    name = "h2o"

    per_kv_head: bool = True
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_float("recent_ratio", 0.0, 1.0)

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        window = max(self.recent, round(keep * self.recent_ratio))
        return top_k_positions(scores, keep, protect=self.protection(scores.shape[-1], keep, recent=window))
