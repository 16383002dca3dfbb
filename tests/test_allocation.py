"""Property tests of the per-layer allocators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv.allocation import ALLOCATORS, prefix_allocation, pyramid_allocation, uniform_allocation

budgets = st.floats(min_value=0.01, max_value=1.0, allow_nan=False)


@st.composite
def layer_scores(draw, max_layers: int = 6, max_n: int = 64):
    layers = draw(st.integers(1, max_layers))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    # A different concentration per layer: some layers flat, some peaked.
    temps = [draw(st.floats(0.05, 5.0)) for _ in range(layers)]
    return [torch.softmax(torch.randn(n, generator=gen) / t, 0) for t in temps]


@pytest.mark.parametrize("allocate", ALLOCATORS.values(), ids=ALLOCATORS.keys())
@settings(max_examples=60, deadline=None)
@given(scores=layer_scores(), budget=budgets, min_keep=st.integers(1, 8))
def test_budget_met_within_bounds(allocate, scores, budget, min_keep):
    counts = allocate(scores, budget, min_keep=min_keep)
    layers, n = len(scores), scores[0].numel()
    target = max(layers * min(min_keep, n), min(layers * n, round(budget * n * layers)))
    assert len(counts) == layers
    assert abs(sum(counts) - target) <= layers  # "within one token per layer"
    assert all(min(min_keep, n) <= k <= n for k in counts)


@settings(max_examples=60, deadline=None)
@given(scores=layer_scores(), budget=budgets, min_keep=st.integers(1, 8))
def test_prefix_meets_budget_exactly(scores, budget, min_keep):
    layers, n = len(scores), scores[0].numel()
    target = max(layers * min(min_keep, n), min(layers * n, round(budget * n * layers)))
    assert sum(prefix_allocation(scores, budget, min_keep=min_keep)) == target


@pytest.mark.parametrize("allocate", [prefix_allocation, uniform_allocation], ids=["prefix", "uniform"])
@settings(max_examples=60, deadline=None)
@given(scores=layer_scores(), b1=budgets, b2=budgets)
def test_larger_budget_never_shrinks_a_layer(allocate, scores, b1, b2):
    lo, hi = sorted((b1, b2))
    small, large = allocate(scores, lo), allocate(scores, hi)
    assert all(a <= b for a, b in zip(small, large, strict=False))


@settings(max_examples=40, deadline=None)
@given(scores=layer_scores(), min_keep=st.integers(1, 4))
def test_full_budget_keeps_everything(scores, min_keep):
    n = scores[0].numel()
    for allocate in ALLOCATORS.values():
        assert allocate(scores, 1.0, min_keep=min_keep) == [n] * len(scores)


@pytest.mark.parametrize("min_keep", [1, 3])
def test_one_hot_layer_keeps_min_keep(min_keep):
    n = 50
    one_hot = torch.zeros(n)
    one_hot[7] = 1.0
    flat = torch.full((n,), 1.0 / n)
    counts = prefix_allocation([one_hot, flat, flat], 0.3, min_keep=min_keep)
    assert counts[0] == min_keep
    assert sum(counts) == round(0.3 * n * 3)
    assert abs(counts[1] - counts[2]) <= 1


@settings(max_examples=30, deadline=None)
@given(scores=layer_scores(max_layers=1), copies=st.integers(2, 5), budget=budgets)
def test_equal_distributions_get_equal_sizes(scores, copies, budget):
    counts = prefix_allocation(scores * copies, budget)
    assert max(counts) - min(counts) <= 1


def test_concentrated_layers_keep_fewer():
    n = 100
    gen = torch.Generator().manual_seed(0)
    peaked = torch.softmax(torch.randn(n, generator=gen) * 6, 0)
    flat = torch.softmax(torch.randn(n, generator=gen) * 0.1, 0)
    counts = prefix_allocation([peaked, flat], 0.3)
    assert counts[0] < counts[1]


def test_pyramid_decreases():
    scores = [torch.full((200,), 1 / 200)] * 5
    counts = pyramid_allocation(scores, 0.2)
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert sum(counts) == 200


@pytest.mark.parametrize("budget", [0, 1.5, -0.2, math.nan, "half", None])
@pytest.mark.parametrize("allocate", ALLOCATORS.values(), ids=ALLOCATORS.keys())
def test_bad_budget_names_value(allocate, budget):
    with pytest.raises(ValueError, match="budget"):
        allocate([torch.rand(10)], budget)


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match=r"\[10, 12\]"):
        prefix_allocation([torch.rand(10), torch.rand(12)], 0.5)


def test_negative_scores_rejected():
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        uniform_allocation([torch.rand(4), -torch.rand(4)], 0.5)


# --- protections: sinks, recent window, per-layer floors ---------------------------------------------------------

from prefixkv.allocation import layer_floor  # noqa: E402


@st.composite
def protected_case(draw):
    scores = draw(layer_scores(max_n=80))
    n = scores[0].numel()
    sinks = draw(st.integers(0, 6))
    recent = draw(st.integers(0, 10))
    protect = torch.zeros(n, dtype=torch.bool)
    protect[: min(sinks, n)] = True
    if recent:
        protect[max(0, n - recent) :] = True
    return scores, protect


@settings(max_examples=80, deadline=None)
@given(case=protected_case(), budget=budgets, min_keep=st.integers(1, 4), share=st.floats(0.0, 1.0))
def test_prefix_with_protection_meets_budget_and_floor(case, budget, min_keep, share):
    scores, protect = case
    layers, n = len(scores), scores[0].numel()
    counts = prefix_allocation(scores, budget, min_keep=min_keep, protect=protect, floor_share=share)
    target = max(layers * min(min_keep, n), min(layers * n, round(budget * n * layers)))
    floor = layer_floor(target, layers, n, min_keep=min_keep, protected=int(protect.sum()), share=share)
    assert sum(counts) == target
    assert all(floor <= k <= n for k in counts)
    # The floor covers the protected entries whenever the budget can pay for them in every layer.
    if target // layers >= int(protect.sum()):
        assert floor >= int(protect.sum())
    assert floor >= min(min_keep, n)


@pytest.mark.parametrize("allocate", [uniform_allocation, pyramid_allocation], ids=["uniform", "pyramid"])
@settings(max_examples=60, deadline=None)
@given(scores=layer_scores(max_n=80), budget=budgets, protected=st.integers(0, 40))
def test_fixed_allocators_floor_at_protected(allocate, scores, budget, protected):
    layers, n = len(scores), scores[0].numel()
    counts = allocate(scores, budget, protected=protected)
    target = max(layers, min(layers * n, round(budget * n * layers)))
    assert sum(counts) == target
    assert min(counts) >= min(protected, n, target // layers)


def test_sink_does_not_starve_a_layer():
    """A layer whose sink holds most of the mass: without protection the sink alone reaches the retention ratio and
    the layer is cut to min_keep; with the sink protected the search sees the rest of the layer's importance."""
    n = 64
    gen = torch.Generator().manual_seed(0)
    rest = torch.softmax(torch.randn(n, generator=gen) * 0.3, 0)
    sink_layer = rest.clone()
    sink_layer[0] = 3.0  # ~75% of the mass on position 0
    flat = torch.softmax(torch.randn(n, generator=gen) * 0.1, 0)
    scores = [sink_layer / sink_layer.sum(), flat]
    unprotected = prefix_allocation(scores, 0.25)
    protect = torch.zeros(n, dtype=torch.bool)
    protect[0] = True
    protect[-1] = True
    protected = prefix_allocation(scores, 0.25, protect=protect)
    assert unprotected[0] < 4  # the failure the protection is for
    assert protected[0] > unprotected[0] and sum(protected) == sum(unprotected) == 32


def test_layer_floor_rejects_bad_share():
    with pytest.raises(ValueError, match="floor share"):
        layer_floor(10, 2, 8, share=1.5)


# --- per-head budgets: one layer's total shared among its heads; the global search over (layer, head) -----------

from prefixkv.allocation import head_allocation  # noqa: E402
from prefixkv.methods import build_method  # noqa: E402


@pytest.mark.parametrize("criterion", ["top", "prefix"])
@settings(max_examples=60, deadline=None)
@given(case=protected_case(), data=st.data(), min_keep=st.integers(1, 4), share=st.floats(0.0, 1.0))
def test_head_allocation_meets_the_total_floors_and_protects(criterion, case, data, min_keep, share):
    heads, protect = case
    n, count = heads[0].numel(), len(heads)
    total = data.draw(st.integers(count * min(min_keep, n), count * n))
    counts = head_allocation(heads, total, criterion=criterion, min_keep=min_keep, protect=protect, floor_share=share)
    floor = layer_floor(total, count, n, min_keep=min_keep, protected=int(protect.sum()), share=share)
    assert sum(counts) == total
    assert all(floor <= k <= n for k in counts)
    if total // count >= int(protect.sum()):
        assert floor >= int(protect.sum())  # every head can hold its protected entries


def test_head_allocation_follows_the_heads_concentration():
    """A peaked head needs few entries, a flat one many: Ada-KV's top scores and PrefixKV's prefix agree on that."""
    gen = torch.Generator().manual_seed(0)
    peaked = torch.softmax(torch.randn(100, generator=gen) * 6, 0)
    flat = torch.softmax(torch.randn(100, generator=gen) * 0.1, 0)
    for criterion in ("top", "prefix"):
        counts = head_allocation([peaked, flat], 60, criterion=criterion, floor_share=0.2)
        assert counts[0] < counts[1] and sum(counts) == 60
        assert min(counts) >= 6  # the floor: 0.2 of the average head size


def test_head_allocation_rejects_a_bad_total_and_criterion():
    heads = [torch.rand(10), torch.rand(10)]
    with pytest.raises(ValueError, match=r"total must be an integer in \[2, 20\]"):
        head_allocation(heads, 21)
    with pytest.raises(ValueError, match="criterion must be one of"):
        head_allocation(heads, 5, criterion="max")


@st.composite
def head_scores(draw):
    layers, heads = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n = draw(st.integers(2, 60))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    temps = torch.tensor([[draw(st.floats(0.05, 5.0)) for _ in range(heads)] for _ in range(layers)])
    return [torch.softmax(torch.randn(2, heads, n, generator=gen) / temps[i, :, None], -1) for i in range(layers)]


@pytest.mark.parametrize("name", ["prefixkv", "uniform", "snapkv", "h2o"])
@settings(max_examples=20, deadline=None)
@given(scores=head_scores(), budget=budgets, sinks=st.integers(0, 3), recent=st.integers(0, 4))
def test_adaptive_methods_meet_the_budget_exactly_with_protections(name, scores, budget, sinks, recent):
    """Per-head budgets: PrefixKV's one search over every (layer, head) meets round(budget x n x layers x heads);
    the others meet each layer's total and share it; every head is floored at its protected entries (as far as the
    budget allows) and keeps them."""
    kwargs = {"window": 2} if name == "snapkv" else {}
    method = build_method(name, head_budgets="adaptive", per_kv_head=True, sinks=sinks, recent=recent, **kwargs)
    layers, heads, n = len(scores), scores[0].shape[1], scores[0].shape[-1]
    plan = method.plan(scores, budget)
    counts = [[p.shape[-1] for p in layer] for layer in plan]
    if name == "prefixkv":
        assert sum(map(sum, counts)) == target_total_of(budget, n, layers * heads)
    else:
        sizes = method.allocate(scores, budget)
        assert [sum(c) for c in counts] == [s * heads for s in sizes]
    protect = method.protection(n, n, recent=method.protected - method.sinks)
    n_protected = 0 if protect is None else int(protect.sum())
    for layer in plan:
        for positions in layer:
            assert positions.shape[0] == 2 and (positions.diff(dim=-1) > 0).all()  # sorted, unique
            keep = positions.shape[-1]
            guarded = method.protection(n, keep, recent=method.protected - method.sinks)
            if guarded is not None and name != "h2o":  # H2O's window follows each head's own count
                kept = torch.zeros(2, n, dtype=torch.bool).scatter_(-1, positions, True)
                assert kept[:, guarded].all()
    # Every head holds its protected entries wherever its unit's share of the budget can pay for them.
    if name == "prefixkv" and target_total_of(budget, n, layers * heads) // (layers * heads) >= n_protected:
        assert min(map(min, counts)) >= n_protected
    if name != "prefixkv":
        for size, layer in zip(method.allocate(scores, budget), counts, strict=True):
            assert size < n_protected or min(layer) >= n_protected


def target_total_of(budget: float, n: int, units: int) -> int:
    return max(units, min(units * n, round(budget * n * units)))
