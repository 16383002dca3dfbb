"""The method registry, hyper-parameter validation, selection rules and bad input to the entry points."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import prefixkv
from prefixkv.methods import build_method
from tests.models import text_inputs, tiny_llama

pytestmark = pytest.mark.usefixtures("reference_kernels")


def test_registry_names_and_docs():
    assert list(prefixkv.METHODS) == ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "uniform", "prefixkv"]
    for name, cls in prefixkv.METHODS.items():
        assert cls.name == name
        assert "arXiv" in (cls.__doc__ or "") or name == "full", f"{name} must name its paper"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("h2o", {"recent_ratio": 1.5}, "recent_ratio"),
        ("snapkv", {"window": 0}, "window"),
        ("snapkv", {"kernel_size": 4}, "kernel_size"),
        ("snapkv", {"pooling": "median"}, "pooling"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("streaming_llm", {"sinks": -1}, "sinks"),
        ("uniform", {"min_keep": 0}, "min_keep"),
        ("prefixkv", {"recent": -1}, "recent"),
        ("prefixkv", {"temperature": 2}, "temperature"),
        ("prefixkv", {"profile": "/nonexistent/profile.json"}, "profile not found"),
    ],
)
def test_bad_hyper_parameters(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, **kwargs)


def test_streaming_llm_keeps_sinks_and_recent():
    positions = build_method("streaming_llm", sinks=2).select(torch.zeros(1, 2, 20), 6)
    assert positions[0, 0].tolist() == [0, 1, 16, 17, 18, 19]


def test_snapkv_keeps_window():
    scores = torch.rand(2, 3, 50)
    positions = build_method("snapkv", window=8).select(scores, 12)
    assert positions.shape == (2, 3, 12)
    assert (positions[..., -8:] == torch.arange(42, 50)).all()


def test_recent_protects_the_end_of_the_prompt():
    scores = torch.zeros(1, 1, 30)
    scores[0, 0, :5] = 1.0  # causal accumulation favours early positions
    assert build_method("uniform", sinks=0, recent=0).select(scores, 5)[0, 0].tolist() == [0, 1, 2, 3, 4]
    assert build_method("prefixkv", recent=3).select(scores, 5)[0, 0].tolist() == [0, 1, 27, 28, 29]


def test_h2o_recent_and_heavy_hitters():
    scores = torch.zeros(1, 1, 30)
    scores[0, 0, [3, 9]] = 1.0
    positions = build_method("h2o", recent_ratio=0.5).select(scores, 4)
    assert positions[0, 0].tolist() == [3, 9, 28, 29]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("budget", [0, 1.5, math.nan, -1])
def test_generate_rejects_bad_budget(llama, budget):
    with pytest.raises(ValueError, match=f"budget must be in \\(0, 1\\], got {budget}"):
        prefixkv.generate(llama, text_inputs(), method="prefixkv", budget=budget, max_new_tokens=2)


def test_generate_rejects_unknown_method(llama):
    with pytest.raises(ValueError, match="unknown method 'prefix-kv'"):
        prefixkv.generate(llama, text_inputs(), method="prefix-kv", budget=0.5, max_new_tokens=2)


def test_generate_rejects_padding(llama):
    inputs = text_inputs()
    inputs["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        prefixkv.generate(llama, inputs, method="h2o", budget=0.5, max_new_tokens=2)


def test_generate_rejects_bad_max_new_tokens(llama):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        prefixkv.generate(llama, text_inputs(), method="h2o", budget=0.5, max_new_tokens=0)


def test_model_without_supported_attention():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="GPT2LMHeadModel: found 0 decoder attention modules"):
        prefixkv.generate(gpt2, text_inputs(seq=8), method="prefixkv", budget=0.5, max_new_tokens=2)


def test_config_lacking_heads():
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(num_hidden_layers=2, hidden_size=64)
    with pytest.raises(ValueError, match="lacks `num_attention_heads`"):
        prefixkv.generate(model, text_inputs(), method="prefixkv", budget=0.5, max_new_tokens=2)


# --- protections in selection, and field validation (bools are not numbers) -----------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCORED = [name for name, cls in prefixkv.METHODS.items() if name != "full"]


@pytest.mark.parametrize("name", SCORED)
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60), keep=st.integers(1, 60), sinks=st.integers(0, 5), recent=st.integers(0, 8),
    seed=st.integers(0, 1000),
)
def test_protected_entries_are_never_evicted(name, n, keep, sinks, recent, seed):
    keep = min(keep, n)
    method = build_method(name, sinks=sinks, recent=recent)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, n, generator=gen)
    scores[..., : min(sinks, n)] = 0.0  # the sink would lose on its score alone
    positions = method.select(scores, keep)
    assert positions.shape == (2, 3, keep)
    assert (positions.diff(dim=-1) > 0).all()  # sorted and unique
    protect = method.protection(n, keep)
    if protect is not None:
        kept = torch.zeros(2, 3, n, dtype=torch.bool).scatter_(-1, positions, True)
        assert kept[..., protect].all()
        assert int(protect[: min(sinks, keep)].sum()) == min(sinks, keep, n)  # sinks first


@pytest.mark.parametrize("name", SCORED)
def test_plan_floors_every_layer_and_meets_budget(name):
    method = build_method(name, sinks=2, recent=6)
    gen = torch.Generator().manual_seed(0)
    n, layers = 500, 6  # 50 entries per layer at budget 0.1: room for SnapKV's 32-entry window plus the sinks
    scores = []
    for i in range(layers):
        s = torch.rand(1, 2, n, generator=gen) ** 8
        s[..., 0] = 50.0 * (i % 2)  # a dominant sink in every other layer
        scores.append(s)
    plan = method.plan(scores, 0.1)
    counts = [p.shape[-1] for p in plan]
    assert sum(counts) == round(0.1 * n * layers)
    assert min(counts) >= method.protected
    for p in plan:
        assert (p[..., :2] == torch.tensor([0, 1])).all()  # the sinks
        assert (p[..., -6:] == torch.arange(n - 6, n)).all()  # the recent window


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("prefixkv", {"min_keep": True}, "min_keep"),
        ("uniform", {"sinks": True}, "sinks"),
        ("h2o", {"recent": 2.0}, "recent"),
        ("h2o", {"recent_ratio": True}, "recent_ratio"),
        ("h2o", {"recent_ratio": "0.5"}, "recent_ratio"),
        ("snapkv", {"window": True}, "window"),
        ("snapkv", {"kernel_size": 4}, "kernel_size"),
        ("pyramidkv", {"beta": False}, "beta"),
        ("pyramidkv", {"beta": float("nan")}, "beta"),
        ("prefixkv", {"layer_floor": 1.5}, "layer_floor"),
        ("prefixkv", {"layer_floor": True}, "layer_floor"),
        ("prefixkv", {"visibility_norm": 1}, "visibility_norm"),
        ("prefixkv", {"per_kv_head": "yes"}, "per_kv_head"),
        ("prefixkv", {"profile": 3}, "profile"),
        ("streaming_llm", {"sinks": -1}, "sinks"),
        ("uniform", {"decode_recent": True}, "decode_recent"),
    ],
)
def test_fields_reject_wrong_types_and_values(name, kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        prefixkv.METHODS[name](**kwargs)
    with pytest.raises(ValueError, match=field):  # build_method turns both into ValueError
        build_method(name, **kwargs)


@pytest.mark.parametrize("budget", [True, False, "0.5", None, float("nan"), 0.0, 1.5])
def test_check_budget_rejects(budget):
    with pytest.raises(ValueError, match="budget"):
        prefixkv.check_budget(budget)


def test_visibility_norm_divides_by_the_queries_that_see_a_key():
    """Key j of n is seen by n - j prompt queries under the causal mask; the normalised score is the mean attention
    per seeing query, so the last key is no longer penalised for being seen once."""
    n, d = 16, 8
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 2, n, d, generator=gen)
    keys = torch.randn(1, 1, n, d, generator=gen)
    raw = build_method("uniform", visibility_norm=False).score(queries, keys, 0)[0, 0]
    fair = build_method("uniform").score(queries, keys, 0)[0, 0]  # the default
    expected = raw / torch.arange(n, 0, -1).float()
    torch.testing.assert_close(fair, expected / expected.sum())
    assert fair[-1] > raw[-1]
