"""Per-head budgets end to end: the packed layer against the eviction oracle and the dense layer, its memory, its
static decode step (no sync, no reallocation, one compiled graph) and its edges."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import prefixkv
from bench.counters import StepCounters
from kernels import kernels_available, reference_only
from prefixkv.capture import bind
from prefixkv.generation import Decoder, _prefill, cache_argument, make_cache
from prefixkv.methods.uniform import Uniform
from prefixkv.packed import PackedLayer
from tests.models import text_inputs, tiny_llama
from tests.oracle import oracle_logits
from tests.test_cache import compressed_logits, prefill, steps
from tests.test_decode_step import dynamo_only  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("reference_kernels")

POLICIES = ["grow", "fixed_position", "score"]
ADAPTIVE = {"head_budgets": "adaptive", "per_kv_head": True}
#: Every method with per-head budgets: PrefixKV's global search, its uniform ablation, Ada-KV style SnapKV and H2O.
VARIANTS = [("prefixkv", {}), ("uniform", {}), ("snapkv", {"window": 8}), ("h2o", {})]


@dataclass
class PrescribedHeads(Uniform):
    """A test method: the per-(layer, KV head) counts are given, so that rows of very different lengths (a head
    keeping one entry) are exercised whatever the model's attention looks like."""

    name = "prescribed_heads"
    counts: tuple = ()

    def allocate(self, scores, budget):
        return [tuple(layer) for layer in self.counts]

    @property
    def sizes_need_scores(self) -> bool:
        return True


@dataclass
class DenseAsPacked(Uniform):
    """A test method: the dense layer's own selection, stored packed - the two layouts must then agree exactly."""

    name = "dense_as_packed"

    def keep_positions(self, scores, keep):
        positions = self.select(scores, keep)
        return [positions[:, h] for h in range(positions.shape[1])]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture
def kernels_on(monkeypatch):
    """Undo the module's reference-only mode for one test: the Triton kernels run (interpreted on CPU)."""
    import kernels.scores

    monkeypatch.setattr(kernels.scores, "_reference_only", False)


def _padded(held: torch.Tensor) -> torch.Tensor:
    """A packed layer's held positions with the -1 padding replaced by the row's first position (a duplicate is
    harmless in the oracle's mask, which scatters True)."""
    return torch.where(held < 0, held[..., :1], held)


def _check_oracle(model, inputs, method, budget, new_tokens=8, **kwargs):
    prompt = inputs["input_ids"].shape[1]
    out = prefixkv.generate(model, inputs, method=method, budget=budget, max_new_tokens=new_tokens, **kwargs)
    generated = out.sequences[:, prompt:]
    logits, cache = compressed_logits(model, inputs, method, budget, generated, **kwargs)
    assert all(isinstance(layer, PackedLayer) for layer in cache.layers)
    history = [[_padded(h) for h in layer.history] for layer in cache.layers]
    expected = oracle_logits(model, inputs, generated, history)
    # fp32 model vs float64 attention in the oracle: differences are rounding of a few ops on O(1) logits.
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=2e-4)
    # The tokens the compressed cache generated are the masked reference's greedy tokens.
    assert torch.equal(expected.argmax(-1), generated[:, 1:])
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("method", "kwargs"), VARIANTS, ids=[m for m, _ in VARIANTS])
def test_adaptive_heads_match_the_oracle(llama, method, kwargs, policy):
    inputs = text_inputs(batch=2, seq=50, seed=3)
    _check_oracle(llama, inputs, method, 0.25, decode=policy, decode_recent=2, **ADAPTIVE, **kwargs)


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_of_very_different_lengths_match_the_oracle(llama, policy):
    counts = ((1, 30), (17, 2), (40, 3))  # (layer, KV head): one entry, the whole prompt, and between
    method = PrescribedHeads(counts=counts, **ADAPTIVE, decode=policy, decode_recent=1)
    out = _check_oracle(llama, text_inputs(batch=3, seq=40, seed=5), method, 0.5)
    assert out.cache_stats.kept_per_head == [list(c) for c in counts]


def test_packed_layout_equals_the_dense_layout(llama):
    """The same entries, held dense or packed: the same tokens and the same statistics."""
    inputs = text_inputs(batch=2, seq=40, seed=8)
    for policy in POLICIES:
        dense = prefixkv.generate(llama, inputs, method="uniform", budget=0.3, max_new_tokens=8, decode=policy,
                                  per_kv_head=True)
        packed = prefixkv.generate(llama, inputs, method=DenseAsPacked(decode=policy, **ADAPTIVE), budget=0.3,
                                   max_new_tokens=8)
        assert torch.equal(dense.sequences, packed.sequences), policy
        a, b = dense.cache_stats, packed.cache_stats
        assert (a.kept, a.held, a.bytes, a.capacity_bytes) == (b.kept, b.held, b.bytes, b.capacity_bytes)
        assert a.kept_per_head == b.kept_per_head and a.bytes_per_head == b.bytes_per_head
        for x, y in zip(a.positions, b.positions, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_is_the_sum_of_what_the_heads_keep(llama, policy):
    """KV bytes allocated = the heads' kept entries + their planned decode slots, exactly; a dense buffer would
    hold every head at the longest one's size."""
    counts = ((2, 20), (9, 4), (12, 12))
    new_tokens = 6
    method = PrescribedHeads(counts=counts, **ADAPTIVE, decode=policy)
    out = prefixkv.generate(llama, text_inputs(batch=2, seq=40), method=method, budget=0.5,
                            max_new_tokens=new_tokens)
    stats = out.cache_stats
    entry = 2 * 2 * 16 * 4  # keys + values x batch x head_dim x fp32 bytes
    for layer, kept in enumerate(counts):
        plans = [method.policy.plan(k, 40, new_tokens) for k in kept]
        capacity = [max(k, plan.capacity) for k, plan in zip(kept, plans, strict=True)]
        assert stats.capacity_bytes[layer] == entry * sum(capacity)
        assert stats.capacity_bytes_per_head[layer] == [entry * c for c in capacity]
        held = [plan.lengths[new_tokens - 2] for plan in plans]  # generate runs new_tokens - 1 decode steps
        assert stats.bytes_per_head[layer] == [entry * h for h in held]
        assert stats.bytes[layer] == entry * sum(held)
        dense = entry * len(kept) * max(capacity)  # what a dense buffer would take
        assert stats.capacity_bytes[layer] < dense if len(set(kept)) > 1 else stats.capacity_bytes[layer] == dense
        if policy == "grow":
            # One planned slot is left: the plan covers max_new_tokens steps, generation takes one fewer.
            assert stats.capacity_bytes[layer] == stats.bytes[layer] + entry * len(kept)
    assert stats.kept == [sum(c) / 2 for c in counts]


@pytest.mark.parametrize("method", ["prefixkv", "snapkv"])
def test_adaptive_budget_is_met_exactly_and_floored(llama, method):
    inputs = text_inputs(batch=2, seq=64, seed=2)
    kwargs = {"window": 8} if method == "snapkv" else {}
    out = prefixkv.generate(llama, inputs, method=method, budget=0.2, max_new_tokens=2, **ADAPTIVE, **kwargs)
    per_head = out.cache_stats.kept_per_head
    # PrefixKV budgets every (layer, head) at once; SnapKV sizes each layer, then shares it among the heads.
    total = round(0.2 * 64 * 3 * 2) if method == "prefixkv" else round(0.2 * 64 * 3) * 2
    assert sum(map(sum, per_head)) == total
    floor = 8 if method == "snapkv" else 2  # the window / the sink and the last token
    assert min(map(min, per_head)) >= floor


@pytest.mark.parametrize("policy", POLICIES)
def test_buffers_never_move_while_decoding(llama, policy):
    cache = make_cache(llama, "snapkv", 0.25, 8, decode=policy, window=4, **ADAPTIVE)
    with torch.no_grad():
        prefill(llama, text_inputs(batch=2, seq=40), cache)
        cache.compress()

        def state():
            return [(t.data_ptr(), t.numel()) for layer in cache.layers
                    for t in (layer.keys, layer.values, layer.slot_positions, layer.attention_received)
                    if t is not None]

        before = state()
        steps(llama, cache, torch.tensor([3, 4]), 7)
    assert state() == before
    assert cache.stats().reallocations == 0


def test_overrun_grows_instead_of_failing(llama):
    """Eager decoding past `max_new_tokens` (model.generate without it) re-lays the rows out, doubled, and keeps
    every entry: the same tokens as a cache planned for the whole run."""
    inputs = text_inputs(batch=2, seq=30, seed=4)
    method = PrescribedHeads(counts=((3, 11), (7, 1), (5, 5)), **ADAPTIVE)
    tokens, caches = [], []
    for planned_steps in (1, 6):
        cache = make_cache(llama, method, 0.5, planned_steps)
        with torch.no_grad():
            prefill(llama, inputs, cache)
            cache.compress()
            tokens.append(steps(llama, cache, torch.tensor([5, 6]), 6))
        caches.append(cache.stats())
    overrun, planned = caches
    assert overrun.reallocations > 0 and planned.reallocations == 0
    assert torch.equal(tokens[0], tokens[1])
    assert overrun.bytes_per_head == planned.bytes_per_head == [
        [(k + 6) * 2 * 2 * 16 * 4 for k in layer] for layer in planned.kept_per_head
    ]


def test_model_generate_with_an_attached_packed_cache(llama):
    inputs = text_inputs(batch=2, seq=40)
    kwargs = {"method": "prefixkv", "budget": 0.3, **ADAPTIVE}
    expected = prefixkv.generate(llama, inputs, max_new_tokens=6, **kwargs)
    with prefixkv.attach(llama, max_new_tokens=6, **kwargs) as cache:
        sequences = llama.generate(**inputs, **{cache_argument(llama): cache}, max_new_tokens=6, do_sample=False)
    assert torch.equal(sequences, expected.sequences)
    assert cache.stats().kept_per_head == expected.cache_stats.kept_per_head


@pytest.mark.parametrize(
    "policy", [{}, {"decode": "fixed_position", "decode_distance": 3}, {"decode": "score", "decode_recent": 2}]
)
def test_a_chunk_equals_token_by_token(llama, policy):
    """A chunk after compression (teacher forcing, a question after the context) runs its rows one at a time inside
    each packed layer: the same log-probabilities and the same entries held as one-token steps, steps after it too."""
    from tests.models import token_ids
    from tests.test_chunks import fed

    inputs = text_inputs(batch=2, seq=40, seed=3)
    tokens = token_ids(2, 13)
    for method, kwargs in VARIANTS:
        steps, by_step = fed(llama, inputs, method, tokens, [1] * 13, **ADAPTIVE, **kwargs, **policy)
        chunked, by_chunk = fed(llama, inputs, method, tokens, [10, 1, 2], **ADAPTIVE, **kwargs, **policy)
        torch.testing.assert_close(chunked, steps, atol=1e-4, rtol=0, msg=f"{method} {policy}")
        assert isinstance(by_chunk.layers[0], PackedLayer)
        for x, y in zip(by_chunk.layers, by_step.layers, strict=True):
            assert torch.equal(x.held_positions(by_chunk.steps), y.held_positions(by_step.steps))


def test_the_layer_itself_takes_one_token_at_a_time(llama):
    cache = make_cache(llama, "prefixkv", 0.5, 4, **ADAPTIVE)
    with torch.no_grad():
        prefill(llama, text_inputs(batch=1, seq=20), cache)
        cache.compress()
        layer = cache.layers[0]
        chunk = torch.zeros(1, 2, 3, 16)
        refused = r"^a packed layer writes and attends one token at a time, got 3 tokens$"
        with pytest.raises(ValueError, match=refused):
            layer.write(chunk, chunk, cache.step)
        with pytest.raises(ValueError, match=refused):
            layer.attend(torch.zeros(1, 4, 3, 16), 0.25, cache.step)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("prefixkv", {"head_budgets": "adaptive", "per_kv_head": False}, "set per_kv_head=True"),
        ("streaming_llm", {"head_budgets": "adaptive", "per_kv_head": True}, "it scores none"),
        ("full", {"head_budgets": "adaptive", "per_kv_head": True}, "it scores none"),
        ("snapkv", {"head_budgets": "per-head"}, "head_budgets must be one of"),
    ],
)
def test_bad_head_budgets_are_named(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefixkv.build_method(name, **kwargs)


def test_calibration_refuses_adaptive_heads(llama):
    with pytest.raises(ValueError, match="calibrate with equal head budgets"):
        prefixkv.calibrate(llama, [text_inputs(batch=1, seq=20)], [0.5], **ADAPTIVE)


# --- the decode step: counters and compilation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep():
    """As deep as Llama-2-7B (32 layers), so per-layer costs add up as they do there."""
    return tiny_llama(layers=32)


@pytest.mark.parametrize("policy", POLICIES)
def test_packed_step_costs_no_more_than_the_full_step(deep, policy):
    model = deep
    inputs = text_inputs(batch=2, seq=64, seed=1)

    def counted(method, budget, **kwargs):
        counters = StepCounters()
        prefixkv.generate(model, inputs, method=method, budget=budget, max_new_tokens=5, decode=policy,
                          timer=counters, **kwargs)
        return counters.per_step()

    full = counted("full", 1.0)
    for method, kwargs in (VARIANTS[0], VARIANTS[2]):  # the global search and Ada-KV's split
        per_step = counted(method, 0.25, **ADAPTIVE, **kwargs)
        assert per_step["host_syncs"] == 0, f"{method}/{policy}: a decode step waits for the device"
        assert per_step["aten_ops"] <= full["aten_ops"], f"{method}/{policy}: {per_step} vs full {full}"


@pytest.mark.parametrize(("policy", "variant"), list(zip(POLICIES, VARIANTS, strict=False)), ids=POLICIES)
def test_packed_step_compiles_fullgraph_once_and_matches_eager(llama, dynamo_only, policy, variant):  # noqa: F811
    from bench.counters import compile_counters

    method, kwargs = variant
    inputs = text_inputs(batch=2, seq=40, seed=2)
    run = {"method": method, "budget": 0.25, "max_new_tokens": 10, "decode": policy, **ADAPTIVE, **kwargs}
    eager = prefixkv.generate(llama, inputs, **run)
    with compile_counters() as counted:
        compiled = prefixkv.generate(llama, inputs, compile=True, **run)
    assert counted["graph_breaks"] == 0
    assert counted["graphs"] <= 1, f"{method}/{policy}: {counted['graphs']} graphs (recompiles)"
    assert torch.equal(compiled.sequences, eager.sequences), f"{method}/{policy}"
    assert compiled.cache_stats.held == eager.cache_stats.held


@pytest.mark.skipif(not kernels_available("cpu") and not torch.cuda.is_available(), reason="no kernels here")
def test_kernel_path_matches_the_reference_path(kernels_on):
    """The decode-attention kernel (interpreted on CPU) in the cache: the reference path's tokens and statistics."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(layers=2).to(device)
    inputs = {k: v.to(device) for k, v in text_inputs(batch=2, seq=24, seed=6).items()}
    run = {"method": "snapkv", "budget": 0.5, "max_new_tokens": 4, "decode": "score", "window": 4, **ADAPTIVE}
    with reference_only():
        want = prefixkv.generate(model, inputs, **run)
    got = prefixkv.generate(model, inputs, **run)
    assert torch.equal(got.sequences, want.sequences)
    assert got.cache_stats.evictions == want.cache_stats.evictions
    for a, b in zip(got.cache_stats.positions, want.cache_stats.positions, strict=True):
        assert torch.equal(a, b)


def test_decoder_runs_on_a_packed_cache_bound_by_hand(llama):
    """The pieces a caller assembles (make_cache, bind, prefill, Decoder) work on a packed cache as on a dense one."""
    cache = make_cache(llama, "uniform", 0.4, 3, **ADAPTIVE)
    with torch.no_grad(), bind(llama, cache):
        token = _prefill(llama, text_inputs(batch=1, seq=20), cache).argmax(-1)
        cache.compress()
        decoder = Decoder(llama, cache, 1)
        for _ in range(2):
            token = decoder(token).argmax(-1)
    assert cache.stats().held == [sum(c) / 2 + 2 for c in cache.stats().kept_per_head]


# --- in the suite -------------------------------------------------------------------------------------------------


def test_head_budgets_are_a_matrix_value_and_cells_report_bytes_per_head(tmp_path):
    """`head_budgets` is set per method in a matrix (checked when the matrix loads), and a cell's row carries the
    KV bytes allocated and, per [layer][kv_head], the bytes held and the entries kept."""
    from bench import matrix
    from bench.cell import measure

    text = """
[matrix]
models = ["tiny-llama"]
batch_sizes = [2]
text_lengths = [40]
new_tokens = [4]
methods = ["snapkv"]
budgets = [0.3]
repetitions = 1
warmup = 0
cpu_threads = 1
[method_kwargs.snapkv]
head_budgets = "adaptive"
window = 4
"""
    path = tmp_path / "heads.toml"
    path.write_text(text)
    (cell,) = matrix.load(path).cells()
    assert cell.method_kwargs["head_budgets"] == "adaptive"
    path.write_text(text.replace('"adaptive"', '"per-head"'))
    with pytest.raises(matrix.MatrixError, match="head_budgets must be one of"):
        matrix.load(path)

    row = measure(cell)[0]
    kept, held = row["kept_per_head"], row["kv_bytes_per_head"]
    assert len(kept) == len(held) == row["model_layers"] and all(len(layer) == 2 for layer in kept)
    assert sum(map(sum, kept)) == 2 * round(0.3 * row["prompt_length"] * row["model_layers"])
    assert [sum(layer) for layer in held] == row["kv_bytes_per_layer"]
    # Allocated = held + the planned decode slot left over (grow: the plan covers every new token, the last one is
    # never written), exactly: nothing is padded to the longest head.
    entry = 2 * 2 * 2 * 16 * 4  # keys + values x batch x kv_heads x head_dim x fp32 bytes, one slot per row
    assert row["kv_capacity_bytes_total"] == row["kv_bytes_total"] + row["model_layers"] * entry
    assert [a - h for a, h in zip(row["kv_capacity_bytes_per_layer"], row["kv_bytes_per_layer"], strict=True)] == [
        entry] * row["model_layers"]
    # Per head: each head's allocation is its held entries plus its own one planned slot (half a layer's slot here).
    allocated = row["kv_capacity_bytes_per_head"]
    assert [sum(layer) for layer in allocated] == row["kv_capacity_bytes_per_layer"]
    assert all(a - h == entry // 2 for la, lh in zip(allocated, held, strict=True) for a, h in zip(la, lh, strict=True))
    import pandas as pd

    from bench.memory import head_memory

    frame = head_memory(pd.DataFrame([row]))
    assert len(frame) == 2 * row["model_layers"]
    assert frame["kv_allocated_mib"].sum() * 2**20 == pytest.approx(row["kv_capacity_bytes_total"])


def test_head_counts_figure(tmp_path):
    """The README figure's pieces: per-head counts from a method's plan, and the figure from their frame."""
    import pandas as pd

    from bench.realtext.heads import figure, kept_per_head

    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(1, 3, 50, generator=gen) ** (1 + 4 * i) for i in range(4)]
    dense = kept_per_head(prefixkv.build_method("prefixkv", per_kv_head=True), scores, 0.2)
    adaptive = kept_per_head(prefixkv.build_method("prefixkv", **ADAPTIVE), scores, 0.2)
    assert all(len(set(layer)) == 1 for layer in dense) and sum(map(sum, dense)) == 3 * round(0.2 * 50 * 4)
    assert sum(map(sum, adaptive)) == round(0.2 * 50 * 4 * 3) and any(len(set(layer)) > 1 for layer in adaptive)
    frame = pd.DataFrame.from_records(
        {"variant": name, "layer": layer, "kv_head": h, "kept": k}
        for name, counts in (("per layer", dense), ("per head", adaptive))
        for layer, heads in enumerate(counts)
        for h, k in enumerate(heads)
    )
    path = figure(frame, tmp_path / "heads.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_frames_from_result_rows():
    """bench.memory shapes stored rows into plain frames; rows without the columns are skipped, not fatal."""
    import numpy as np
    import pandas as pd

    from bench.memory import head_memory, kv_memory

    rows = pd.DataFrame([
        {"key": "a", "method": "prefixkv", "kv_bytes_total": 3 * 2**20, "kv_capacity_bytes_total": 4 * 2**20,
         "kept_per_head": [np.array([1, 3]), np.array([2, 2])],
         "kv_bytes_per_head": [np.array([2**20, 3 * 2**20]), np.array([0, 2**19])],
         "kv_capacity_bytes_per_head": [np.array([2**20, 4 * 2**20]), np.array([2**19, 2**19])]},
        {"key": "old", "method": "h2o", "kv_bytes_total": 2**20, "kv_capacity_bytes_total": None,
         "kept_per_head": None, "kv_bytes_per_head": None, "kv_capacity_bytes_per_head": None},
    ])
    memory = kv_memory(rows)
    assert memory["key"].tolist() == ["a"] and memory["allocated_over_held"].tolist() == [4 / 3]
    heads = head_memory(rows)
    assert heads[["layer", "kv_head", "kept"]].values.tolist() == [[0, 0, 1], [0, 1, 3], [1, 0, 2], [1, 1, 2]]
    assert heads["kv_mib"].tolist() == [1.0, 3.0, 0.0, 0.5]
    assert heads["kv_allocated_mib"].tolist() == [1.0, 4.0, 0.5, 0.5]
    assert head_memory(rows.drop(columns=["kv_capacity_bytes_per_head"]))["kv_allocated_mib"].isna().all()
    assert head_memory(rows.drop(columns=["kept_per_head"])).empty


def test_peak_memory_of_one_generation():
    """bench.peak_memory's measurement, in this process: the generation's own peak and its KV bytes."""
    from bench.peak_memory import measure

    row = measure("tiny-llama", "cpu", "snapkv[head_budgets=adaptive,window=4]", 2, 24, 3, 0.5)
    assert row["peak_above_before_mib"] >= 0 and row["peak_source"] == "peak RSS (VmHWM)"
    assert 0 < row["kv_held_mib"] <= row["kv_allocated_mib"] <= row["heap_peak_mib"]


def test_peak_memory_command_appends_a_row_per_variant(tmp_path, capsys):
    """The command: the variant in its own process, one line printed and one JSON row (with its settings) kept."""
    import json

    from bench.peak_memory import main

    out = tmp_path / "rows.jsonl"
    args = ["--model", "tiny-llama", "--batch", "2", "--length", "24", "--new-tokens", "3", "--budget", "0.5",
            "--out", str(out), "--methods"]
    assert main([*args, "snapkv[head_budgets=adaptive,window=4]"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["method"] == "snapkv[head_budgets=adaptive,window=4]" and row["kv_held_mib"] > 0
    assert (row["budget"], row["batch"], row["length"], row["threads"]) == (0.5, 2, 24, 1)
    assert "snapkv[head_budgets=adaptive,window=4]: live heap peak" in capsys.readouterr().out
    assert main([*args, "snapkv", "--budget", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and len(out.read_text().splitlines()) == 1


# --- CUDA: the kernel in the cache, no sync, CUDA graphs ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_packed_step_never_synchronises(kernels_on, policy):
    from tests.test_decode_step import _NoSyncInDecode

    model = tiny_llama().cuda()
    inputs = {"input_ids": text_inputs(batch=2, seq=40)["input_ids"].cuda()}
    for method, kwargs in VARIANTS:
        prefixkv.generate(model, inputs, method=method, budget=0.25, max_new_tokens=6, decode=policy,
                          timer=_NoSyncInDecode(), **ADAPTIVE, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_packed_step_matches_eager(kernels_on, policy):
    """Compiled with CUDA graphs (the kernel inside, as one custom op): the eager step's log-probabilities, and a
    handful of host launches per step."""
    torch._dynamo.reset()
    model = tiny_llama(layers=4).cuda()
    inputs = {"input_ids": text_inputs(batch=2, seq=40, seed=6)["input_ids"].cuda()}
    kwargs = {"method": "snapkv", "budget": 0.25, "decode": policy, "window": 8, **ADAPTIVE}
    continuation = prefixkv.generate(model, inputs, max_new_tokens=12, **kwargs).sequences[:, 40:]
    eager = prefixkv.continuation_logprobs(model, inputs, continuation, **kwargs)
    compiled = prefixkv.continuation_logprobs(model, inputs, continuation, compile=True, **kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    counters = StepCounters(count_ops=False, profile_launches=True)
    prefixkv.generate(model, inputs, max_new_tokens=8, timer=counters, compile=True, **kwargs)
    assert counters.per_step()["kernel_launches"] <= 8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_packed_half_precision_matches_the_reference_path(kernels_on, dtype):
    """In half precision the kernel's tokens may differ from the fp32 reference's only by rounding: compare the
    log-probabilities of one continuation instead."""
    model = tiny_llama(layers=2).cuda().to(dtype)
    inputs = {"input_ids": text_inputs(batch=2, seq=48, seed=9)["input_ids"].cuda()}
    kwargs = {"method": "prefixkv", "budget": 0.3, **ADAPTIVE}
    continuation = prefixkv.generate(model, inputs, max_new_tokens=6, **kwargs).sequences[:, 48:]
    got = prefixkv.continuation_logprobs(model, inputs, continuation, **kwargs)
    with reference_only():
        want = prefixkv.continuation_logprobs(model, inputs, continuation, **kwargs)
    tolerance = 2e-2 if dtype == torch.float16 else 8e-2  # a few units of the dtype's last place on O(1) logits
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
