"""Fault injection at the library's doors (issue 19): `attach` with padding or reused, narrow or out-of-vocabulary
token ids, the method-spec syntax, and one budget check per path. Each test failed on the code before the fix."""

from __future__ import annotations

import pytest
import torch

import prefixkv
from prefixkv.budget import Budget, check_budget
from prefixkv.generation import cache_argument
from tests.models import VOCAB, text_inputs, tiny_llama

pytestmark = pytest.mark.usefixtures("reference_kernels")

NEW = 4


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=2)


def _padded(batch: int = 2, seq: int = 24) -> dict[str, torch.Tensor]:
    inputs = text_inputs(batch=batch, seq=seq)
    inputs["attention_mask"][1, :5] = 0  # left padding of the second row
    return inputs


# --- item 6: attach refuses padding as generate does ------------------------------------------------------------


@pytest.mark.parametrize("method", ["prefixkv", "h2o", "snapkv", "streaming_llm"])
def test_attach_refuses_a_padded_batch_like_generate(llama, method):
    # Before: silently different tokens for the padded row (prefixkv), or an AttributeError from cache.py.
    inputs = _padded()
    with pytest.raises(ValueError, match="attention_mask has padding"):
        prefixkv.generate(llama, inputs, method=method, budget=0.5, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="attention_mask has padding"), \
            prefixkv.attach(llama, method=method, budget=0.5, max_new_tokens=NEW) as cache:
        llama.generate(**inputs, **{cache_argument(llama): cache}, max_new_tokens=NEW, do_sample=False)
    assert not llama._forward_pre_hooks  # the check leaves with the block


# --- item 10: a second generate on one attached cache -------------------------------------------------------------


def test_a_second_generate_on_one_attached_cache_says_one_cache_one_call(llama):
    # Before: "a compressed cache decodes one token per step, got a chunk of 24".
    inputs = text_inputs(batch=1, seq=24)
    with prefixkv.attach(llama, method="snapkv", budget=0.5, max_new_tokens=NEW, window=4) as cache:
        argument = cache_argument(llama)
        first = llama.generate(**inputs, **{argument: cache}, max_new_tokens=NEW, do_sample=False)
        with pytest.raises(ValueError, match="one cache serves one call"):
            llama.generate(**inputs, **{argument: cache}, max_new_tokens=NEW, do_sample=False)
    expected = prefixkv.generate(llama, inputs, method="snapkv", budget=0.5, max_new_tokens=NEW, window=4)
    assert torch.equal(first, expected.sequences)


# --- item 8: token ids refused at the door, not deep inside ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_narrow_integer_input_ids_are_refused_at_the_door(llama, dtype):
    inputs = text_inputs(batch=1, seq=12)
    inputs["input_ids"] = inputs["input_ids"].to(dtype)
    with pytest.raises(TypeError, match=f"int64 or int32 token ids, got dtype {dtype}"):
        prefixkv.generate(llama, inputs, method="h2o", budget=0.5, max_new_tokens=NEW)


def test_int32_input_ids_still_work(llama):
    inputs = text_inputs(batch=1, seq=12)
    expected = prefixkv.generate(llama, inputs, method="h2o", budget=0.5, max_new_tokens=NEW).sequences
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    out = prefixkv.generate(llama, inputs, method="h2o", budget=0.5, max_new_tokens=NEW).sequences
    assert torch.equal(out.long(), expected)


def test_out_of_vocabulary_continuation_fails_before_the_prefill(llama, monkeypatch):
    inputs = text_inputs(batch=1, seq=12)
    continuation = torch.tensor([[1, VOCAB + 5]])
    calls = []
    monkeypatch.setattr(prefixkv.generation, "_prefill", lambda *a: calls.append(a) or pytest.fail("prefill ran"))
    with pytest.raises(ValueError, match=rf"continuation must lie in \[0, {VOCAB}\).* to {VOCAB + 5}"):
        prefixkv.continuation_logprobs(llama, inputs, continuation, method="h2o", budget=0.5)
    assert not calls


# --- item 10: one method-spec syntax everywhere ---------------------------------------------------------------------


def test_build_method_takes_a_spec():
    method = prefixkv.build_method("prefixkv[visibility_norm=False, layer_floor=0.25]")
    assert method == prefixkv.build_method("prefixkv", visibility_norm=False, layer_floor=0.25)
    assert method.spec == "prefixkv[layer_floor=0.25,visibility_norm=False]"
    assert prefixkv.build_method("prefixkv[visibility_norm=True]").spec == "prefixkv"  # a default is left out
    assert prefixkv.build_method(method.spec) == method
    assert prefixkv.build_method("h2o[decode=score]").decode == "score"  # a bare word is a string
    assert prefixkv.build_method("snapkv").spec == "snapkv"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prefixkv[visibility_norm=True", "one pair of brackets"),
        ("prefixkv[recent=8]x", "one pair of brackets"),
        ("prefixkv[recent]", "'recent' is not key=value"),
        ("prefixkv[recent=8,recent=4]", "'recent' is given twice"),
        ("prefixkv[recent=(]", "the value of 'recent=\\(' is not a Python literal"),
        ("[recent=1]", "names no method"),
        ("prefix kv", "unknown method 'prefix kv'"),
        ("nope[recent=1]", "unknown method 'nope'"),
        ("prefixkv[temperature=2]", "temperature"),
        ("prefixkv[recent=-1]", "recent"),
    ],
)
def test_bad_specs_are_one_line_naming_the_part(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        prefixkv.build_method(spec)
    assert "\n" not in str(err.value)


def test_spec_and_keywords_for_one_parameter_is_refused():
    with pytest.raises(ValueError, match="recent given both"):
        prefixkv.build_method("prefixkv[recent=8]", recent=4)


def test_generate_takes_a_spec(llama):
    inputs = text_inputs(batch=1, seq=16)
    by_spec = prefixkv.generate(llama, inputs, method="uniform[recent=4]", budget=0.5, max_new_tokens=NEW)
    by_kwargs = prefixkv.generate(llama, inputs, method="uniform", budget=0.5, max_new_tokens=NEW, recent=4)
    assert torch.equal(by_spec.sequences, by_kwargs.sequences)


def test_every_method_spec_round_trips():
    for name, cls in prefixkv.METHODS.items():
        assert cls().spec == name and prefixkv.build_method(cls().spec) == cls()


def test_split_method_specs():
    assert prefixkv.split_method_specs("uniform, prefixkv[recent=8,layer_floor=0.25],h2o") == [
        "uniform", "prefixkv[recent=8,layer_floor=0.25]", "h2o"]


# --- item 11: the budget is checked once on its path ------------------------------------------------------------


def test_the_budget_is_checked_once_from_generate_to_allocation(llama, monkeypatch):
    # Before: four checks on one path (generation, cache, plan/allocation). Now the cache's constructor checks it and
    # the allocator it reaches from inside trusts the checked value.
    validated = []

    def counting(budget):
        if type(budget) is not Budget:
            validated.append(budget)
        return check_budget(budget)

    for module in (prefixkv.generation, prefixkv.cache, prefixkv.allocation, prefixkv.methods.base):
        monkeypatch.setattr(module, "check_budget", counting, raising=False)
    prefixkv.generate(llama, text_inputs(batch=1, seq=16), method="prefixkv", budget=0.5, max_new_tokens=NEW)
    prefixkv.generate(llama, text_inputs(batch=1, seq=16), method="pyramidkv", budget=0.5, max_new_tokens=NEW)
    assert validated == [0.5, 0.5]  # once per call


@pytest.mark.parametrize("budget", [0.0, 1.5, float("nan"), True, "0.5"])
def test_each_public_door_refuses_a_bad_budget(llama, budget):
    inputs = text_inputs(batch=1, seq=8)
    with pytest.raises(ValueError, match="budget"):
        prefixkv.generate(llama, inputs, method="h2o", budget=budget, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="budget"), prefixkv.attach(llama, method="h2o", budget=budget):
        pass
    with pytest.raises(ValueError, match="budget"):
        prefixkv.PrefixKVCache(2, method=prefixkv.build_method("h2o"), budget=budget)
    with pytest.raises(ValueError, match="budget"):
        prefixkv.uniform_allocation([torch.rand(8)] * 2, budget)


# --- item 10: the same syntax in `bench run --methods` and in matrix files -----------------------------------------

MATRIX = """
[matrix]
models = ["tiny-llava"]
text_lengths = [8]
new_tokens = [4]
methods = ["full", "prefixkv[visibility_norm=True]"]
budgets = [0.2]

[method_kwargs.prefixkv]
recent = 8
"""


def test_bench_run_and_matrix_files_take_method_specs(tmp_path, capsys):
    # Before: `--methods "prefixkv[visibility_norm=True]"` was "unknown method" (exit 2) though evaluate took it.
    from bench import matrix
    from bench.cli import main

    path = tmp_path / "m.toml"
    path.write_text(MATRIX)
    cells = matrix.load(path).cells()
    assert [(c.method, dict(c.method_kwargs)) for c in cells] == [
        ("full", {}), ("prefixkv", {"recent": 8, "visibility_norm": True})]
    spec = "full,prefixkv[visibility_norm=True,recent=8],h2o[recent_ratio=0.25]"
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--methods", spec, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "prefixkv (recent=8, visibility_norm=True)@0.2" in out and "h2o (recent_ratio=0.25)@0.2" in out
    # The same cell whichever way its hyper-parameters are written: one key.
    again = matrix.load(path, {"methods": ["prefixkv[recent=8,visibility_norm=True]"]}).cells()
    assert again[0].key == cells[1].key
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--methods", "prefixkv[nope=1]",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--methods" in err and "nope" in err
