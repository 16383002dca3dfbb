"""The scene generator: deterministic per seed, and every reference answer agrees with its scene."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.embedded.model import IMAGE_TOKENS, build_inputs, prompt_text
from bench.embedded.scenes import (
    COLOURS,
    DIRECTIONS,
    GRID,
    KINDS,
    MAX_OBJECTS,
    MIN_OBJECTS,
    NOTHING,
    NUMBER_WORDS,
    Instruction,
    describe,
    focus_cells,
    instruction,
    make_scene,
    render,
)
from bench.embedded.tokenizer import build_tokenizer
from bench.quality import parse_description, scene_objects

seeds = st.integers(min_value=0, max_value=2**40)
TOKENIZER = build_tokenizer()


@settings(max_examples=50, deadline=None)
@given(seed=seeds)
def test_same_seed_same_scene_and_image(seed: int) -> None:
    assert make_scene(seed) == make_scene(seed)
    np.testing.assert_array_equal(render(make_scene(seed)), render(make_scene(seed)))
    for kind in KINDS:
        assert instruction(make_scene(seed), kind) == instruction(make_scene(seed), kind)


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_scene_invariants(seed: int) -> None:
    scene = make_scene(seed)
    assert MIN_OBJECTS <= len(scene.objects) <= MAX_OBJECTS
    cells = [(o.row, o.col) for o in scene.objects]
    assert len(set(cells)) == len(cells)
    assert all(1 <= r <= GRID and 1 <= c <= GRID for r, c in cells)
    pairs = [(o.colour, o.shape) for o in scene.objects]
    assert len(set(pairs)) == len(pairs), "(colour, shape) must name one object"


@settings(max_examples=50, deadline=None)
@given(seed=seeds)
def test_image_shows_each_object_in_its_colour(seed: int) -> None:
    scene = make_scene(seed)
    img = render(scene).astype(np.float32)
    cell = img.shape[0] // GRID
    for obj in scene.objects:
        cy, cx = (obj.row - 1) * cell + cell // 2, (obj.col - 1) * cell + cell // 2
        centre = img[cy - 1 : cy + 1, cx - 1 : cx + 1].reshape(-1, 3).mean(0)
        # colour jitter is at most 20 per channel; pixel noise (sigma 8) averages over 4 pixels
        assert np.abs(centre - np.asarray(COLOURS[obj.colour])).max() < 45, (obj, centre)


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_description_lists_every_object_in_reading_order(seed: int) -> None:
    scene = make_scene(seed)
    text = describe(scene)
    assert text.startswith(f"there are {NUMBER_WORDS[len(scene.objects)]} shapes .")
    parsed = parse_description(text)
    assert sorted(parsed) == sorted(scene_objects(scene))
    assert [(r, c) for *_, r, c in parsed] == sorted((o.row, o.col) for o in scene.objects)
    assert 40 <= len(TOKENIZER(text)["input_ids"]) <= 150


@settings(max_examples=100, deadline=None)
@given(seed=seeds, question_seed=seeds)
def test_question_answers_match_the_scene(seed: int, question_seed: int) -> None:
    scene = make_scene(seed)
    count = instruction(scene, "count", question_seed)
    axis, line = count.question.split()[5:7]
    n = sum((o.row if axis == "row" else o.col) == int(line) for o in scene.objects)
    assert count.answer == NUMBER_WORDS[n]

    lookup = instruction(scene, "lookup", question_seed)
    words = lookup.question.split()
    found = scene.at(int(words[4]), int(words[6]))
    assert lookup.answer == (found.phrase() if found else NOTHING)

    relation = instruction(scene, "relation", question_seed)
    words = relation.question.split()
    direction, row, col = " ".join(words[2:4]), int(words[8]), int(words[10])
    assert scene.at(row, col) is not None  # the question names a shape
    dr, dc = DIRECTIONS[direction]
    assert 1 <= row + dr <= GRID and 1 <= col + dc <= GRID  # whose neighbouring cell is on the board
    found = scene.at(row + dr, col + dc)
    assert relation.answer == f"row {row + dr} column {col + dc} , " + (found.phrase() if found else NOTHING)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, question_seed=seeds)
def test_focus_cells_are_what_each_question_is_about(seed: int, question_seed: int) -> None:
    scene = make_scene(seed)
    count = instruction(scene, "count", question_seed)
    cells = focus_cells(scene, count)
    assert count.answer == NUMBER_WORDS[len(cells)] and cells == sorted(cells)
    assert all(scene.at(r, c) is not None for r, c in cells)
    lookup = instruction(scene, "lookup", question_seed)
    assert focus_cells(scene, lookup) == [tuple(int(w) for w in lookup.question.split()[4:7:2])]
    relation = instruction(scene, "relation", question_seed)
    (cell,) = focus_cells(scene, relation)
    assert relation.answer.startswith(f"row {cell[0]} column {cell[1]} ,")
    assert focus_cells(scene, instruction(scene, "describe")) == []


@settings(max_examples=30, deadline=None)
@given(a=seeds, b=seeds)
def test_prompts_of_one_kind_have_equal_length(a: int, b: int) -> None:
    for kind in KINDS:
        pairs = [(make_scene(s), instruction(make_scene(s), kind)) for s in (a, b)]
        inputs = build_inputs(TOKENIZER, pairs)
        assert inputs["input_ids"].shape[0] == 2
        assert bool(inputs["attention_mask"].all())
        assert int((inputs["input_ids"] == TOKENIZER.convert_tokens_to_ids("<image>")).sum(1)[0]) == IMAGE_TOKENS
        assert inputs["pixel_values"].shape == (2, 3, 64, 64)


@settings(max_examples=50, deadline=None)
@given(seed=seeds)
def test_tokenizer_covers_every_word(seed: int) -> None:
    scene = make_scene(seed)
    for kind in KINDS:
        ins = instruction(scene, kind)
        for text in (prompt_text(ins.question), ins.answer):
            ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
            assert TOKENIZER.unk_token_id not in ids
        assert TOKENIZER.decode(TOKENIZER(ins.answer)["input_ids"]) == ins.answer


def test_bad_inputs_raise_value_error() -> None:
    scene = make_scene(0)
    with pytest.raises(ValueError, match="unknown instruction kind"):
        instruction(scene, "translate")
    with pytest.raises(ValueError, match="seed"):
        make_scene(-1)
    mixed = [(scene, instruction(scene, "describe")), (scene, instruction(scene, "lookup"))]
    with pytest.raises(ValueError, match="different lengths"):
        build_inputs(TOKENIZER, mixed)
    with pytest.raises(ValueError, match="empty"):
        build_inputs(TOKENIZER, [])
    with pytest.raises(ValueError, match="unknown instruction kind"):
        focus_cells(scene, Instruction("translate", "", ""))
