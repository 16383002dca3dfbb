"""Greedy generation with a compressed KV cache: prefill, score, compress, then decode one token at a time."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from prefixkv.budget import check_budget
from prefixkv.cache import CacheStats, PrefixKVCache, synchronize
from prefixkv.capture import decoder_spec, scoring_hooks
from prefixkv.methods import Method, build_method


@dataclass
class GenerationOutput:
    """`sequences`: (batch, prompt + new) token ids, as `model.generate` returns them; `cache_stats`: the cache after
    generation; `timings`: host-synchronised seconds - "prefill" (scoring included), "score", "allocate",
    "compact", "decode" (all steps) and "decode_steps" (one per generated token after the first)."""

    sequences: torch.Tensor
    cache_stats: CacheStats
    timings: dict = field(default_factory=dict)


def _check_inputs(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ValueError("inputs must be a dict with at least `input_ids` (what a tokenizer or processor returns)")
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError(
            "attention_mask has padding: the compressed cache needs equal prompt lengths within a batch "
            "(group prompts by length, or run them one at a time)"
        )
    return input_ids


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes a cache: `cache` from transformers 5.2x on,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: nn.Module, inputs: Mapping[str, torch.Tensor], cache: PrefixKVCache) -> torch.Tensor:
    """Run the prompt through the model (inside `scoring_hooks`, the cache is left uncompressed); return the
    last position's logits (batch, vocab)."""
    out = model(**inputs, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def _step(model: nn.Module, token: torch.Tensor, cache: PrefixKVCache) -> torch.Tensor:
    """Feed one token per sequence ((batch,) ids) at its true position; return its logits (batch, vocab)."""
    position = torch.full((token.shape[0], 1), cache.get_seq_length(), device=token.device, dtype=torch.long)
    out = model(input_ids=token[:, None], position_ids=position, **{cache_argument(model): cache}, use_cache=True)
    return out.logits[:, -1].float()


def make_cache(
    model: nn.Module, method: str | Method, budget: float, max_new_tokens: int, **method_kwargs
) -> PrefixKVCache:
    """A `PrefixKVCache` sized for `model`, after checking every argument (ValueError names the bad one)."""
    budget = check_budget(budget)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    spec = decoder_spec(model)
    return PrefixKVCache(
        spec.num_layers, method=build_method(method, **method_kwargs), budget=budget, max_new_tokens=max_new_tokens
    )


@torch.inference_mode()
def generate(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    method: str | Method,
    budget: float,
    max_new_tokens: int,
    **method_kwargs,
) -> GenerationOutput:
    """Greedy generation of `max_new_tokens` tokens with the prompt's KV cache compressed by `method` at `budget`.

    `inputs` is the dict a tokenizer or processor returns (`input_ids` (batch, seq), `attention_mask`,
    `pixel_values`, ...); all prompts of a batch must have the same length (no padding). Works for decoder-only
    models whose attention modules have q_proj/k_proj/v_proj (Llama, Mistral, Qwen2...) and for LLaVA.
    """
    input_ids = _check_inputs(inputs)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    cache = make_cache(model, method, budget, max_new_tokens, **method_kwargs)
    device = input_ids.device

    with scoring_hooks(model, cache):
        synchronize(device)
        start = time.perf_counter()
        token = _prefill(model, inputs, cache).argmax(-1)
        synchronize(device)
        prefill = time.perf_counter() - start
        cache.compress()

        tokens = [token]
        steps = []
        for _ in range(max_new_tokens - 1):
            start = time.perf_counter()
            token = _step(model, token, cache).argmax(-1)
            synchronize(device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)

    timings = {"prefill": prefill, **cache.timings, "decode": sum(steps), "decode_steps": steps}
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)
    return GenerationOutput(sequences=sequences, cache_stats=cache.stats(), timings=timings)


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    continuation: torch.Tensor,
    *,
    method: str | Method,
    budget: float,
    **method_kwargs,
) -> torch.Tensor:
    """Log-probability of each token of `continuation` ((batch, T) ids) given the prompt and the tokens before it,
    with the prompt's cache compressed by `method` at `budget` (teacher forcing). Returns (batch, T) float32;
    perplexity is `exp(-mean)`.
    """
    input_ids = _check_inputs(inputs)
    if continuation.dim() != 2 or continuation.shape[0] != input_ids.shape[0] or continuation.shape[1] < 1:
        raise ValueError(
            f"continuation must be (batch={input_ids.shape[0]}, T>=1) token ids, got {tuple(continuation.shape)}"
        )
    continuation = continuation.to(input_ids.device)
    cache = make_cache(model, method, budget, continuation.shape[1], **method_kwargs)
    with scoring_hooks(model, cache):
        logits = _prefill(model, inputs, cache)
        cache.compress()
        logprobs = [torch.log_softmax(logits, -1).gather(-1, continuation[:, :1])]
        for t in range(1, continuation.shape[1]):
            logits = _step(model, continuation[:, t - 1], cache)
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, continuation[:, t : t + 1]))
    return torch.cat(logprobs, dim=1)


@contextmanager
def attach(
    model: nn.Module, *, method: str | Method, budget: float, max_new_tokens: int = 0, **method_kwargs
) -> Iterator[PrefixKVCache]:
    """Use a compressed cache with `model.generate`::

        with prefixkv.attach(model, method="prefixkv", budget=0.2, max_new_tokens=64) as cache:
            out = model.generate(**inputs, cache=cache, max_new_tokens=64, do_sample=False)

    (`past_key_values=cache` before transformers 5.2x.)

    The cache compresses itself before the first decode step. Needs one `generate` call per cache, greedy or
    sampling (beam search reorders the cache and is not supported), and prompts of equal length.
    """
    cache = make_cache(model, method, budget, max_new_tokens, **method_kwargs)
    with scoring_hooks(model, cache):
        yield cache
