"""The uniform ablation: PrefixKV's importance scores with the same cache size in every layer."""

from __future__ import annotations

from dataclasses import dataclass

from prefixkv.methods.base import Method


@dataclass
class Uniform(Method):
    """PrefixKV's scores and top-k selection, every layer the same size: isolates what PrefixKV's adaptive
    allocation buys (ablation of Wang et al., arXiv 2412.03409). Scores: (batch, kv_heads, n).
    """

    name = "uniform"
