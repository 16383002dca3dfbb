"""PyramidKV: SnapKV's choice of entries with sizes that shrink linearly from the first layer to the last."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefixkv.allocation import pyramid_allocation
from prefixkv.methods.base import layer_profiles
from prefixkv.methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores and selection with pyramidal per-layer sizes (Cai et al., arXiv 2406.02069): the first layer
    keeps about 2 - 1/beta times the average size, the last 1/beta of it, and every layer at least SnapKV's window.

    Scores: (batch, kv_heads, n).
    """

    name = "pyramidkv"

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_float("beta", 1.0, math.inf)

    def allocate(self, scores: Sequence[torch.Tensor], budget: float) -> list[int]:
        return pyramid_allocation(
            layer_profiles(scores), budget, min_keep=self.min_keep, beta=self.beta, protected=self.protected
        )
