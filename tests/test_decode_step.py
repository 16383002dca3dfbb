"""The static decode step: deterministic counters on a 32-layer model, and the compiled step against the eager one.

These are the CPU acceptance of the decode design (README, "Decode at the byte floor"): the compressed step issues
no more aten operations than the full step under the same policy, no step synchronises the host, the cache never
allocates after compression, and `torch.compile(fullgraph=True)` captures the step once (no graph break, no
recompile between steps) and reproduces the eager tokens exactly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import prefixkv
from bench.counters import OpCounter, StepCounters, compile_counters
from prefixkv import generation
from tests.models import text_inputs, tiny_llama
from tests.oracle import oracle_logits
from tests.test_cache import compressed_logits

pytestmark = pytest.mark.usefixtures("reference_kernels")

POLICIES = ["grow", "fixed_position", "score"]
METHODS = list(prefixkv.METHODS)


@pytest.fixture(scope="module")
def deep():
    """A tiny Llama as deep as Llama-2-7B (32 layers), so per-layer costs add up as they do there."""
    return tiny_llama(layers=32)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _counted(model, method, policy, budget=0.25):
    counters = StepCounters()
    inputs = text_inputs(batch=2, seq=64, seed=1)
    prefixkv.generate(model, inputs, method=method, budget=budget, max_new_tokens=5, decode=policy, timer=counters)
    assert len(counters.steps) == 4
    return counters


@pytest.mark.parametrize("policy", POLICIES)
def test_compressed_step_costs_no_more_than_the_full_step(deep, policy):
    full = _counted(deep, "full", policy, budget=1.0).per_step()
    for method in METHODS:
        counted = _counted(deep, method, policy)
        per_step = counted.per_step()
        assert per_step["host_syncs"] == 0, f"{method}/{policy}: a decode step waits for the device"
        assert per_step["aten_ops"] <= full["aten_ops"], f"{method}/{policy}: {per_step} vs full {full}"
        assert per_step["alloc_bytes"] <= full["alloc_bytes"], f"{method}/{policy}: {per_step} vs full {full}"
        # Every step has the same structure: nothing is planned, sorted or reallocated on the way.
        assert len({(s["aten_ops"], s["host_syncs"]) for s in counted.steps}) == 1


def test_counters_catch_a_sync_and_an_allocation():
    """The counters are sharp: one `.item()` and one fresh tensor are seen."""
    x = torch.ones(4)
    with OpCounter() as counter:
        float(x.sum())
        torch.zeros(1000)
    assert counter.syncs == 1
    assert counter.alloc_bytes >= 4000
    assert counter.ops == 3


@pytest.mark.parametrize("method", ["h2o", "prefixkv"])
def test_cache_never_allocates_while_decoding(llama, method):
    """Every tensor the cache holds keeps its address and size from compression to the last step."""
    from tests.test_cache import prefill, steps

    for policy in POLICIES:
        cache = generation.make_cache(llama, method, 0.25, 8, decode=policy)
        with torch.no_grad():
            prefill(llama, text_inputs(batch=2, seq=40), cache)
            cache.compress()
            state = [
                (t.data_ptr(), t.numel())
                for layer in cache.layers
                for t in (layer.keys, layer.values, layer.slot_positions, layer.attention_received)
                if t is not None
            ]
            steps(llama, cache, torch.tensor([3, 4]), 7)
        after = [
            (t.data_ptr(), t.numel())
            for layer in cache.layers
            for t in (layer.keys, layer.values, layer.slot_positions, layer.attention_received)
            if t is not None
        ]
        assert after == state, policy
        assert cache.stats().reallocations == 0


@pytest.fixture
def dynamo_only(monkeypatch):
    """Compile with dynamo's capture alone (backend="eager"): it checks fullgraph and recompiles in seconds; the
    inductor test below checks the generated code once."""
    torch._dynamo.reset()
    compiled = torch.compile(generation._logits, fullgraph=True, dynamic=False, backend="eager")
    monkeypatch.setattr(generation, "_compiled_logits", lambda device: compiled)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", POLICIES)
def test_step_compiles_fullgraph_once_and_matches_eager(llama, dynamo_only, policy):
    inputs = text_inputs(batch=2, seq=40, seed=2)
    for method in METHODS:
        budget = 1.0 if method == "full" else 0.25
        eager = prefixkv.generate(llama, inputs, method=method, budget=budget, max_new_tokens=10, decode=policy)
        with compile_counters() as counted:
            compiled = prefixkv.generate(
                llama, inputs, method=method, budget=budget, max_new_tokens=10, decode=policy, compile=True
            )
        assert counted["graph_breaks"] == 0
        # One graph for the 9 steps: nothing that changes between steps is a Python value the graph depends on.
        assert counted["graphs"] <= 1, f"{method}/{policy}: {counted['graphs']} graphs (recompiles)"
        assert torch.equal(compiled.sequences, eager.sequences), f"{method}/{policy}"
        assert compiled.cache_stats.held == eager.cache_stats.held
        assert compiled.cache_stats.evictions == eager.cache_stats.evictions


@pytest.mark.parametrize("policy", ["fixed_position", "score"])
def test_compiled_step_reproduces_the_oracle(llama, dynamo_only, policy):
    inputs = text_inputs(batch=2, seq=40, seed=5)
    kwargs = {"decode": policy, "decode_recent": 4}
    out = prefixkv.generate(llama, inputs, method="snapkv", budget=0.25, max_new_tokens=12, **kwargs)
    generated = out.sequences[:, 40:]
    logits, cache = compressed_logits(llama, inputs, "snapkv", 0.25, generated, compile=True, **kwargs)
    expected = oracle_logits(llama, inputs, generated, [layer.history for layer in cache.layers])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)


def test_inductor_step_matches_eager(llama):
    """The real thing once: inductor's generated code for the most involved policy (on-device eviction by score)."""
    torch._dynamo.reset()
    inputs = text_inputs(batch=2, seq=40, seed=3)
    kwargs = {"method": "h2o", "budget": 0.25, "max_new_tokens": 10, "decode": "score"}
    eager = prefixkv.generate(llama, inputs, **kwargs)
    with compile_counters() as counted:
        compiled = prefixkv.generate(llama, inputs, compile=True, **kwargs)
        again = prefixkv.generate(llama, inputs, compile=True, **kwargs)  # a second cache reuses the graph
    assert counted["graph_breaks"] == 0 and counted["graphs"] == 1
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(again.sequences, eager.sequences)


class _NoSyncInDecode:
    """A timer that turns any device synchronisation inside a decode step into an error (CUDA's sync debug mode)."""

    def region(self, name):
        return _sync_errors() if name == "decode_step" else contextlib.nullcontext()


@contextlib.contextmanager
def _sync_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_decode_step_never_synchronises(policy):
    model = tiny_llama().cuda()
    inputs = {"input_ids": text_inputs(batch=2, seq=40)["input_ids"].cuda()}
    for method in METHODS:
        budget = 1.0 if method == "full" else 0.25
        prefixkv.generate(
            model, inputs, method=method, budget=budget, max_new_tokens=6, decode=policy, timer=_NoSyncInDecode()
        )


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_step_matches_eager_with_few_launches(policy):
    """Compiled with CUDA graphs: the same log-probabilities as the eager step, and a handful of host launches per
    step (the graph replay, the argmax, the position update) where the eager step launches one kernel per op."""
    torch._dynamo.reset()
    model = tiny_llama(layers=4).cuda()
    inputs = {"input_ids": text_inputs(batch=2, seq=40, seed=6)["input_ids"].cuda()}
    kwargs = {"method": "snapkv", "budget": 0.25, "decode": policy, "window": 8}
    continuation = prefixkv.generate(model, inputs, max_new_tokens=12, **kwargs).sequences[:, 40:]
    eager = prefixkv.continuation_logprobs(model, inputs, continuation, **kwargs)
    compiled = prefixkv.continuation_logprobs(model, inputs, continuation, compile=True, **kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    counted = {}
    for compile_step in (False, True):
        counters = StepCounters(count_ops=False, profile_launches=True)
        prefixkv.generate(model, inputs, max_new_tokens=8, timer=counters, compile=compile_step, **kwargs)
        counted[compile_step] = counters.per_step()["kernel_launches"]
    assert counted[True] <= 8 < counted[False], counted


def test_compiled_cell_records_its_counters():
    """A cell measured with `compile = true`: every counter column filled, no graph break, no recompile."""
    from bench.cell import measure
    from bench.matrix import Cell

    torch._dynamo.reset()
    cell = Cell(model="tiny-llama", device="cpu", dtype="float32", batch_size=1, text_tokens=24, new_tokens=4,
                method="snapkv", budget=0.5, method_kwargs={"decode": "fixed_position"}, compile=True,
                repetitions=2, warmup=1, cpu_threads=1)
    rows = measure(cell)
    row = rows[0]
    assert row["compiled"] is True
    assert row["compile_graph_breaks"] == 0 and row["compile_recompiles"] == 0
    assert row["decode_host_syncs_per_step"] == 0 and row["decode_aten_ops_per_step"] > 0
    assert row["decode_alloc_bytes_per_step"] > 0
    assert row["decode_kernel_launches_per_step"] is None and row["decode_floor_ratio"] is None  # CUDA only
    assert len(row["decode_steps_s"]) == 3
    # The paired full-cache calls ran compiled beside the repetitions without a recompile of the method's step.
    assert len(row["paired_full_decode_steps_s"]) == 3
