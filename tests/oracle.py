"""The eviction oracle: the uncompressed model over the whole sequence, with each layer's evicted prompt positions
masked out of the attention of the generated tokens. A compressed cache must reproduce its logits."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface


def allowed_mask(held: torch.Tensor | list[torch.Tensor], prompt: int, total: int, group: int) -> torch.Tensor:
    """(batch, q_heads, total, total) bool: which keys each query of one layer may see.

    Prompt queries see the whole causal prefix (compression happens after prefill). `held` is either the kept prompt
    positions ((batch, kv_heads, k)), which every later query sees together with all generated tokens up to itself,
    or one tensor per generated query (the positions the layer held when that query attended, itself included).
    """
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    if isinstance(held, torch.Tensor):
        batch, kv_heads, _ = held.shape
        kept = torch.zeros(batch, kv_heads, prompt, dtype=torch.bool)
        kept.scatter_(-1, held.cpu(), True)
        allowed = causal.expand(batch, kv_heads, total, total).clone()
        allowed[:, :, prompt:, :prompt] &= kept[:, :, None, :]
    else:
        batch, kv_heads, _ = held[0].shape
        allowed = causal.expand(batch, kv_heads, total, total).clone()
        for t, positions in enumerate(held[: total - prompt]):
            row = torch.zeros(batch, kv_heads, total, dtype=torch.bool)
            row.scatter_(-1, positions.cpu(), True)
            allowed[:, :, prompt + t] = row
    return allowed.repeat_interleave(group, dim=1)


_MASKS: dict[int, torch.Tensor] = {}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if getattr(module, "layer_idx", None) is None:  # a vision tower's attention: no cache, no eviction
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1).double()
    value = value.repeat_interleave(group, dim=1).double()
    logits = torch.matmul(query.double(), key.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~_MASKS[module.layer_idx].to(logits.device), float("-inf"))
    out = torch.matmul(torch.softmax(logits, -1), value).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("eviction_oracle", _oracle_attention)


@contextmanager
def oracle_attention(model, layer_positions: list, prompt: int, total: int):
    text = model.config.get_text_config(decoder=True)
    group = text.num_attention_heads // text.num_key_value_heads
    previous = model.config._attn_implementation
    _MASKS.clear()
    _MASKS.update({i: allowed_mask(p, prompt, total, group) for i, p in enumerate(layer_positions)})
    model.set_attn_implementation("eviction_oracle")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _MASKS.clear()


@torch.no_grad()
def oracle_logits(model, inputs: dict, generated: torch.Tensor, layer_positions: list) -> torch.Tensor:
    """Logits (batch, T - 1, vocab) after each generated token but the last, from one masked full forward pass.

    generated: (batch, T) tokens; position prompt + t holds generated[:, t]. `layer_positions`: per layer, what
    `allowed_mask` takes as `held`.
    """
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], generated[:, :-1]], dim=1)
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with oracle_attention(model, layer_positions, prompt, ids.shape[1]):
        logits = model(**full).logits
    return logits[:, prompt:].float()
