"""Chunks after compression: T tokens in one forward leave the cache, and give the log-probabilities, that T one-token
steps would - for every method and decode policy, eager and compiled, and with one-token steps before and after."""

from __future__ import annotations

import pytest
import torch

import prefixkv
from bench.counters import OpCounter, compile_counters
from prefixkv import generation
from prefixkv.capture import bind
from prefixkv.generation import Decoder, _prefill, make_cache
from tests.models import llava_inputs, text_inputs, tiny_llama, tiny_llava, token_ids

pytestmark = pytest.mark.usefixtures("reference_kernels")

METHODS = list(prefixkv.METHODS)
PROMPT = 40
#: Each decode policy with hyper-parameters that make chunk tokens themselves get evicted inside a chunk.
POLICIES = {
    "grow": {},
    "fixed_position": {"decode": "fixed_position"},
    "fixed_position_distance": {"decode": "fixed_position", "decode_distance": 3},
    "score": {"decode": "score", "decode_recent": 2},
    "score_no_recent": {"decode": "score", "decode_recent": 0},
}
# float32 model: the chunk's attention sums the same terms as the steps' in another order (a few ulps of O(1)
# logits), and its projections run as (T x d) matmuls instead of T (1 x d) ones.
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def fed(model, inputs, method, tokens, schedule, *, budget=0.25, planned=None, compile=False, **kwargs):
    """Prefill, compress, then feed `tokens` (batch, T) in pieces of the sizes in `schedule` (1: a one-token step,
    more: one chunk); returns the log-probabilities after every token (batch, T, vocab) and the cache."""
    assert sum(schedule) == tokens.shape[1]
    cache = make_cache(model, method, 1.0 if method == "full" else budget, planned or tokens.shape[1], **kwargs)
    pieces, start = [], 0
    with torch.no_grad(), bind(model, cache):
        _prefill(model, inputs, cache)
        cache.compress()
        decoder = Decoder(model, cache, tokens.shape[0], compile)
        for size in schedule:
            piece = tokens[:, start : start + size]
            pieces.append(decoder(piece[:, 0])[:, None] if size == 1 else decoder.feed(piece, size, compile))
            start += size
    return torch.log_softmax(torch.cat(pieces, dim=1), -1), cache


def assert_same_cache(a, b):
    assert a.steps == b.steps
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.held_positions(a.steps), y.held_positions(b.steps))
        length = x.length(a.steps)
        torch.testing.assert_close(x.keys[:, :, :length], y.keys[:, :, :length], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_chunk_equals_token_by_token_then_steps_continue(llama, policy):
    """A 14-token chunk, then 3 one-token steps, against 17 one-token steps: same log-probabilities, same entries
    held after every piece, every method."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=3)
    tokens = token_ids(2, 17)
    for method in METHODS:
        kwargs = POLICIES[policy]
        steps, by_step = fed(llama, inputs, method, tokens, [1] * 17, **kwargs)
        chunked, by_chunk = fed(llama, inputs, method, tokens, [14, 1, 1, 1], **kwargs)
        torch.testing.assert_close(chunked, steps, atol=ATOL, rtol=0, msg=f"{method}/{policy}")
        assert torch.equal(chunked.argmax(-1), steps.argmax(-1))
        assert_same_cache(by_chunk, by_step)
        if method != "full" and policy != "grow":
            assert sum(by_chunk.stats().evictions) > 0, "the policy must evict inside the chunk"


@pytest.mark.parametrize("policy", ["grow", "fixed_position_distance", "score"])
def test_chunks_anywhere_in_the_sequence(llama, policy):
    """Steps and chunks interleaved (a step first, two chunks back to back, one of two tokens) match the steps."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=4)
    tokens = token_ids(2, 16, seed=1)
    for method in ("h2o", "prefixkv", "streaming_llm"):
        steps, by_step = fed(llama, inputs, method, tokens, [1] * 16, **POLICIES[policy])
        chunked, by_chunk = fed(llama, inputs, method, tokens, [1, 6, 2, 5, 1, 1], **POLICIES[policy])
        torch.testing.assert_close(chunked, steps, atol=ATOL, rtol=0, msg=f"{method}/{policy}")
        assert_same_cache(by_chunk, by_step)


@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_chunk_beyond_the_plan_grows_the_buffer_as_steps_do(llama, policy):
    """A cache planned for 2 tokens fed a 12-token chunk: the eager path extends the plan and the buffer, as it
    does for steps."""
    inputs = text_inputs(batch=1, seq=PROMPT, seed=2)
    tokens = token_ids(1, 12, seed=2)
    steps, _ = fed(llama, inputs, "snapkv", tokens, [1] * 12, planned=2, window=8, **POLICIES[policy])
    chunked, cache = fed(llama, inputs, "snapkv", tokens, [12], planned=2, window=8, **POLICIES[policy])
    torch.testing.assert_close(chunked, steps, atol=ATOL, rtol=0)
    assert cache.stats().reallocations > 0 or policy != "grow"


def test_chunk_on_llava(reference_kernels):
    model = tiny_llava()
    inputs = llava_inputs(batch=2, text=10, seed=3)
    tokens = token_ids(2, 9, seed=3)
    for method in ("prefixkv", "snapkv"):
        for kwargs in (POLICIES["grow"], POLICIES["score"]):
            steps, _ = fed(model, inputs, method, tokens, [1] * 9, **kwargs)
            chunked, _ = fed(model, inputs, method, tokens, [9], **kwargs)
            torch.testing.assert_close(chunked, steps, atol=ATOL, rtol=0, msg=f"{method}/{kwargs}")


@pytest.mark.parametrize("policy", ["fixed_position", "score"])
def test_chunk_forward_never_synchronises(llama, policy):
    """Everything a chunk needs from the plan is read on the device: no host sync in the whole forward."""
    inputs = text_inputs(batch=2, seq=PROMPT)
    cache = make_cache(llama, "h2o", 0.25, 12, decode=policy)
    with torch.no_grad(), bind(llama, cache):
        _prefill(llama, inputs, cache)
        cache.compress()
        decoder = Decoder(llama, cache, 2)
        with OpCounter() as counted:
            decoder.feed(token_ids(2, 10), 10)
    assert counted.syncs == 0


def test_chunk_refuses_to_be_recorded_step_by_step(llama):
    cache = make_cache(llama, "uniform", 0.5, 4)
    for layer in cache.layers:
        layer.history = []
    with torch.no_grad(), bind(llama, cache):
        _prefill(llama, text_inputs(batch=1, seq=20), cache)
        cache.compress()
        with pytest.raises(ValueError, match="one-token step"):
            Decoder(llama, cache, 1).feed(token_ids(1, 3), 3)


# --- compiled ---------------------------------------------------------------------------------------------------


@pytest.fixture
def dynamo_only(monkeypatch):
    """dynamo's capture alone (backend="eager"): checks fullgraph and recompiles in seconds."""
    torch._dynamo.reset()
    step = torch.compile(generation._logits, fullgraph=True, dynamic=False, backend="eager")
    chunk = torch.compile(generation._chunk_logits, fullgraph=True, dynamic=False, backend="eager")
    monkeypatch.setattr(generation, "_compiled_logits", lambda device: step)
    monkeypatch.setattr(generation, "_compiled_chunk_logits", lambda: chunk)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["fixed_position", "score"])
def test_compiled_chunk_and_steps_after_it_match_eager(llama, dynamo_only, policy):
    """A compiled chunk, then compiled one-token steps: one graph each, no break, the eager step-by-step result."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=6)
    tokens = token_ids(2, 8, seed=6)
    kwargs = {"decode": policy, "decode_recent": 2}
    steps, by_step = fed(llama, inputs, "snapkv", tokens, [1] * 8, window=8, **kwargs)
    with compile_counters() as counted:
        compiled, by_compiled = fed(llama, inputs, "snapkv", tokens, [5, 1, 1, 1], compile=True, window=8, **kwargs)
    assert counted["graph_breaks"] == 0
    assert counted["graphs"] <= 2, f"{counted['graphs']} graphs: one for the chunk, one for the step"
    torch.testing.assert_close(compiled, steps, atol=ATOL, rtol=0)
    assert_same_cache(by_compiled, by_step)


def test_generate_with_a_question_compiled_matches_eager(llama, dynamo_only):
    """The question runs as an eager chunk, the steps after it compiled: one graph (the step's), the eager tokens."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=8)
    kwargs = {"method": "prefixkv", "budget": 0.25, "max_new_tokens": 6, "decode": "fixed_position"}
    eager = prefixkv.generate(llama, inputs, question=token_ids(2, 5, seed=8), **kwargs)
    with compile_counters() as counted:
        compiled = prefixkv.generate(llama, inputs, question=token_ids(2, 5, seed=8), compile=True, **kwargs)
    assert counted["graph_breaks"] == 0 and counted["graphs"] == 1
    assert torch.equal(compiled.sequences, eager.sequences)


def test_compiled_continuation_logprobs_match_eager(llama, dynamo_only):
    inputs = text_inputs(batch=2, seq=PROMPT, seed=7)
    continuation = token_ids(2, 9, seed=7)
    kwargs = {"method": "h2o", "budget": 0.25, "decode": "fixed_position"}
    eager = prefixkv.continuation_logprobs(llama, inputs, continuation, **kwargs)
    compiled = prefixkv.continuation_logprobs(llama, inputs, continuation, compile=True, **kwargs)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)


# --- the public functions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_continuation_logprobs_equal_token_by_token(llama, policy):
    """continuation_logprobs scores in one chunk; the reference feeds the continuation one token per step."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=8)
    continuation = token_ids(2, 10, seed=8)
    for method in METHODS:
        budget = 1.0 if method == "full" else 0.25
        kwargs = {"decode": policy, "decode_recent": 2}
        got = prefixkv.continuation_logprobs(llama, inputs, continuation, method=method, budget=budget, **kwargs)
        cache = make_cache(llama, method, budget, 10, **kwargs)
        with torch.no_grad(), bind(llama, cache):
            logits = [_prefill(llama, inputs, cache)]
            cache.compress()
            decoder = Decoder(llama, cache, 2)
            logits += [decoder(continuation[:, t]) for t in range(9)]
        expected = torch.log_softmax(torch.stack(logits, 1), -1).gather(-1, continuation[..., None])[..., 0]
        assert got.shape == (2, 10) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{method}/{policy}")


@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_question_after_the_compressed_prompt(llama, policy):
    """generate(question=) and continuation_logprobs(question=) equal feeding the question one token per step
    after compression; the sequences hold prompt, question and new tokens."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=9)
    question = token_ids(2, 7, seed=9)
    kwargs = {"method": "uniform", "budget": 0.25, "decode": policy, "decode_recent": 2}
    out = prefixkv.generate(llama, inputs, question=question, max_new_tokens=6, **kwargs)
    assert out.sequences.shape == (2, PROMPT + 7 + 6)
    assert torch.equal(out.sequences[:, :PROMPT], inputs["input_ids"])
    assert torch.equal(out.sequences[:, PROMPT : PROMPT + 7], question)
    new = out.sequences[:, PROMPT + 7 :]
    everything = torch.cat([question, new], dim=1)
    # The question's last token predicts the first new token: the greedy sequence is its own argmax.
    reference, _ = fed(llama, inputs, "uniform", everything, [1] * 13, decode=policy, decode_recent=2)
    assert torch.equal(reference[:, 6:-1].argmax(-1), new)
    logprobs = prefixkv.continuation_logprobs(llama, inputs, new, question=question, **kwargs)
    expected = reference[:, 6:-1].gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(logprobs, expected, atol=ATOL, rtol=0)
    assert out.cache_stats.held == [layer.length(12) for layer in _planned_cache(llama, inputs, 13, **kwargs).layers]


def _planned_cache(model, inputs, planned, method, budget, **kwargs):
    cache = make_cache(model, method, budget, planned, **kwargs)
    with torch.no_grad(), bind(model, cache):
        _prefill(model, inputs, cache)
        cache.compress()
    return cache


def test_question_is_checked(llama):
    inputs = text_inputs(batch=2, seq=20)
    kwargs = {"method": "uniform", "budget": 0.5, "max_new_tokens": 2}
    with pytest.raises(ValueError, match=r"question must be \(batch=2"):
        prefixkv.generate(llama, inputs, question=token_ids(1, 3), **kwargs)
    with pytest.raises(TypeError, match="question must hold integer token ids"):
        prefixkv.generate(llama, inputs, question=torch.zeros(2, 3), **kwargs)
    with pytest.raises(ValueError, match=r"question must lie in \[0, 96\)"):
        prefixkv.generate(llama, inputs, question=torch.full((2, 3), 96), **kwargs)
    with pytest.raises(TypeError, match="question must be a torch.Tensor"):
        prefixkv.continuation_logprobs(llama, inputs, token_ids(2, 2), method="full", budget=1.0, question=[1, 2])


# --- CUDA ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_cuda_chunk_never_synchronises_and_graph_steps_follow(policy):
    """On CUDA: a chunk forward makes the host wait for nothing (CUDA's sync debug mode turns a sync into an error),
    and CUDA-graph steps after it reproduce the eager steps (as `generate(question=..., compile=True)` runs)."""
    torch._dynamo.reset()
    model = tiny_llama().cuda()
    inputs = {"input_ids": text_inputs(batch=2, seq=PROMPT, seed=6)["input_ids"].cuda()}
    tokens = token_ids(2, 12, seed=6).cuda()
    kwargs = {"decode": policy, "decode_recent": 2}
    steps, _ = fed(model, inputs, "snapkv", tokens, [1] * 12, window=8, **kwargs)
    cache = make_cache(model, "snapkv", 0.25, 12, window=8, **kwargs)
    with torch.no_grad(), bind(model, cache):
        _prefill(model, inputs, cache)
        cache.compress()
        decoder = Decoder(model, cache, 2, compile=True)  # CUDA graphs for the steps; the chunk runs eagerly
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            chunk = decoder.feed(tokens[:, :8], 8)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        after = [decoder(tokens[:, t])[:, None] for t in range(8, 12)]
    compiled = torch.log_softmax(torch.cat([chunk, *after], dim=1), -1)
    torch.testing.assert_close(compiled, steps, atol=1e-3, rtol=1e-3)
