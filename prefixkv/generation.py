"""Greedy generation with a compressed KV cache: prefill (scoring and compressing as it goes), then one token per
step through a static-shape decode step, eager or compiled.

No function here reads a clock or synchronises the device: a caller that wants timings passes a `timer`
(`prefixkv.timer`), whose regions "prefill", "score", "allocate", "compact" and "decode_step" mark exactly that work.
With `compile=True` the decode step runs under `torch.compile(fullgraph=True)` - on CUDA with `mode="reduce-overhead"`,
so that each step replays one CUDA graph instead of launching a kernel per operation from Python.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prefixkv.budget import check_count
from prefixkv.cache import CacheStats, PrefixKVCache
from prefixkv.capture import bind, decoder_spec
from prefixkv.methods import Method, build_method
from prefixkv.timer import Timer


@dataclass
class GenerationOutput:
    """`sequences`: (batch, prompt + new) token ids, as `model.generate` returns them; `cache_stats`: the cache after
    generation."""

    sequences: torch.Tensor
    cache_stats: CacheStats


def check_inputs(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The `input_ids` of `inputs`, after checking what the compressed cache needs (ValueError/TypeError naming the
    argument and the value)."""
    decoder_spec(model)  # an unsupported model is named before its inputs
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise TypeError(
            "inputs must be a dict with at least `input_ids` (what a tokenizer or processor returns), got "
            f"{type(inputs).__name__}"
        )
    input_ids = inputs["input_ids"]
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    # What an embedding takes: narrower integers are refused here rather than deep inside the model's embedding.
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold int64 or int32 token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.device.type == "meta":
        raise ValueError("input_ids is on the meta device: it holds no token ids")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != input_ids.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {parameter.device}")
    _check_vocabulary("input_ids", input_ids, model)
    check_no_padding(inputs.get("attention_mask"), input_ids)
    return input_ids


def check_continuation(model: nn.Module, input_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """`continuation` ((batch, T) token ids after the prompt `input_ids`) as int64 on the prompt's device, checked
    before any work (TypeError/ValueError naming it)."""
    if not isinstance(continuation, torch.Tensor):
        raise TypeError(f"continuation must be a torch.Tensor of token ids, got {type(continuation).__name__}")
    if continuation.dim() != 2 or continuation.shape[0] != input_ids.shape[0] or continuation.shape[1] < 1:
        raise ValueError(
            f"continuation must be (batch={input_ids.shape[0]}, T>=1) token ids, got {tuple(continuation.shape)}"
        )
    if continuation.is_floating_point() or continuation.is_complex() or continuation.dtype == torch.bool:
        raise TypeError(f"continuation must hold integer token ids, got dtype {continuation.dtype}")
    _check_vocabulary("continuation", continuation, model)
    return continuation.to(input_ids.device, torch.long)


def _check_vocabulary(name: str, ids: torch.Tensor, model: nn.Module) -> None:
    """ValueError when token ids fall outside the model's vocabulary. Checked where reading the ids costs no device
    sync (on a GPU an out-of-range id trips a device assert instead)."""
    if ids.device.type != "cpu":
        return
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) else None
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}) (the vocabulary), got values from {low} to {high}")


def check_no_padding(mask, input_ids: torch.Tensor) -> None:
    """ValueError when `mask` (an attention mask, or None) does not have `input_ids`' shape or marks padding."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    if not bool(mask.bool().all()):  # the one host read at the door, before any work is queued
        raise ValueError(
            "attention_mask has padding: the compressed cache needs equal prompt lengths within a batch "
            "(group prompts by length, or run them one at a time)"
        )


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes a cache: `cache` from transformers 5.2x on,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_cache(
    model: nn.Module,
    method: str | Method,
    budget: float,
    max_new_tokens: int,
    *,
    timer: Timer | None = None,
    compress_in_prefill: bool = True,
    **method_kwargs,
) -> PrefixKVCache:
    """A `PrefixKVCache` sized for `model`; the cache's constructor checks budget, counts and timer (the public door
    every entry point passes), `build_method` the method."""
    return PrefixKVCache(
        decoder_spec(model).num_layers,
        method=build_method(method, **method_kwargs),
        budget=budget,
        max_new_tokens=max_new_tokens,
        timer=timer,
        compress_in_prefill=compress_in_prefill,
    )


def _prefill(model: nn.Module, inputs: Mapping[str, torch.Tensor], cache: PrefixKVCache) -> torch.Tensor:
    """Run the prompt through the model (bound to `cache`); return the last position's logits (batch, vocab)."""
    out = model(**inputs, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def _logits(model: nn.Module, cache: PrefixKVCache, token: torch.Tensor, position: torch.Tensor, argument: str):
    """One decode step: `token` (batch, 1) ids at `position` (batch, 1); returns (batch, vocab) float32 logits."""
    out = model(input_ids=token, position_ids=position, **{argument: cache}, use_cache=True)
    return out.logits[:, -1].float()


_COMPILED: dict[str, object] = {}


def _compiled_logits(device: torch.device):
    """`_logits` under `torch.compile(fullgraph=True)`; CUDA graphs on CUDA. One compiled function per mode, so that
    dynamo's cache (keyed on shapes and guards) is shared by every generation of a process."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_logits, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


class Decoder:
    """Feeds one token per sequence at its true position through a bound model and its compressed cache, eagerly or
    compiled. Holds the position as a device tensor advanced in place: no host value changes between steps."""

    def __init__(self, model: nn.Module, cache: PrefixKVCache, batch: int, compile: bool = False):
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        self.model, self.cache, self.compile = model, cache, compile
        self.argument = cache_argument(model)
        device = cache.step.device
        self.position = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long, device=device)
        self.fn = _compiled_logits(device) if compile else _logits

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """`token`: (batch,) ids; returns their logits (batch, vocab) float32."""
        logits = self.fn(self.model, self.cache, token[:, None], self.position, self.argument)
        if self.compile:
            self.cache.advance()  # the host half of the step, which a compiled graph cannot hold
            self.cache.record_history()
        self.position.add_(1)
        return logits


@torch.inference_mode()
def generate(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    method: str | Method,
    budget: float,
    max_new_tokens: int,
    timer: Timer | None = None,
    compile: bool = False,
    **method_kwargs,
) -> GenerationOutput:
    """Greedy generation of `max_new_tokens` tokens with the prompt's KV cache compressed by `method` at `budget`.

    `inputs` is the dict a tokenizer or processor returns (`input_ids` (batch, seq), `attention_mask`,
    `pixel_values`, ...); all prompts of a batch must have the same length (no padding). Works for decoder-only
    models whose attention modules have q_proj/k_proj/v_proj (Llama, Mistral, Qwen2...) and for LLaVA.
    `timer` marks the regions of the work (`prefixkv.timer`); `compile` runs the decode step compiled.
    """
    input_ids = check_inputs(model, inputs)
    check_count("max_new_tokens", max_new_tokens, 1)
    cache = make_cache(model, method, budget, max_new_tokens, timer=timer, **method_kwargs)
    timer = cache.timer
    with bind(model, cache):
        with timer.region("prefill"):
            token = _prefill(model, inputs, cache).argmax(-1)
            cache.compress()  # a no-op where every layer was compressed during prefill
        decoder = Decoder(model, cache, input_ids.shape[0], compile)
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            with timer.region("decode_step"):
                token = decoder(token).argmax(-1)
            tokens.append(token)
    sequences = torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)
    return GenerationOutput(sequences=sequences, cache_stats=cache.stats())


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    continuation: torch.Tensor,
    *,
    method: str | Method,
    budget: float,
    compile: bool = False,
    **method_kwargs,
) -> torch.Tensor:
    """Log-probability of each token of `continuation` ((batch, T) ids) given the prompt and the tokens before it,
    with the prompt's cache compressed by `method` at `budget` (teacher forcing). Returns (batch, T) float32;
    perplexity is `exp(-mean)`.
    """
    input_ids = check_inputs(model, inputs)
    continuation = check_continuation(model, input_ids, continuation)
    cache = make_cache(model, method, budget, continuation.shape[1], **method_kwargs)
    with bind(model, cache):
        logits = _prefill(model, inputs, cache)
        cache.compress()
        decoder = Decoder(model, cache, input_ids.shape[0], compile)
        logprobs = [torch.log_softmax(logits, -1).gather(-1, continuation[:, :1])]
        for t in range(1, continuation.shape[1]):
            logits = decoder(continuation[:, t - 1])
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, continuation[:, t : t + 1]))
    return torch.cat(logprobs, dim=1)


@torch.inference_mode()
def prefill_scores(model: nn.Module, inputs: Mapping[str, torch.Tensor], method: str | Method = "uniform"):
    """Each layer's importance scores for one prompt ((batch, kv_heads, n) float32 per layer), from `method`'s
    scorer during an uncompressed prefill; calibration reads them."""
    check_inputs(model, inputs)
    cache = make_cache(model, method, 1.0, 0, compress_in_prefill=False)
    if not cache.method.needs_scores:
        raise ValueError(f"method {cache.method.name!r} does not score the prompt")
    with bind(model, cache):
        _prefill(model, inputs, cache)
    return [cache.scores[i] for i in range(len(cache.layers))]


@contextmanager
def attach(
    model: nn.Module,
    *,
    method: str | Method,
    budget: float,
    max_new_tokens: int = 0,
    timer: Timer | None = None,
    **method_kwargs,
) -> Iterator[PrefixKVCache]:
    """Use a compressed cache with `model.generate`::

        with prefixkv.attach(model, method="prefixkv", budget=0.2, max_new_tokens=64) as cache:
            out = model.generate(**inputs, cache=cache, max_new_tokens=64, do_sample=False)

    (`past_key_values=cache` before transformers 5.2x.)

    The cache compresses itself during prefill (or before the first decode step). Needs one `generate` call per
    cache, greedy or sampling (beam search reorders the cache: it raises), and prompts of equal length: the model's
    inputs are checked at each call's prefill as `prefixkv.generate` checks them (a padded `attention_mask` is a
    ValueError), and a second call on the same cache is refused.
    """
    cache = make_cache(model, method, budget, max_new_tokens, timer=timer, **method_kwargs)
    hook = model.register_forward_pre_hook(_attached_call_check(cache), with_kwargs=True)
    try:
        with bind(model, cache):
            yield cache
    finally:
        hook.remove()


def _attached_call_check(cache: PrefixKVCache):
    """A forward pre-hook for an attached model: its prefill (the cache empty) must carry no padding, and once the
    cache is compressed only one-token decode steps may follow (a prompt then means a second `generate` call)."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        tokens = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 1
        if cache.compressed and tokens > 1:
            raise ValueError(
                f"this attached cache has already served a generate call (now given {tokens} new tokens at once): one "
                "cache serves one call; open a new `prefixkv.attach` block for the next one"
            )
        if cache.get_seq_length() == 0 and isinstance(ids, torch.Tensor):
            check_no_padding(kwargs.get("attention_mask"), ids[..., 0] if ids.dim() == 3 else ids)

    return check
