"""The uniform ablation: PrefixKV's importance scores with the same cache size in every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixkv.methods.base import Method
from prefixkv.scoring import normalise


@dataclass
class Uniform(Method):
    """PrefixKV's scores and top-k selection, every layer the same size: isolates what PrefixKV's adaptive
    allocation buys (ablation of Wang et al., arXiv 2412.03409). Scores: (batch, kv_heads, n).

    Protections as in the official PrefixKV code: the first entry (`sinks=1`, the attention sink) and the last one
    (`recent=1`) are always kept. Attention accumulated under the causal mask favours early positions - the last
    entry is seen by one query, the first by all - so top-k tends to drop the end of a prompt: `recent` protects a
    window of it, and `visibility_norm=True` divides each entry's attention by the number of queries that could
    attend to it (n - j for entry j), which removes that bias from the scores themselves.

    Defaults, chosen on held-out real text (`reports/baselines/cpu-2core/realtext_quality.md`): `visibility_norm=True`
    and `per_kv_head=True` (each KV head its own top-k). The paper's exact scores - attention summed over the prompt
    and shared by all heads of a layer - are `visibility_norm=False, per_kv_head=False`: the method specs
    `prefixkv[per_kv_head=False,visibility_norm=False]` and `uniform[per_kv_head=False,visibility_norm=False]`.

    With `head_budgets="adaptive"` every layer keeps the same total, shared among its KV heads by PrefixKV's own
    criterion (the shortest prefixes reaching one retention ratio, searched within the layer).
    """

    name = "uniform"
    head_criterion = "prefix"
    score_fields = ("per_kv_head", "visibility_norm")

    sinks: int = 1
    recent: int = 1
    per_kv_head: bool = True
    visibility_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.visibility_norm, bool):
            raise TypeError(f"{self.name}: visibility_norm must be True or False, got {self.visibility_norm!r}")

    def score(
        self, queries: torch.Tensor, keys: torch.Tensor, layer_idx: int, lse: torch.Tensor | None = None
    ) -> torch.Tensor:
        scores = super().score(queries, keys, layer_idx, lse=lse)
        if not self.visibility_norm:
            return scores
        return normalise(scores / visible_queries(queries.shape[2], keys.shape[2], scores.device))


def visible_queries(s_q: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) float32: how many of the prompt's last `s_q` queries see each of `n` keys under the causal mask."""
    j = torch.arange(n, device=device)
    return (n - j).clamp(max=s_q).clamp(min=1).float()
