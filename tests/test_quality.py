"""Quality metrics: object-level scores, exact match, token agreement, ROUGE-L, perplexity; and the evaluation
sweep end to end on a tiny untrained model (at budget 1.0 every method reproduces the full cache)."""

from __future__ import annotations

import math

import pytest
import torch

from bench import quality
from bench.embedded.scenes import describe, make_scene


def test_parse_description_round_trips_the_reference() -> None:
    scene = make_scene(3)
    assert sorted(quality.parse_description(describe(scene))) == sorted(quality.scene_objects(scene))
    assert quality.description_prf(describe(scene), scene) == quality.PRF(1.0, 1.0, 1.0)


def test_object_prf_counts_hits_misses_and_duplicates() -> None:
    a, b, c = ("small", "red", "circle", 1, 1), ("large", "blue", "cross", 2, 3), ("small", "white", "square", 4, 4)
    assert quality.object_prf([a, b], [a, b, c]) == pytest.approx(quality.PRF(1.0, 2 / 3, 0.8))
    assert quality.object_prf([a, a], [a]) == pytest.approx(quality.PRF(0.5, 1.0, 2 / 3))
    assert quality.object_prf([], [a]) == quality.PRF(0.0, 0.0, 0.0)
    assert quality.object_prf([], []) == quality.PRF(1.0, 1.0, 1.0)


def test_description_with_wrong_attribute_is_a_miss() -> None:
    text = "there are two shapes . a small red circle at row 1 column 1 . a large blue cross at row 2 column 4 ."
    parsed = quality.parse_description(text)
    assert parsed == [("small", "red", "circle", 1, 1), ("large", "blue", "cross", 2, 4)]
    prf = quality.object_prf(parsed, [("small", "red", "circle", 1, 1), ("large", "blue", "cross", 2, 3)])
    assert prf.f1 == pytest.approx(0.5)


def test_answers_and_token_agreement() -> None:
    assert quality.answer_correct(" a  small red circle", "a small red circle")
    assert not quality.answer_correct("a small red", "a small red circle")
    assert quality.truncate_at_eos([5, 6, 2, 7, 2], eos_id=2) == [5, 6, 2]
    assert quality.truncate_at_eos([5, 6], eos_id=2) == [5, 6]
    assert quality.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert quality.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert quality.token_agreement([], []) == 1.0


def test_rouge_l_uses_the_rouge_score_package() -> None:
    assert quality.rouge_l("a small red circle", "a small red circle") == pytest.approx(1.0)
    # LCS "a red circle" = 3 of 4 tokens on each side
    assert quality.rouge_l("a large red circle", "a small red circle") == pytest.approx(0.75)
    assert quality.rouge_l("nothing", "a small red circle") == 0.0


def test_perplexity() -> None:
    assert quality.perplexity(torch.zeros(2, 3)) == pytest.approx(1.0)
    lp = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.5), -100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert quality.perplexity(lp, mask) == pytest.approx(math.exp(-(2 * math.log(0.5) + math.log(0.25)) / 3))
    with pytest.raises(ValueError, match="shape"):
        quality.perplexity(lp, mask[:, :1])
    with pytest.raises(ValueError, match="zero tokens"):
        quality.perplexity(lp, torch.zeros_like(mask))


@pytest.fixture(scope="module")
def tiny_model():
    from bench.embedded.model import build_model
    from bench.embedded.tokenizer import build_tokenizer

    return build_model(tiny=True, seed=1).eval(), build_tokenizer()


def test_sweep_at_full_budget_matches_full_cache(tiny_model) -> None:
    prefixkv = pytest.importorskip("prefixkv")
    from bench.embedded.evaluate import evaluate, markdown

    model, tokenizer = tiny_model
    methods = list(prefixkv.METHODS)
    rows = evaluate(model, tokenizer, methods, [1.0], n_scenes=2, kinds=["count", "lookup"], log=lambda _: None)
    assert [r["method"] for r in rows] == methods
    full = rows[methods.index("full")]
    for row in rows:
        assert "error" not in row, row
        assert row["agreement"] == 1.0 and row["rouge_l"] == 1.0 and row["kept"] == 1.0
        assert row["ppl"] == pytest.approx(full["ppl"], rel=1e-4)
        assert row["count_acc"] == full["count_acc"] and row["lookup_acc"] == full["lookup_acc"]
    assert "| method |" in markdown(rows)


def test_sweep_takes_method_specs(tiny_model, capsys) -> None:
    pytest.importorskip("prefixkv")
    from bench.embedded.evaluate import evaluate

    model, tokenizer = tiny_model
    paper = "prefixkv[per_kv_head=False,visibility_norm=False]"
    rows = evaluate(model, tokenizer, [paper, "prefixkv"], [0.3], n_scenes=1, kinds=["count"], log=lambda _: None)
    assert [r["method"] for r in rows] == [paper, "prefixkv"] and not any("error" in r for r in rows)


def test_sweep_compresses_below_full_budget(tiny_model) -> None:
    pytest.importorskip("prefixkv")
    from bench.embedded.evaluate import evaluate

    model, tokenizer = tiny_model
    (row,) = evaluate(model, tokenizer, ["snapkv"], [0.2], n_scenes=1, kinds=["describe"], log=lambda _: None)
    assert "error" not in row, row
    assert row["kept"] < 0.5
    assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["rouge_l"] <= 1.0 and row["ppl"] >= 1.0
    assert 0.0 <= row["desc_f1"] <= 1.0


def test_sweep_rejects_bad_arguments(tiny_model) -> None:
    pytest.importorskip("prefixkv")
    from bench.embedded.evaluate import evaluate, write

    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate(model, tokenizer, ["nope"], [0.5], n_scenes=1)
    with pytest.raises(ValueError, match="visibility_norm must be True or False"):
        evaluate(model, tokenizer, ["prefixkv[visibility_norm=3]"], [0.5], n_scenes=1)
    with pytest.raises(ValueError, match="unknown instruction kinds"):
        evaluate(model, tokenizer, ["full"], [0.5], n_scenes=1, kinds=["poem"])
    with pytest.raises(ValueError):
        evaluate(model, tokenizer, ["full"], [1.5], n_scenes=1)
    with pytest.raises(ValueError, match=".csv or .md"):
        write([], "table.txt")
