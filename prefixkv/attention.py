"""The attention function a compressed cache runs under: prefill attention that scores as it goes, and a decode
attention over each layer's static buffer masked to its own valid length.

It is registered with transformers' `AttentionInterface` as "prefixkv" and selected for the duration of a
`prefixkv.capture.bind` block; transformers builds no mask for it (the name has no mask function), so every mask is
made here from what the cache knows. Shapes: queries (batch, q_heads, s, head_dim) after RoPE; keys and values
(batch, kv_heads, n, head_dim); the output (batch, s, q_heads, head_dim), as transformers expects.

Scoring happens inside the attention call, from the post-RoPE queries the model already computed: no projection or
RoPE is recomputed, and no forward hook is needed. Under the `score` decode policy the decode attention is computed
explicitly so that its probabilities can be accumulated per slot without a second pass.

A chunk of several tokens after compression (`chunk_attention`) is attended and written here, in one call per layer:
its rows see what the same tokens fed one per step would have seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prefixkv.packed import PackedLayer

NAME = "prefixkv"
#: The attribute `bind` sets on each decoder attention module: the cache it reads and writes.
BOUND = "_prefixkv_cache"


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; modules without a bound cache (a vision tower) get plain SDPA."""
    cache = getattr(module, BOUND, None)
    if cache is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    head_dim = query.shape[-1]
    scaling = 1.0 / math.sqrt(head_dim) if scaling is None else scaling
    layer = cache.layers[module.layer_idx]
    if isinstance(layer, PackedLayer):  # per-head budgets: the packed layout's own decode attention
        out = packed_attention(query, key, value, cache, scaling, layer)
    elif layer.compressed and query.shape[2] > 1:
        out = chunk_attention(query, key, value, cache.chunk_steps, scaling, layer)
    elif layer.compressed:
        out = decode_attention(query, key, value, layer.valid(cache.step), scaling, layer)
    else:
        out, lse = prefill_attention(query, key, value, scaling, with_lse=cache.needs_scores)
        # Scaled so that the scorers' default 1/sqrt(head_dim) reproduces the module's own scaling.
        cache.layer_prefilled(module.layer_idx, query * (scaling * math.sqrt(head_dim)), key, lse)
    return out.transpose(1, 2).contiguous(), None


def prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, *, with_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of the last s of n positions (a chunk sees every earlier key): (output (batch, q_heads, s,
    head_dim), log-sum-exp (batch, q_heads, s) float32 or None).

    With `with_lse`, the flash kernel's own log-sum-exp is returned where the backend exposes it (the CPU flash
    kernel; CUDA's flash kernel for fp16/bf16), so that scoring needs one pass over the keys instead of two; the
    output is the one SDPA computes with that kernel."""
    s, n = query.shape[2], key.shape[2]
    if s != n:
        mask = torch.ones(s, n, dtype=torch.bool, device=query.device).tril(n - s)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out, None
    if with_lse:
        flash = _flash_with_lse(query, key, value, scaling)
        if flash is not None:
            return flash
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True), None


def _flash_with_lse(query, key, value, scaling) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal flash attention and its natural log-sum-exp, or None where no flash kernel takes these inputs."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, scale=scaling
        )
        return out, lse
    if query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        group = query.shape[1] // key.shape[1]
        if group > 1:  # the raw flash op takes equal head counts
            key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scaling
        )[:2]
        return out, lse[:, :, : query.shape[2]]
    return None


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float, layer
) -> torch.Tensor:
    """One query per sequence over a layer's whole buffer, masked to `valid` ((capacity,) bool). Returns
    (batch, q_heads, 1, head_dim). Under a policy that needs decode attention, its probabilities summed over each KV
    group are added to the layer's `attention_received`."""
    if not layer.policy.needs_attention:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=valid[None], scale=scaling, enable_gqa=True)
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.view(batch, kv_heads, q_heads // kv_heads, head_dim)  # one query per head: s = 1
    logits = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # (batch, kv_heads, group, capacity)
    probs = logits.masked_fill(~valid, float("-inf")).softmax(-1)
    layer.accumulate_attention(probs.sum(2))
    return torch.matmul(probs.to(value.dtype), value).view(batch, q_heads, 1, head_dim)


def packed_attention(query, key, value, cache, scaling: float, layer: PackedLayer) -> torch.Tensor:
    """Attention of a packed layer (per-head budgets) after compression: a decode step (its token already written by
    the cache) or a chunk of T tokens at steps `cache.chunk_steps`, whose rows run one at a time inside the layer,
    each exactly as a decode step (write, then attend), as the `score` policy's chunks do below."""
    if query.shape[2] == 1:
        return layer.attend(query, scaling, cache.step)
    rows = []
    for t in range(query.shape[2]):
        step = cache.chunk_steps[t : t + 1]
        layer.write(key[:, :, t : t + 1], value[:, :, t : t + 1], step)
        rows.append(layer.attend(query[:, :, t : t + 1].contiguous(), scaling, step))
    return torch.cat(rows, dim=2)


def chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, steps: torch.Tensor, scaling: float, layer
) -> torch.Tensor:
    """A chunk of T tokens after compression (teacher forcing), fed at decode steps `steps` ((T,) int64): each row
    attends to what it would have seen as a one-token step, and the layer ends as after those T steps. `key`/`value`
    are the chunk's own (batch, kv_heads, T, head_dim). Returns (batch, q_heads, T, head_dim).

    Planned policies: one attention over [the buffer before the chunk ; the chunk] with the plan's per-row mask, then
    the chunk's writes. Under `score` step t's victim depends on the attention rows < t gave, so the rows run one at a
    time, each exactly as a decode step (write, then attend and accumulate); the model's other layers still see the
    whole chunk at once."""
    if layer.policy.needs_attention:
        rows = []
        for t in range(query.shape[2]):
            step = steps[t : t + 1]
            layer.write(key[:, :, t : t + 1], value[:, :, t : t + 1], step)
            row = query[:, :, t : t + 1].contiguous()
            rows.append(decode_attention(row, layer.keys, layer.values, layer.valid(step), scaling, layer))
        return torch.cat(rows, dim=2)
    visible = layer.chunk_visibility(steps)  # (T, capacity + T)
    keys, values = torch.cat([layer.keys, key], dim=2), torch.cat([layer.values, value], dim=2)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scaling, enable_gqa=True)
    layer.write_chunk(key, value, steps)
    return out
