"""Attention hooks: recompute the prompt's queries during prefill and hand each layer's scores to the cache.

Forward hooks are registered on the decoder's attention modules for the duration of a `with` block and removed
after it; nothing in transformers is patched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prefixkv.cache import synchronize
from prefixkv.scoring import attention_mass


@dataclass(frozen=True)
class DecoderSpec:
    """What the cache needs to know of a model's text decoder."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention: tuple[nn.Module, ...]


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """Find the text decoder's attention modules and head geometry, or raise ValueError naming what is missing."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`: not a transformers model")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(text, attr, None) is None:
            raise ValueError(f"model config {type(text).__name__} lacks `{attr}`, which the cache needs")
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    attention = sorted(
        (m for m in model.modules() if all(hasattr(m, a) for a in ("layer_idx", "q_proj", "k_proj", "v_proj"))),
        key=lambda m: m.layer_idx,
    )
    if len(attention) != text.num_hidden_layers:
        raise ValueError(
            f"{type(model).__name__}: found {len(attention)} decoder attention modules with q_proj/k_proj/v_proj and "
            f"layer_idx, but config.num_hidden_layers={text.num_hidden_layers}; this model's attention is not supported"
        )
    return DecoderSpec(text.num_hidden_layers, num_heads, num_kv_heads, head_dim, tuple(attention))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def prompt_queries(
    module: nn.Module, hidden_states: torch.Tensor, position_embeddings, head_dim: int, last: int | None
) -> torch.Tensor:
    """The attention module's queries for the last `last` prompt positions, after RoPE, scaled so that the
    default 1/sqrt(head_dim) of the scorers reproduces the module's own `scaling`.

    hidden_states: (batch, seq, hidden). Returns (batch, q_heads, last, head_dim).
    """
    if last is not None:
        hidden_states = hidden_states[:, -last:]
    batch, seq, _ = hidden_states.shape
    queries = module.q_proj(hidden_states).view(batch, seq, -1, head_dim)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    queries = queries.transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        cos, sin = cos[:, -seq:].unsqueeze(1), sin[:, -seq:].unsqueeze(1)
        queries = queries * cos + _rotate_half(queries) * sin
    scaling = getattr(module, "scaling", None)
    if scaling is not None:
        queries = queries * (scaling * math.sqrt(head_dim))
    return queries


@contextmanager
def scoring_hooks(model: nn.Module, cache, spec: DecoderSpec | None = None) -> Iterator[DecoderSpec]:
    """While active, every prefill forward of a decoder attention layer stores `cache.method.score(...)` for that
    layer in `cache.scores[layer_idx]`, timed into `cache.timings['score']`."""
    spec = spec or decoder_spec(model)
    method = cache.method

    def hook(module, args, kwargs, output):
        layer = cache.layers[module.layer_idx]
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        if hidden_states is None:
            return
        if layer.compressed:
            if layer.attention_received is not None:  # the `score` decode policy
                query = prompt_queries(module, hidden_states, kwargs.get("position_embeddings"), spec.head_dim, 1)
                layer.accumulate_attention(attention_mass(query, layer.keys))
            return
        if not method.needs_scores or hidden_states.shape[1] < 2:
            return
        start = time.perf_counter()
        queries = prompt_queries(
            module, hidden_states, kwargs.get("position_embeddings"), spec.head_dim, method.query_window
        )
        scores = method.score(queries, layer.keys, module.layer_idx)
        # With a chunked prefill the last chunk's scores win: its queries are the prompt's last ones.
        cache.scores[module.layer_idx] = scores
        synchronize(scores.device)
        cache.timings["score"] += time.perf_counter() - start

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in spec.attention]
    try:
        yield spec
    finally:
        for handle in handles:
            handle.remove()
