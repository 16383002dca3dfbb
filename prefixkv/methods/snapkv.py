"""SnapKV: an observation window of the last queries votes, with pooling, for the entries to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefixkv.methods.base import Method, top_k_positions
from prefixkv.scoring import attention_mass


@dataclass
class SnapKV(Method):
    """Scores entries by the attention of the last `window` prompt queries, smoothed by 1-D pooling of width
    `kernel_size`, and keeps the top entries per KV head plus the window itself (Li et al., arXiv 2404.14469).
    Every layer keeps the same number of entries, and at least the window (plus `sinks`, none by default).

    Scores: (batch, kv_heads, n).
    """

    name = "snapkv"
    score_fields = ("per_kv_head", "window", "kernel_size", "pooling")

    per_kv_head: bool = True
    window: int = 32
    kernel_size: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("window", 1)
        self.check_int("kernel_size", 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"{self.name}: pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def query_window(self) -> int | None:
        return self.window

    @property
    def protected(self) -> int:
        return self.sinks + max(self.recent, self.window)

    def score(
        self, queries: torch.Tensor, keys: torch.Tensor, layer_idx: int, lse: torch.Tensor | None = None
    ) -> torch.Tensor:
        mass = attention_mass(queries, keys, window=self.window, lse=lse)
        batch, heads, n = mass.shape
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        pad = self.kernel_size // 2
        pooled = pool(mass.reshape(batch * heads, 1, n), self.kernel_size, stride=1, padding=pad)
        if not self.per_kv_head:
            pooled = pooled.view(batch, heads, n).mean(1, keepdim=True).expand(batch, heads, n)
        return pooled.reshape(batch, heads, n)

    def select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        window = max(self.recent, self.window)
        return top_k_positions(scores, keep, protect=self.protection(scores.shape[-1], keep, recent=window))
