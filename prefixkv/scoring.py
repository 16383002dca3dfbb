"""Importance scores: how much attention each cached key receives from the prompt's queries.

On CUDA the fused Triton kernel (`kernels/scores.py`) computes the attention mass without materialising the attention
matrix, so prefill can keep SDPA / flash attention; elsewhere its chunked plain-torch reference does (memory
O(chunk x S) per head).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kernels.scores import attention_scores

#: Inside `shared_attention_mass`: the masses computed so far, with the tensors they were computed from.
_shared: list[tuple[tuple, torch.Tensor]] | None = None


@contextmanager
def shared_attention_mass() -> Iterator[None]:
    """Within the block, `attention_mass` runs once per distinct call - the same query, key and log-sum-exp tensors
    (the objects, not equal values) and window - and repeats return that first result (read-only): scorers of one
    layer that read the same attention (H2O per KV head, PrefixKV's head mean) share one pass over the keys. A
    prefill that scores each layer for several methods (`prefixkv.sweep`) opens one block per layer."""
    global _shared
    previous, _shared = _shared, []
    try:
        yield
    finally:
        _shared = previous


def attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, *, window: int | None = None, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention mass per key, summed over the query heads of each KV group.

    queries: (batch, q_heads, s_q, head_dim), after rotary embedding, aligned with the last s_q keys;
    keys: (batch, kv_heads, n, head_dim). `window` scores with only the last `window` queries. `lse`: each query
    row's natural log-sum-exp over its visible keys ((batch, q_heads, s_q) float32, as flash attention returns it),
    which saves the scorer its own first pass.
    Returns (batch, kv_heads, n) float32: `sum_{h in group, i} softmax_j(q_{h,i} . k_j / sqrt(d))`, causal.
    """
    batch, q_heads = queries.shape[:2]
    kv_heads, n = keys.shape[1], keys.shape[2]
    if window is not None:
        window = min(window, queries.shape[2])
    call = (queries, keys, lse, window)
    if _shared is not None:
        for seen, mass in _shared:
            if all(a is b for a, b in zip(seen[:3], call[:3], strict=True)) and seen[3] == window:
                return mass
    # The fused Triton kernel on CUDA; it falls back to the chunked torch reference elsewhere.
    per_query_head = attention_scores(queries, keys, causal=True, window=window, lse=lse)  # (batch, q_heads, n)
    mass = per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).sum(2)
    if _shared is not None:
        _shared.append((call, mass))
    return mass


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scale the last dimension to sum 1 (a row with no mass stays zero)."""
    total = scores.sum(-1, keepdim=True)
    return scores / total.clamp_min(torch.finfo(scores.dtype).tiny)


def key_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    window: int | None = None,
    per_kv_head: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """PrefixKV's per-layer importance: attention mass averaged over heads and normalised to sum 1, in float32.

    Shapes as in `attention_mass`. Returns (batch, n), or (batch, kv_heads, n) with `per_kv_head` (each KV head
    averaged over its query group and normalised on its own).
    """
    mass = attention_mass(queries, keys, window=window, lse=lse)
    return normalise(mass if per_kv_head else mass.sum(1))
