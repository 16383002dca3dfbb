"""Decode-time policies: what a compressed layer does with the tokens generated after the prompt.

- `grow`: every generated token is kept; the cache grows by one entry per step.
- `fixed_position` (PrefixKV's protocol, from Elastic Cache, arXiv 2404.12353): the layer's keep ratio holds over
  the whole sequence; when a step would exceed it, the entry at a fixed place - `distance` entries before the end of
  the compressed prompt, in original order - is dropped.
- `score` (H2O / TOVA style): attention received from decode queries is accumulated per entry, and the entry with
  the least goes; the `recent` most recent tokens are protected.

Under `fixed_position` and `score` a layer with keep ratio r holds at most `ceil(r x tokens_seen) + 1` entries
after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("grow", "fixed_position", "score")


@dataclass(frozen=True)
class DecodePolicy:
    kind: str = "grow"
    distance: int = 0
    recent: int = 8

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown decode policy {self.kind!r}; known: {', '.join(POLICIES)}")
        if not isinstance(self.distance, int) or self.distance < 0:
            raise ValueError(f"decode distance must be an integer >= 0, got {self.distance!r}")
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"decode recent window must be an integer >= 0, got {self.recent!r}")

    def limit(self, ratio: float, seen: int) -> int | None:
        """Most entries a layer with keep ratio `ratio` may hold after `seen` tokens (None: no limit)."""
        if self.kind == "grow":
            return None
        return math.ceil(ratio * seen - 1e-9) + 1

    def capacity(self, kept: int, prompt: int, max_new_tokens: int) -> int:
        """Slots a layer's decode buffer needs so that decoding `max_new_tokens` never reallocates."""
        grown = kept + max_new_tokens
        limit = self.limit(kept / prompt, prompt + max_new_tokens)
        return grown if limit is None else max(kept, min(grown, limit))
