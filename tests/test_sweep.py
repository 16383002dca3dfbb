"""Prefill once, compress many: every method x budget from one prefill equals the per-pair functions, each scorer runs
once per layer, and the sweep holds one prefill and one compressed cache at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import prefixkv
from prefixkv.methods.uniform import Uniform
from tests.models import llava_inputs, text_inputs, tiny_llama, tiny_llava, token_ids
from tests.test_cache import RegionCounter

pytestmark = pytest.mark.usefixtures("reference_kernels")

METHODS = list(prefixkv.METHODS)
BUDGETS = [0.25, 0.5]
PROMPT = 40
# The sweep runs the very code of the per-pair functions on the same prefill tensors; the tolerance is the task's
# (float32 log-probabilities), though the results are in practice bit-identical.
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _per_pair(model, inputs, label, budget, continuation, question, **kwargs):
    # The reference cell is the default full cache, whatever the sweep's keyword arguments.
    kwargs = {} if (label, budget) == ("full", 1.0) else kwargs
    logprobs = prefixkv.continuation_logprobs(
        model, inputs, continuation, method=label, budget=budget, question=question, **kwargs
    )
    new = continuation.shape[1]
    sequences = prefixkv.generate(
        model, inputs, method=label, budget=budget, max_new_tokens=new, question=question, **kwargs
    ).sequences
    return logprobs, sequences[:, -new:]


def _assert_sweep_equals_per_pair(model, inputs, continuation, question=None, methods=METHODS, **kwargs):
    logprobs = prefixkv.sweep_logprobs(
        model, inputs, continuation, methods=methods, budgets=BUDGETS, question=question, **kwargs
    )
    generated = prefixkv.sweep_generate(
        model, inputs, methods=methods, budgets=BUDGETS, max_new_tokens=continuation.shape[1], question=question,
        **kwargs,
    )
    expected_keys = [(m, b) for m in methods for b in BUDGETS] + [("full", 1.0)]
    assert list(logprobs) == expected_keys and list(generated) == expected_keys
    batch, count = continuation.shape
    for (label, budget), got in logprobs.items():
        want_logprobs, want_tokens = _per_pair(model, inputs, label, budget, continuation, question, **kwargs)
        assert got.shape == (batch, count) and got.dtype == torch.float32
        torch.testing.assert_close(got, want_logprobs, atol=ATOL, rtol=0, msg=f"{label} @ {budget}")
        tokens = generated[(label, budget)]
        assert tokens.shape == (batch, count) and tokens.dtype == torch.int64
        assert torch.equal(tokens, want_tokens), f"{label} @ {budget}"


@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_sweep_equals_each_pair(llama, policy):
    inputs = text_inputs(batch=2, seq=PROMPT, seed=3)
    _assert_sweep_equals_per_pair(llama, inputs, token_ids(2, 6), decode=policy, decode_recent=2)


@pytest.mark.parametrize("policy", ["grow", "score"])
def test_per_head_budgets_in_a_sweep_equal_each_pair(llama, policy):
    """Packed layers (head_budgets='adaptive') compressed from the shared prefill, beside per-layer variants."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=5)
    methods = ["prefixkv[head_budgets='adaptive',per_kv_head=True]", "snapkv[head_budgets='adaptive']", "snapkv"]
    _assert_sweep_equals_per_pair(llama, inputs, token_ids(2, 5, seed=4), methods=methods, decode=policy)


def test_sweep_with_a_question_equals_each_pair(llama):
    inputs = text_inputs(batch=2, seq=PROMPT, seed=4)
    _assert_sweep_equals_per_pair(llama, inputs, token_ids(2, 5, seed=1), question=token_ids(2, 4, seed=2),
                                  decode="fixed_position")


@pytest.mark.parametrize("policy", ["grow", "fixed_position", "score"])
def test_sweep_on_llava_equals_each_pair(policy):
    model = tiny_llava()
    inputs = llava_inputs(batch=2, text=12, seed=3)
    _assert_sweep_equals_per_pair(model, inputs, token_ids(2, 5, seed=3), decode=policy)


def test_calibrated_prefixkv_equals_its_pair(llama):
    """PrefixKV with an offline profile (sizes known before scoring, so its own prefill compresses layer by layer)
    gives in a sweep what it gives alone."""
    profile = prefixkv.calibrate(llama, [text_inputs(batch=1, seq=PROMPT, seed=s) for s in (11, 12)], BUDGETS)
    method = prefixkv.build_method("prefixkv", profile=profile)
    inputs = text_inputs(batch=2, seq=PROMPT, seed=13)
    continuation = token_ids(2, 5, seed=13)
    out = prefixkv.sweep_logprobs(llama, inputs, continuation, methods=[method], budgets=BUDGETS)
    for budget in BUDGETS:
        want = prefixkv.continuation_logprobs(llama, inputs, continuation, method=method, budget=budget)
        torch.testing.assert_close(out[("prefixkv", budget)], want, atol=ATOL, rtol=0)


def test_method_instances_and_spec_labels(llama):
    """Strings keep their spelling as the label; an instance is labelled by its name and used as given."""
    inputs = text_inputs(batch=1, seq=PROMPT)
    continuation = token_ids(1, 4)
    variant = Uniform(visibility_norm=True)
    out = prefixkv.sweep_logprobs(llama, inputs, continuation, methods=["snapkv", variant], budgets=[0.3], window=8)
    assert list(out) == [("snapkv", 0.3), ("uniform", 0.3), ("full", 1.0)]
    want = prefixkv.continuation_logprobs(llama, inputs, continuation, method=variant, budget=0.3)
    torch.testing.assert_close(out[("uniform", 0.3)], want, atol=ATOL, rtol=0)
    want = prefixkv.continuation_logprobs(llama, inputs, continuation, method="snapkv", budget=0.3, window=8)
    torch.testing.assert_close(out[("snapkv", 0.3)], want, atol=ATOL, rtol=0)


def test_each_scorer_runs_once_per_layer_and_the_full_cache_once(llama, monkeypatch):
    """uniform/prefixkv share a scorer, snapkv/pyramidkv another, h2o has its own: 3 scoring runs per layer, and
    two passes over the keys (h2o's and prefixkv's scores read the same attention mass). The full cache is the same
    at every budget: one chunk forward for all its cells."""
    from prefixkv import scoring

    passes, attention_scores = [], scoring.attention_scores
    monkeypatch.setattr(scoring, "attention_scores", lambda *a, **kw: passes.append(1) or attention_scores(*a, **kw))
    timer = RegionCounter()
    out = prefixkv.sweep_logprobs(
        llama, text_inputs(batch=2, seq=PROMPT), token_ids(2, 5), methods=METHODS, budgets=BUDGETS, timer=timer
    )
    assert timer.counts["prefill"] == 1
    assert timer.counts["score"] == 3 * 3  # 3 distinct scorers x 3 layers
    assert len(passes) == 2 * 3  # the full-window mass and SnapKV's window, per layer
    assert timer.counts["chunk"] == (len(METHODS) - 1) * len(BUDGETS) + 1
    assert out[("full", 0.25)] is out[("full", 1.0)]


def test_scorer_identity():
    build = prefixkv.build_method
    assert build("uniform").scorer == build("prefixkv").scorer
    assert build("snapkv").scorer == build("pyramidkv").scorer
    assert build("h2o").scorer != build("uniform").scorer  # raw vs visibility-normalised attention
    assert build("h2o").scorer != build("uniform", visibility_norm=False, per_kv_head=False).scorer  # per head vs mean
    assert build("uniform").scorer != build("uniform", visibility_norm=False).scorer
    assert build("snapkv").scorer != build("pyramidkv", window=8).scorer
    assert build("prefixkv", layer_floor=0.5, recent=4).scorer == build("uniform").scorer


def _other_value(value):
    """A different valid value of a method field, or None where there is no generic one."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # stays odd where it must (a pooling kernel)
    if isinstance(value, float):
        return value / 2 if value > 1 else value * 0.5 + 0.1
    return {"grow": "fixed_position"}.get(value) if isinstance(value, str) else None


@pytest.mark.parametrize("name", [m for m in METHODS if prefixkv.METHODS[m].needs_scores])
def test_fields_outside_score_fields_leave_the_scores_alone(name):
    """The guard behind scorer sharing: change any field a method does not list in `score_fields`, and its scores
    do not move; change one it lists, and its scorer identity does."""
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16)
    base = prefixkv.build_method(name)
    reference = base.score_prompt(queries, keys, 0)
    for field in dataclasses.fields(base):
        other = _other_value(getattr(base, field.name))
        if other is None:
            continue
        changed = prefixkv.build_method(name, **{field.name: other})
        if field.name in base.score_fields:
            assert changed.scorer != base.scorer, field.name
        else:
            assert changed.scorer == base.scorer, field.name
            assert torch.equal(changed.score_prompt(queries, keys, 0), reference), field.name


# --- memory -------------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages, created while active, that are still alive (weak references to every op's outputs)."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def now(self) -> int:
        alive = [tensor for tensor in (ref() for ref in self.refs) if tensor is not None]
        self.refs = [weakref.ref(tensor) for tensor in alive]
        storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in alive}
        return sum(storages.values())


class PeakAtCompaction:
    """A timer that notes the live bytes whenever a layer is compacted (when a cell's cache is largest)."""

    def __init__(self, live: LiveBytes):
        self.live, self.samples = live, []

    def region(self, name):
        if name == "compact":
            self.samples.append(self.live.now())
        return contextlib.nullcontext()


def test_sweep_holds_one_prefill_and_one_compressed_cache():
    model = tiny_llama(layers=4)
    batch, layers, kv_heads, head_dim, vocab, count = 2, 4, 2, 16, 96, 6
    methods = ["h2o", "snapkv", "uniform", "streaming_llm"]
    live = LiveBytes()
    timer = PeakAtCompaction(live)
    with live:
        prefixkv.sweep_logprobs(model, text_inputs(batch=batch, seq=PROMPT), token_ids(batch, count), methods=methods,
                                budgets=[0.5, 0.75], timer=timer)
    entry = batch * kv_heads * head_dim * 4  # one position of one layer's keys, float32
    prompt = 2 * layers * PROMPT * entry + 3 * layers * batch * kv_heads * PROMPT * 4 + batch * vocab * 4
    largest_cache = 2 * layers * (PROMPT + count) * entry  # a full-budget cache planned for the continuation
    assert len(timer.samples) == layers * (len(methods) * 2 + 1)
    # Slack: a layer's kept positions and the allocator's small tensors while compacting.
    assert max(timer.samples) <= prompt + largest_cache + 8192, (max(timer.samples), prompt, largest_cache)
    assert max(timer.samples) >= prompt, "the measure sees the held prefill"
    # Holding every cell's cache instead would exceed the bound several times over.
    assert (len(methods) * 2) * 2 * layers * (PROMPT // 2 + count) * entry > 3 * largest_cache


def test_prefilled_prompt_is_read_never_written(llama):
    inputs = text_inputs(batch=2, seq=PROMPT)
    prompt = prefixkv.prefill(llama, inputs, methods=["h2o", "prefixkv"])
    before = [k.clone() for k in prompt.keys]
    first = prompt.continuation_logprobs(token_ids(2, 5), method="prefixkv", budget=0.25, decode="fixed_position")
    prompt.generate(method="h2o", budget=0.25, max_new_tokens=4, decode="score")
    again = prompt.continuation_logprobs(token_ids(2, 5), method="prefixkv", budget=0.25, decode="fixed_position")
    assert all(torch.equal(a, b) for a, b in zip(before, prompt.keys, strict=True))
    assert torch.equal(first, again)
    assert prompt.nbytes == 2 * 3 * 2 * 2 * PROMPT * 16 * 4 + 2 * 3 * 2 * 2 * PROMPT * 4 + 2 * 96 * 4
    with pytest.raises(ValueError, match="did not run at prefill"):
        prompt.continuation_logprobs(token_ids(2, 5), method="snapkv", budget=0.25)
    prompt.continuation_logprobs(token_ids(2, 5), method="streaming_llm", budget=0.25)  # no scores needed


def test_one_prefill_serves_both_sweeps(llama):
    """The prompt's own sweeps equal the top-level ones; a method whose scorer did not run is named before any
    cell is computed."""
    inputs = text_inputs(batch=2, seq=PROMPT, seed=5)
    continuation = token_ids(2, 5, seed=5)
    methods = ["h2o", "prefixkv", "streaming_llm"]
    timer = RegionCounter()
    prompt = prefixkv.prefill(llama, inputs, methods=methods, timer=timer)
    logprobs = prompt.sweep_logprobs(continuation, methods=methods, budgets=BUDGETS, decode="score")
    tokens = prompt.sweep_generate(methods=methods, budgets=BUDGETS, max_new_tokens=4)
    assert timer.counts["prefill"] == 1
    want = prefixkv.sweep_logprobs(llama, inputs, continuation, methods=methods, budgets=BUDGETS, decode="score")
    assert want.keys() == logprobs.keys() and all(torch.equal(want[k], logprobs[k]) for k in want)
    want = prefixkv.sweep_generate(llama, inputs, methods=methods, budgets=BUDGETS, max_new_tokens=4)
    assert want.keys() == tokens.keys() and all(torch.equal(want[k], tokens[k]) for k in want)
    chunks = timer.counts.get("chunk", 0)
    with pytest.raises(ValueError, match="'snapkv' scores the prompt with a scorer that did not run"):
        prompt.sweep_logprobs(continuation, methods=["h2o", "snapkv"], budgets=BUDGETS)
    assert timer.counts.get("chunk", 0) == chunks, "no cell ran before the error"


def test_sweep_arguments_are_checked(llama):
    inputs = text_inputs(batch=2, seq=20)
    continuation = token_ids(2, 3)
    with pytest.raises(TypeError, match="methods must be a non-empty list"):
        prefixkv.sweep_logprobs(llama, inputs, continuation, methods="snapkv", budgets=[0.5])
    with pytest.raises(TypeError, match="budgets must be a non-empty list"):
        prefixkv.sweep_logprobs(llama, inputs, continuation, methods=["snapkv"], budgets=0.5)
    with pytest.raises(ValueError, match="budget must be in"):
        prefixkv.sweep_logprobs(llama, inputs, continuation, methods=["snapkv"], budgets=[0.5, 1.5])
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        prefixkv.sweep_generate(llama, inputs, methods=["snap"], budgets=[0.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="repeat the labels"):
        prefixkv.sweep_logprobs(llama, inputs, continuation, methods=["uniform", Uniform()], budgets=[0.5])
    with pytest.raises(ValueError, match=r"continuation must be \(batch=2"):
        prefixkv.sweep_logprobs(llama, inputs, token_ids(1, 3), methods=["snapkv"], budgets=[0.5])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        prefixkv.sweep_generate(llama, inputs, methods=["snapkv"], budgets=[0.5], max_new_tokens=0)
