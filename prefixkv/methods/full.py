"""The uncompressed cache: the reference every method is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method


@dataclass
class FullCache(Method):
    """Keeps every prompt entry whatever the budget: the baseline of speed, memory and quality."""

    name = "full"
    needs_scores = False

    def allocate(self, scores: Sequence[torch.Tensor], budget: float) -> list[int]:
        return [s.shape[-1] for s in scores]
