"""Decode-time policies: the budget held at every step, no reallocation, and the eviction oracle step by step."""

from __future__ import annotations

import math

import pytest
import torch

import prefixkv
from prefixkv.policy import FixedPosition, Grow, decode_policy
from tests.models import text_inputs, tiny_llama
from tests.oracle import oracle_logits
from tests.test_cache import compressed_logits

pytestmark = pytest.mark.usefixtures("reference_kernels")

PROMPT, NEW = 40, 16


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("policy", ["fixed_position", "score"])
@pytest.mark.parametrize("method", [m for m in prefixkv.METHODS if m != "full"])
def test_budget_held_every_step_and_oracle(llama, method, policy):
    inputs = text_inputs(batch=2, seq=PROMPT, seed=5)
    kwargs = {"decode": policy, "decode_recent": 4}
    out = prefixkv.generate(llama, inputs, method=method, budget=0.25, max_new_tokens=NEW, **kwargs)
    assert out.cache_stats.reallocations == 0
    generated = out.sequences[:, PROMPT:]
    logits, cache = compressed_logits(llama, inputs, method, 0.25, generated, **kwargs)
    for layer in cache.layers:
        ratio = layer.positions.shape[-1] / PROMPT
        assert len(layer.history) == NEW - 1
        for t, held in enumerate(layer.history):
            seen = PROMPT + t + 1
            assert held.shape[-1] <= math.ceil(ratio * seen) + 1, f"step {t}: {held.shape[-1]} entries"
            assert bool((held[..., 1:] > held[..., :-1]).all()), "a position is held twice"
            assert int(held.max()) == seen - 1, "the newest token must be held"
        assert layer.evictions(cache.steps) > 0
        assert layer.reallocations == 0
    expected = oracle_logits(llama, inputs, generated, [layer.history for layer in cache.layers])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


def test_grow_keeps_every_generated_token(llama):
    inputs = text_inputs(batch=1, seq=PROMPT)
    out = prefixkv.generate(llama, inputs, method="uniform", budget=0.25, max_new_tokens=NEW)
    assert out.cache_stats.held == [k + NEW - 1 for k in out.cache_stats.kept]
    assert out.cache_stats.evictions == [0, 0, 0]


def test_fixed_position_drops_at_the_anchor(llama):
    inputs = text_inputs(batch=1, seq=PROMPT)
    distance = 2
    out = prefixkv.generate(
        llama, inputs, method="streaming_llm", budget=0.25, max_new_tokens=NEW,
        decode="fixed_position", decode_distance=distance, sinks=4,
    )
    kept = out.cache_stats.kept[0]
    held = out.cache_stats.positions[0][0, 0].tolist()
    prompt_part = [p for p in held if p < PROMPT]
    # The prompt entries before the anchor survive; from the anchor on, entries are consumed in order.
    original = [0, 1, 2, 3] + list(range(PROMPT - (kept - 4), PROMPT))
    assert prompt_part == original[: kept - 1 - distance]
    generated_part = [p for p in held if p >= PROMPT]
    assert generated_part == list(range(generated_part[0], PROMPT + NEW - 1)), "a recent window of generated tokens"


def test_score_spares_recent_tokens(llama):
    inputs = text_inputs(batch=2, seq=PROMPT)
    recent = 6
    out = prefixkv.generate(
        llama, inputs, method="h2o", budget=0.25, max_new_tokens=NEW, decode="score", decode_recent=recent
    )
    last = PROMPT + NEW - 1  # tokens written into the cache
    for held in out.cache_stats.positions:
        for window in held.reshape(-1, held.shape[-1]):
            assert set(range(last - recent, last)) <= set(window.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decode": "lru"}, "unknown decode policy 'lru'"),
        ({"decode": "fixed_position", "decode_distance": -1}, "distance"),
        ({"decode": "score", "decode_recent": -3}, "recent"),
    ],
)
def test_bad_policy(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prefixkv.build_method("prefixkv", **kwargs)


def test_capacity_is_the_policy_limit():
    policy = FixedPosition()
    assert policy.capacity(kept=10, prompt=40, max_new_tokens=100) == math.ceil(0.25 * 140) + 1
    assert Grow().capacity(kept=10, prompt=40, max_new_tokens=100) == 110
    assert decode_policy("fixed_position", distance=3) == FixedPosition(3)
