"""Greedy generation and teacher-forced scoring with a compressed KV cache: prefill (scoring and compressing as it
goes), then, after compression, chunks of several tokens in one forward (a question, a continuation to score) and
one token per step through a static-shape decode step, eager or compiled.

Both protocols of the field are expressible: query-aware (the question is part of `inputs`, so it is compressed with
the context) and query-agnostic (`question=`: the context is compressed first, then the question is fed after it as
one chunk and cached under the method's decode policy, as if fed token by token).

No function here reads a clock or synchronises the device: a caller that wants timings passes a `timer`
(`prefixkv.timer`), whose regions "prefill", "score", "allocate", "compact", "chunk" and "decode_step" mark exactly
that work. With `compile=True` the decode step runs under `torch.compile(fullgraph=True)` - on CUDA with
`mode="reduce-overhead"`, so that each step replays one CUDA graph instead of launching a kernel per operation from
Python.
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
from prefixkv.timer import Timer, check_timer


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


def check_token_ids(model: nn.Module, name: str, ids, input_ids: torch.Tensor) -> torch.Tensor:
    """`ids`, (batch, T) token ids that follow the prompt (a continuation, a question), as int64 on the prompt's
    device, checked before any work (TypeError/ValueError naming `name` and the value)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] != input_ids.shape[0] or ids.shape[1] < 1:
        raise ValueError(f"{name} must be (batch={input_ids.shape[0]}, T>=1) token ids, got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    _check_vocabulary(name, ids, model)
    return ids.to(input_ids.device, torch.long)


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


def _chunk_logits(
    model: nn.Module, cache: PrefixKVCache, tokens: torch.Tensor, positions: torch.Tensor, argument: str, keep: int
):
    """A chunk after compression: `tokens` (batch, T) ids at `positions` (batch, T) in one forward; returns the
    logits of its last `keep` positions, (batch, keep, vocab) float32 (the lm_head runs on those only)."""
    out = model(input_ids=tokens, position_ids=positions, **{argument: cache}, use_cache=True, logits_to_keep=keep)
    return out.logits.float()


_COMPILED: dict[str, object] = {}


def _compiled_logits(device: torch.device):
    """`_logits` under `torch.compile(fullgraph=True)`; CUDA graphs on CUDA. One compiled function per mode, so that
    dynamo's cache (keyed on shapes and guards) is shared by every generation of a process."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_logits, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


def _compiled_chunk_logits():
    """`_chunk_logits` under `torch.compile(fullgraph=True)`, without CUDA graphs: a chunk runs once per cache."""
    if "chunk" not in _COMPILED:
        _COMPILED["chunk"] = torch.compile(_chunk_logits, fullgraph=True, dynamic=False)
    return _COMPILED["chunk"]


class Decoder:
    """Feeds tokens at their true positions through a bound model and its compressed cache: one per sequence and
    step (`__call__`, compiled when `compile`), or a chunk of several in one forward (`feed`). Holds the position as
    a device tensor advanced in place: no host value changes between steps."""

    def __init__(self, model: nn.Module, cache: PrefixKVCache, batch: int, compile: bool = False):
        check_compile(compile)
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

    def feed(self, tokens: torch.Tensor, keep: int, compile: bool = False) -> torch.Tensor:
        """`tokens`: (batch, T) ids, in one forward that leaves the cache as T one-token steps would (teacher
        forcing); returns the logits of the last `keep` of them, (batch, keep, vocab) float32. `compile` runs that
        forward under `torch.compile(fullgraph=True)` (one graph per chunk length)."""
        count = tokens.shape[1]
        if count == 1:
            return self(tokens[:, 0])[:, None]
        positions = self.position + torch.arange(count, device=self.position.device)
        forward = _compiled_chunk_logits() if compile else _chunk_logits
        logits = forward(self.model, self.cache, tokens, positions, self.argument, keep)
        if compile:
            self.cache.advance(count)  # the host half, which a compiled graph cannot hold
        self.position.add_(count)
        return logits


def check_compile(compile) -> bool:
    """`compile`, or TypeError unless it is True or False."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    return compile


def fed_after_compression(question: torch.Tensor | None, tokens: int) -> int:
    """Decode steps a cache is planned for: the question's tokens and `tokens` more (so nothing reallocates)."""
    return tokens + (0 if question is None else question.shape[1])


def score_continuation(
    decoder: Decoder,
    last_logits: torch.Tensor,
    continuation: torch.Tensor,
    question: torch.Tensor | None = None,
    timer: Timer | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Log-probabilities (batch, T) float32 of `continuation` (batch, T) after a compressed prompt whose last
    position gave `last_logits` (batch, vocab) and after `question` (batch, Tq) if given: one chunk forward of
    the question and the continuation's first T - 1 tokens (teacher forcing), compiled if `compile`."""
    count = continuation.shape[1]
    with check_timer(timer).region("chunk"):
        if question is None:
            logits = last_logits[:, None]
            if count > 1:
                logits = torch.cat([logits, decoder.feed(continuation[:, :-1], count - 1, compile)], dim=1)
        else:
            logits = decoder.feed(torch.cat([question, continuation[:, :-1]], dim=1), count, compile)
        return torch.log_softmax(logits, -1).gather(-1, continuation[..., None])[..., 0]


def greedy_tokens(
    decoder: Decoder,
    last_logits: torch.Tensor,
    max_new_tokens: int,
    question: torch.Tensor | None = None,
    timer: Timer | None = None,
) -> torch.Tensor:
    """`max_new_tokens` greedy tokens (batch, new) after a compressed prompt whose last position gave `last_logits`
    (batch, vocab), and after `question` (batch, Tq), fed as one eager chunk, if given (its length varies from
    prompt to prompt: compiling it would compile a graph per length)."""
    timer = check_timer(timer)
    if question is not None:
        with timer.region("chunk"):
            last_logits = decoder.feed(question, 1)[:, -1]
    token = last_logits.argmax(-1)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        with timer.region("decode_step"):
            token = decoder(token).argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    method: str | Method,
    budget: float,
    max_new_tokens: int,
    question: torch.Tensor | None = None,
    timer: Timer | None = None,
    compile: bool = False,
    **method_kwargs,
) -> GenerationOutput:
    """Greedy generation of `max_new_tokens` tokens with the prompt's KV cache compressed by `method` at `budget`.

    `inputs` is the dict a tokenizer or processor returns (`input_ids` (batch, seq), `attention_mask`,
    `pixel_values`, ...); all prompts of a batch must have the same length (no padding). Works for decoder-only
    models whose attention modules have q_proj/k_proj/v_proj (Llama, Mistral, Qwen2...) and for LLaVA.
    `question` ((batch, Tq) ids, optional): fed after the compressed prompt as one chunk, uncompressed (cached under
    the method's decode policy, like generated tokens), before generation starts: the query-agnostic protocol.
    `timer` marks the regions of the work (`prefixkv.timer`); `compile` runs the decode step compiled (the
    question's chunk runs eagerly). `sequences` are the prompt, the question (if any) and the new tokens.
    """
    input_ids = check_inputs(model, inputs)
    check_count("max_new_tokens", max_new_tokens, 1)
    if question is not None:
        question = check_token_ids(model, "question", question, input_ids)
    planned = fed_after_compression(question, max_new_tokens)
    cache = make_cache(model, method, budget, planned, timer=timer, **method_kwargs)
    timer = cache.timer
    with bind(model, cache):
        with timer.region("prefill"):
            logits = _prefill(model, inputs, cache)
            cache.compress()  # a no-op where every layer was compressed during prefill
        decoder = Decoder(model, cache, input_ids.shape[0], compile)
        new = greedy_tokens(decoder, logits, max_new_tokens, question, timer)
    parts = [input_ids] if question is None else [input_ids, question.to(input_ids.dtype)]
    sequences = torch.cat([*parts, new.to(input_ids.dtype)], dim=1)
    return GenerationOutput(sequences=sequences, cache_stats=cache.stats())


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    continuation: torch.Tensor,
    *,
    method: str | Method,
    budget: float,
    question: torch.Tensor | None = None,
    compile: bool = False,
    **method_kwargs,
) -> torch.Tensor:
    """Log-probability of each token of `continuation` ((batch, T) ids) given the prompt and the tokens before it,
    with the prompt's cache compressed by `method` at `budget` (teacher forcing). Returns (batch, T) float32;
    perplexity is `exp(-mean)`.

    The continuation is scored in one forward over the compressed cache (a chunk of T - 1 tokens), equal to feeding
    it one token per step. `question` ((batch, Tq) ids, optional) comes between the compressed prompt and the
    continuation, uncompressed, in the same chunk (query-agnostic protocol). `compile=True` runs that forward under
    `torch.compile(fullgraph=True)`: a forward run once rarely repays its compilation, but dynamo's cache is shared
    by every call of a process with the same shapes (one graph per chunk length and cache layout).
    """
    check_compile(compile)
    input_ids = check_inputs(model, inputs)
    continuation = check_token_ids(model, "continuation", continuation, input_ids)
    if question is not None:
        question = check_token_ids(model, "question", question, input_ids)
    planned = fed_after_compression(question, continuation.shape[1])
    cache = make_cache(model, method, budget, planned, **method_kwargs)
    with bind(model, cache):
        logits = _prefill(model, inputs, cache)
        cache.compress()
        decoder = Decoder(model, cache, input_ids.shape[0])
        return score_continuation(decoder, logits, continuation, question, compile=compile)


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
