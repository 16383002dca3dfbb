"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method


@dataclass
class StreamingLLM(Method):
    """Keeps the first `sinks` entries and the most recent ones (Xiao et al., arXiv 2309.17453).

    Its choice ignores attention; every layer keeps the same number of entries. Positions are (batch, kv_heads, k).
    """

    name = "streaming_llm"
    needs_scores = False

    sinks: int = 4

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        batch, heads, n = scores.shape
        sinks = min(self.sinks, keep)
        positions = torch.cat([torch.arange(sinks), torch.arange(n - (keep - sinks), n)]).to(scores.device)
        return positions.expand(batch, heads, -1).contiguous()
