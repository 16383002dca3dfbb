"""RULER-style task generators over real text: deterministic, exact length in the tokenizer, the evidence present
exactly once at the requested depth. A byte-level tokenizer (one token per byte) stands in for a model's; the real
SmolLM2 tokenizer is checked too where the model has been fetched."""

from __future__ import annotations

import pytest

from bench.tasks import chat, haystack, ruler
from tests.checkpoints import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize(("task", "length"), [(task, 1024) for task in ruler.TASKS] + [("niah_multikey", 1111)])
def test_samples_are_deterministic_and_exactly_long(tokenizer, task, length):
    first = ruler.samples(tokenizer, task, length, 3, seed=5)
    again = ruler.samples(tokenizer, task, length, 3, seed=5)
    assert first == again
    assert all(s.length == length and len(s.prompt) == length for s in first)
    other = ruler.samples(tokenizer, task, length, 3, seed=6)
    assert [s.prompt for s in other] != [s.prompt for s in first]


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_a_sample_does_not_depend_on_how_many_are_drawn(tokenizer, task):
    assert ruler.samples(tokenizer, task, 1024, 2)[1] == ruler.samples(tokenizer, task, 1024, 5)[1]


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_evidence_present_exactly_once_and_answer_follows_the_prompt(tokenizer, task):
    for sample in ruler.samples(tokenizer, task, 1024, 4, haystack_name="pydoc"):
        context = tokenizer.decode(list(sample.context))
        for sentence in sample.evidence:
            # the most common word's sentence 5 times (its answer), every other inserted sentence once
            expected = 5 if task == "common_words" and f'"{sample.answer_text}"' in sentence else 1
            assert context.count(sentence) == expected
        assert tokenizer.decode(list(sample.answer)) == sample.answer_text
        question = tokenizer.decode(list(sample.question))
        if task.startswith("niah"):  # every value the answer lists is in the context exactly once
            for value in sample.answer_text.replace("\n- ", " ").split():
                assert context.count(value) == 1
                assert value not in question


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
                                  "passage_qa"])
def test_the_answering_sentence_sits_at_the_requested_depth(tokenizer, task):
    fmt = chat.PromptFormat.of(tokenizer)
    for sample in ruler.samples(tokenizer, task, 2000, 5, fmt=fmt):
        context = tokenizer.decode(list(sample.context))
        intro = tokenizer.decode(list(fmt.before) + chat.encode(tokenizer, _instruction(task)))
        body = context[len(intro):]
        answering = next(e for e in sample.evidence if _answers(task, e, sample))
        where = body.index(answering) / len(body)
        # a sentence boundary within 40 tokens of the requested point; the other inserts shift it by their length
        assert abs(where - sample.depth) < 0.2, (where, sample.depth)


def _instruction(task: str) -> str:
    import random

    return ruler.TASKS[task](random.Random(0), 0.5).instruction


def _answers(task: str, sentence: str, sample) -> bool:
    first = sample.answer_text.strip().split("\n")[0].split()[-1 if task == "passage_qa" else 0]
    return first in sentence


def test_depths_spread_over_the_context():
    depths = [ruler.depth_of(i) for i in range(64)]
    assert min(depths) >= 0.05 and max(depths) <= 0.95
    assert sorted(depths[:8])[-1] - sorted(depths[:8])[0] > 0.7  # any first few already spread


def test_plain_tokenizer_without_chat_template():
    plain = byte_tokenizer(chat=False)
    fmt = chat.PromptFormat.of(plain)
    assert not fmt.chat and plain.decode(list(fmt.after)) == "\n"
    sample = ruler.samples(plain, "niah_single", 1024, 1, fmt=fmt)[0]
    assert sample.length == 1024 and "<|user|>" not in plain.decode(list(sample.prompt))


def test_chat_template_frames_the_prompt(tokenizer):
    sample = ruler.samples(tokenizer, "niah_single", 1024, 1)[0]
    text = tokenizer.decode(list(sample.prompt))
    assert text.startswith("<|user|>Some special magic numbers")
    assert "<|end|><|assistant|>The special magic number for" in text


def test_bad_arguments_are_one_line_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        ruler.samples(tokenizer, "nope", 1024, 1)
    with pytest.raises(ValueError, match="at least 256"):
        ruler.samples(tokenizer, "niah_single", 100, 1)
    with pytest.raises(ValueError, match="needs more than 300 tokens"):
        ruler.samples(tokenizer, "niah_multikey", 300, 1)
    with pytest.raises(ValueError, match="unknown haystack"):
        ruler.samples(tokenizer, "niah_single", 1024, 1, haystack_name="wiki")


def test_haystacks_are_real_text_shipped_with_python():
    pydoc, docs = haystack.text("pydoc"), haystack.text("docstrings")
    assert len(pydoc) > 300_000 and len(docs) > 300_000
    assert '"if" statement' in pydoc and '"""' not in docs[:1000]
    assert pydoc[:10_000] not in docs


def test_real_tokenizer_lengths_are_exact():
    from bench.realtext.fetch import MANIFEST, model_dir

    path = model_dir("smollm2-135m")
    if not (path / MANIFEST).is_file():
        pytest.skip("SmolLM2-135M is not fetched here")
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for task in ruler.TASKS:
        assert all(s.length == 2048 for s in ruler.samples(real, task, 2048, 2))
