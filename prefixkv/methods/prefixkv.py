"""PrefixKV: each layer keeps the shortest prefix of its priority sequence reaching one global retention ratio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixkv.allocation import prefix_allocation
from prefixkv.methods.base import head_profiles, layer_profiles
from prefixkv.methods.uniform import Uniform
from prefixkv.profile import Profile


@dataclass
class PrefixKV(Uniform):
    """Adaptive per-layer sizes from PrefixKV (Wang et al., arXiv 2412.03409): entries are ranked by the attention
    they receive from the prompt; one global retention ratio p, searched so that the kept sizes meet the budget,
    gives each layer the shortest prefix of its ranking whose importance reaches p; then the top entries are kept.

    The protected entries (`sinks`, `recent`: the first and the last token, as in the official code) head every
    layer's priority sequence and the search runs on the importance of the others, renormalised: a sink holding
    half of a layer's attention would otherwise reach p alone and cut that layer to one entry. `layer_floor`
    guarantees every layer that fraction of the average layer size (and at least its protected entries); the
    adaptive search shares what remains. Its default, 0.2, is Ada-KV's safeguard (arXiv 2407.11550).

    `profile` (a path to a calibration JSON, or a `Profile`) gives offline per-layer keep ratios: with it no search
    runs at inference. Without it the search runs online on the current prompt. Scores and selection as in
    `Uniform` (by default visibility-normalised and per KV head; the paper's own scores are
    `prefixkv[per_kv_head=False,visibility_norm=False]`). Scores: (batch, kv_heads, n).

    With `head_budgets="adaptive"` (and `per_kv_head=True`) the online search runs over every (layer, KV head)
    at once: one retention ratio, one budget of `round(budget x n x layers x kv_heads)` entries, and every head
    protected and floored (at `layer_floor` of the average head size) as a layer is; with a profile, each layer's
    calibrated total is shared among its heads by the same criterion.
    """

    name = "prefixkv"

    layer_floor: float = 0.2
    profile: str | Path | Profile | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_float("layer_floor", 0.0, 1.0)
        if self.profile is not None and not isinstance(self.profile, Profile):
            if not isinstance(self.profile, str | Path):
                raise TypeError(f"{self.name}: profile must be a path or a Profile, got {self.profile!r}")
            self.profile = Profile.load(self.profile)

    @property
    def head_floor(self) -> float:
        return self.layer_floor

    @property
    def sizes_need_scores(self) -> bool:
        # Online, the search reads this prompt's scores; with a calibration profile the sizes are known up front.
        return self.profile is None

    def allocate(self, scores: Sequence[torch.Tensor], budget: float) -> list[int | tuple[int, ...]]:
        n = scores[0].shape[-1]
        if self.profile is None and self.head_budgets == "adaptive":
            heads = scores[0].shape[1]
            counts = prefix_allocation(
                [p for s in scores for p in head_profiles(s)], budget, min_keep=self.min_keep,
                protect=self.protection(n, n), floor_share=self.layer_floor,
            )
            return [tuple(counts[i : i + heads]) for i in range(0, len(counts), heads)]
        if self.profile is None:
            return prefix_allocation(
                layer_profiles(scores), budget, min_keep=self.min_keep, protect=self.protection(n, n),
                floor_share=self.layer_floor,
            )
        return self.profile.counts(
            budget, n, layers=len(scores), min_keep=self.min_keep, protected=self.protected, share=self.layer_floor
        )
