"""Binding a model to a compressed cache: find the text decoder's attention modules and, for the duration of a `with`
block, route them through `prefixkv.attention` with the cache they read and write.

Nothing in transformers is patched: the attention function is registered by name through `AttentionInterface`, the
model's attention implementation is switched to it inside `bind` and switched back after, and the attribute naming
the cache is removed from every module on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from transformers import AttentionInterface

from prefixkv import attention


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
    modules = sorted(
        (m for m in model.modules() if all(hasattr(m, a) for a in ("layer_idx", "q_proj", "k_proj", "v_proj"))),
        key=lambda m: m.layer_idx,
    )
    if len(modules) != text.num_hidden_layers:
        raise ValueError(
            f"{type(model).__name__}: found {len(modules)} decoder attention modules with q_proj/k_proj/v_proj and "
            f"layer_idx, but config.num_hidden_layers={text.num_hidden_layers}; this model's attention is not supported"
        )
    return DecoderSpec(text.num_hidden_layers, num_heads, num_kv_heads, head_dim, tuple(modules))


@contextmanager
def bind(model: nn.Module, cache, spec: DecoderSpec | None = None) -> Iterator[DecoderSpec]:
    """While active, `model`'s decoder attention runs `prefixkv.attention` against `cache`."""
    spec = spec or decoder_spec(model)
    AttentionInterface.register(attention.NAME, attention.attention)  # a registry entry, idempotent
    busy = [m.layer_idx for m in spec.attention if getattr(m, attention.BOUND, None) is not None]
    if busy:
        raise ValueError(f"{type(model).__name__} is already bound to a compressed cache (layers {busy[:3]}...)")
    previous = model.config._attn_implementation
    for module in spec.attention:
        setattr(module, attention.BOUND, cache)
    model.set_attn_implementation(attention.NAME)
    try:
        yield spec
    finally:
        model.set_attn_implementation(previous)
        for module in spec.attention:
            delattr(module, attention.BOUND)
