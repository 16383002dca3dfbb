"""PrefixKV: each layer keeps the shortest prefix of its priority sequence reaching one global retention ratio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixkv.allocation import prefix_allocation
from prefixkv.methods.base import layer_profiles
from prefixkv.methods.uniform import Uniform
from prefixkv.profile import Profile


@dataclass
class PrefixKV(Uniform):
    """Adaptive per-layer sizes from PrefixKV (Wang et al., arXiv 2412.03409): entries are ranked by the attention
    they receive from the prompt; one global retention ratio p, searched so that the kept sizes meet the budget,
    gives each layer the shortest prefix of its ranking whose importance reaches p; then the top entries are kept.

    `profile` (a path to a calibration JSON, or a `Profile`) gives offline per-layer keep ratios: with it no search
    runs at inference. Without it the search runs online on the current prompt. `recent` as in `Uniform`, whose
    scores and selection this method shares. Scores: (batch, kv_heads, n).
    """

    name = "prefixkv"

    profile: str | Path | Profile | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.profile is not None and not isinstance(self.profile, Profile):
            self.profile = Profile.load(self.profile)

    @property
    def sizes_need_scores(self) -> bool:
        # Online, the search reads this prompt's scores; with a calibration profile the sizes are known up front.
        return self.profile is None

    def allocate(self, scores: Sequence[torch.Tensor], budget: float) -> list[int]:
        if self.profile is None:
            return prefix_allocation(layer_profiles(scores), budget, min_keep=self.min_keep)
        n = scores[0].shape[-1]
        return self.profile.counts(budget, n, layers=len(scores), min_keep=self.min_keep)
