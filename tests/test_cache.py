"""The compressed cache end to end: equality at full budget, the eviction oracle, sizes, order, buffers, LLaVA."""

from __future__ import annotations

import contextlib

import pytest
import torch

import prefixkv
from prefixkv.capture import bind
from prefixkv.generation import Decoder, _prefill, cache_argument, make_cache
from tests.models import llava_inputs, text_inputs, tiny_llama, tiny_llava
from tests.oracle import oracle_logits

pytestmark = pytest.mark.usefixtures("reference_kernels")

METHOD_NAMES = list(prefixkv.METHODS)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


def compressed_logits(model, inputs, method, budget, tokens, *, compile=False, **kwargs):
    """Decode `tokens` (batch, T) with a compressed cache; logits (batch, T - 1, vocab) after each of the first
    T - 1 tokens, and the cache."""
    cache = make_cache(model, method, budget, tokens.shape[1], **kwargs)
    for layer in cache.layers:
        layer.history = []
    with torch.no_grad(), bind(model, cache):
        _prefill(model, inputs, cache)
        cache.compress()
        decoder = Decoder(model, cache, tokens.shape[0], compile)
        logits = [decoder(tokens[:, t]) for t in range(tokens.shape[1] - 1)]
    return torch.stack(logits, dim=1), cache


def prefill(model, inputs, cache):
    with bind(model, cache):
        _prefill(model, inputs, cache)


def steps(model, cache, token, n):
    """Feed `token` ((batch,) ids) and then `n - 1` greedy tokens through a prefilled, compressed cache."""
    with bind(model, cache):
        decoder = Decoder(model, cache, token.shape[0])
        for _ in range(n):
            token = decoder(token).argmax(-1)
    return token


class RegionCounter:
    """A test timer: counts how often each region was entered."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def region(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1
        return contextlib.nullcontext()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_full_budget_equals_full_cache(llama, method):
    inputs = text_inputs(batch=2, seq=30)
    expected = llama.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    out = prefixkv.generate(llama, inputs, method=method, budget=1.0, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, expected)
    assert out.cache_stats.kept == [30] * 3


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_oracle(llama, method, budget):
    # A 50-token prompt with rope_theta=50: a decode step at the kept length instead of the true position
    # rotates the query by up to 40 positions and changes the logits far beyond the tolerance.
    inputs = text_inputs(batch=2, seq=50, seed=3)
    out = prefixkv.generate(llama, inputs, method=method, budget=budget, max_new_tokens=NEW_TOKENS)
    generated = out.sequences[:, 50:]
    logits, cache = compressed_logits(llama, inputs, method, budget, generated)
    positions = [layer.positions for layer in cache.layers]
    expected = oracle_logits(llama, inputs, generated, positions)
    # fp32 model vs float64 attention in the oracle: differences are rounding of a few ops on O(1) logits.
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


def test_oracle_detects_wrong_positions(llama):
    """The oracle is sharp enough to see a RoPE bug: decoding at the kept length instead of the true position."""
    inputs = text_inputs(batch=1, seq=50, seed=3)
    out = prefixkv.generate(llama, inputs, method="prefixkv", budget=0.2, max_new_tokens=NEW_TOKENS)
    generated = out.sequences[:, 50:]
    cache = make_cache(llama, "prefixkv", 0.2, NEW_TOKENS)
    with torch.no_grad():
        prefill(llama, inputs, cache)
        cache.compress()
        wrong = cache.layers[0].kept
        position = torch.tensor([[wrong]])
        argument = cache_argument(llama)
        with bind(llama, cache):
            logits = llama(input_ids=generated[:, :1], position_ids=position, **{argument: cache}).logits[:, -1]
    expected = oracle_logits(llama, inputs, generated, [layer.positions for layer in cache.layers])[:, 0]
    assert (logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cache_holds_allocated_counts_in_order(llama, method):
    inputs = text_inputs(batch=2, seq=40)
    budget = 0.25
    cache = make_cache(llama, method, budget, NEW_TOKENS, compress_in_prefill=False)
    with torch.no_grad():
        prefill(llama, inputs, cache)
        scores = [cache.scores.get(i) for i in range(3)]
        cache.compress()
    kept = [layer.positions.shape[-1] for layer in cache.layers]
    if method == "full":
        assert kept == [40] * 3
    else:
        assert sum(kept) == round(budget * 40 * 3)
    for layer in cache.layers:
        pos = layer.positions
        assert pos.shape[:2] == (2, 2)
        assert bool((pos[..., 1:] > pos[..., :-1]).all()), "kept positions must stay in original order"
        assert layer.capacity >= pos.shape[-1] + NEW_TOKENS - 1
        assert bool((layer.keys[:, :, pos.shape[-1] :] == 0).all()), "unused slots must be zero, never garbage"
    if method in ("prefixkv", "uniform"):
        assert all(s is not None for s in scores)


def test_compacted_entries_are_the_kept_ones(llama):
    inputs = text_inputs(batch=2, seq=40)
    cache = make_cache(llama, "h2o", 0.3, NEW_TOKENS, compress_in_prefill=False)
    with torch.no_grad():
        prefill(llama, inputs, cache)
        full_keys = [layer.keys.clone() for layer in cache.layers]
        cache.compress()
    for layer, keys in zip(cache.layers, full_keys, strict=False):
        idx = layer.positions[..., None].expand(-1, -1, -1, keys.shape[-1])
        kept = layer.positions.shape[-1]
        torch.testing.assert_close(layer.keys[:, :, :kept], torch.gather(keys, 2, idx), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["uniform", "h2o", "snapkv", "streaming_llm", "pyramidkv"])
def test_compression_during_prefill_equals_compression_after(llama, method):
    """Layers compressed right after their own prefill attention hold exactly what `compress()` after prefill keeps,
    and never hold every layer's full prompt cache at once."""
    inputs = text_inputs(batch=2, seq=40)
    late = make_cache(llama, method, 0.3, NEW_TOKENS, compress_in_prefill=False)
    early = make_cache(llama, method, 0.3, NEW_TOKENS)
    with torch.no_grad():
        prefill(llama, inputs, late)
        assert not any(layer.compressed for layer in late.layers)
        late.compress()
        prefill(llama, inputs, early)
    assert early.compressed, "sizes known up front: each layer compresses during prefill"
    for a, b in zip(early.layers, late.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys)


def test_online_prefixkv_compresses_after_prefill(llama):
    inputs = text_inputs(batch=1, seq=40)
    cache = make_cache(llama, "prefixkv", 0.3, NEW_TOKENS)
    with torch.no_grad():
        prefill(llama, inputs, cache)
    assert not any(layer.compressed for layer in cache.layers), "online PrefixKV needs every layer's scores first"
    assert sorted(cache.scores) == [0, 1, 2]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_decode_runs_to_max_new_tokens_without_reallocating(llama, method):
    inputs = text_inputs(batch=2, seq=40)
    timer = RegionCounter()
    out = prefixkv.generate(llama, inputs, method=method, budget=0.2, max_new_tokens=12, timer=timer)
    assert out.sequences.shape == (2, 52)
    assert out.cache_stats.reallocations == 0
    assert timer.counts["decode_step"] == 11
    assert timer.counts["prefill"] == 1
    head_bytes = 2 * 2 * 16 * 4  # batch x kv_heads x head_dim x fp32
    assert out.cache_stats.bytes == [2 * (k + 11) * head_bytes for k in out.cache_stats.kept]


def test_buffer_is_written_in_place(llama):
    inputs = text_inputs(batch=1, seq=30)
    cache = make_cache(llama, "snapkv", 0.5, 4, window=8)
    with torch.no_grad():
        prefill(llama, inputs, cache)
        cache.compress()
        buffers = [layer.keys.data_ptr() for layer in cache.layers]
        steps(llama, cache, torch.tensor([5]), 4)
    assert [layer.keys.data_ptr() for layer in cache.layers] == buffers
    assert cache.stats().reallocations == 0


def test_overrun_grows_instead_of_failing(llama):
    inputs = text_inputs(batch=1, seq=20)
    cache = make_cache(llama, "uniform", 0.5, 1)
    with torch.no_grad():
        prefill(llama, inputs, cache)
        cache.compress()
        steps(llama, cache, torch.tensor([5]), 3)
    assert cache.stats().reallocations > 0
    assert cache.stats().held[0] == 10 + 3


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_llava_generates(llava, method, batch):
    inputs = llava_inputs(batch=batch)
    out = prefixkv.generate(llava, inputs, method=method, budget=0.3, max_new_tokens=5)
    prompt = inputs["input_ids"].shape[1]
    assert out.sequences.shape == (batch, prompt + 5)
    assert len(out.cache_stats.kept) == 2
    if method != "full":
        assert sum(out.cache_stats.kept) == round(0.3 * prompt * 2)
    full = prefixkv.generate(llava, inputs, method=method, budget=1.0, max_new_tokens=5)
    assert torch.equal(full.sequences, llava.generate(**inputs, max_new_tokens=5, do_sample=False))


def test_llava_oracle(llava):
    inputs = llava_inputs(batch=2, text=20)
    out = prefixkv.generate(llava, inputs, method="prefixkv", budget=0.3, max_new_tokens=NEW_TOKENS)
    prompt = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt:]
    logits, cache = compressed_logits(llava, inputs, "prefixkv", 0.3, generated)
    expected = oracle_logits(llava, inputs, generated, [layer.positions for layer in cache.layers])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_generate_with_attached_cache(llama, attn):
    inputs = text_inputs(batch=2, seq=40)
    expected = prefixkv.generate(llama, inputs, method="prefixkv", budget=0.3, max_new_tokens=NEW_TOKENS)
    llama.set_attn_implementation(attn)
    try:
        with prefixkv.attach(llama, method="prefixkv", budget=0.3, max_new_tokens=NEW_TOKENS) as cache:
            argument = cache_argument(llama)
            sequences = llama.generate(
                **inputs, **{argument: cache}, max_new_tokens=NEW_TOKENS, do_sample=False
            )
    finally:
        llama.set_attn_implementation("sdpa")
    assert torch.equal(sequences, expected.sequences)
    assert cache.stats().kept == expected.cache_stats.kept


def test_continuation_logprobs_match_generation(llama):
    inputs = text_inputs(batch=2, seq=40)
    out = prefixkv.generate(llama, inputs, method="snapkv", budget=0.3, max_new_tokens=NEW_TOKENS, window=8)
    greedy = out.sequences[:, 40:]
    logprobs = prefixkv.continuation_logprobs(llama, inputs, greedy, method="snapkv", budget=0.3, window=8)
    assert logprobs.shape == (2, NEW_TOKENS)
    assert bool((logprobs <= 0).all())
    full = prefixkv.continuation_logprobs(llama, inputs, greedy, method="full", budget=1.0)
    assert full.shape == logprobs.shape


class _PrefillWatch:
    """A timer that notes, whenever a layer is compacted, how many layers hold their full prompt cache."""

    def __init__(self):
        self.cache = None
        self.full_layers: list[int] = []

    def region(self, name):
        if name == "compact":
            held = [layer for layer in self.cache.layers if layer.keys is not None and not layer.compressed]
            self.full_layers.append(len(held))
        return contextlib.nullcontext()


@pytest.mark.parametrize(("method", "kwargs"), [("uniform", {}), ("snapkv", {"window": 8}), ("pyramidkv", {})])
def test_prefill_holds_one_full_layer_at_a_time(method, kwargs):
    """Peak memory of prefill: weights + the compressed layers so far + one layer's full prompt cache."""
    model = tiny_llama(layers=6)
    watch = _PrefillWatch()
    cache = make_cache(model, method, 0.25, 4, timer=watch, **kwargs)
    watch.cache = cache
    with torch.no_grad():
        prefill(model, text_inputs(batch=1, seq=40), cache)
    assert watch.full_layers == [1] * 6
    assert cache.compressed


@pytest.mark.parametrize("method", ["uniform", "h2o", "snapkv"])
def test_scores_from_the_attention_log_sum_exp_equal_two_pass_scores(llama, method, monkeypatch):
    """Scoring inside attention reuses the flash kernel's log-sum-exp: the scores equal a scorer's own two passes."""
    from prefixkv import attention

    inputs = text_inputs(batch=2, seq=40, seed=7)
    one_pass = prefixkv.prefill_scores(llama, inputs, method)
    calls = []
    monkeypatch.setattr(attention, "_flash_with_lse", lambda *args: calls.append(1))
    two_pass = prefixkv.prefill_scores(llama, inputs, method)
    assert len(calls) == 3, "every layer asked for the log-sum-exp"
    for a, b in zip(one_pass, two_pass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
