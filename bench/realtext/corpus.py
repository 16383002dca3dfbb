"""Real-text evaluation samples from text every Python installation ships: `pydoc_data.topics` (the language
reference behind `help()`, about 465k characters in 79 topics). Nothing is downloaded.

Two kinds of sample, both deterministic functions of (tokenizer, length, index):
- `continuation_samples`: a window of `length` tokens of the documentation and the true next `continuation` tokens
  (perplexity under a compressed cache; greedy agreement with the full cache);
- `retrieval_samples`: a window of the documentation with one fact ("The access code of the blue falcon is 48213.")
  planted at a controlled relative depth, followed by the question's stem ("... The access code of the blue falcon
  is"); the answer is the number, checked exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

#: Names for planted facts: adjective x noun, far from Python's vocabulary so the document cannot give the answer.
_ADJECTIVES = ("blue", "silver", "quiet", "northern", "crimson", "hollow", "golden", "amber", "ivory", "copper")
_NOUNS = ("falcon", "harbour", "lantern", "orchard", "glacier", "meadow", "compass", "beacon", "citadel", "river")


@lru_cache(maxsize=1)
def documentation() -> str:
    """The text of every pydoc topic, in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@lru_cache(maxsize=4)
def _token_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer(documentation(), add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ContinuationSample:
    """`prompt` (1, length) and its true `continuation` (1, T) token ids; `offset` is the window's first token."""

    prompt: torch.Tensor
    continuation: torch.Tensor
    offset: int


@dataclass(frozen=True)
class RetrievalSample:
    """`prompt` (1, n) ids with a fact planted at relative `depth` (0 = start, 1 = just before the question);
    `answer` the exact text expected right after the prompt."""

    prompt: torch.Tensor
    answer: str
    depth: float
    key: str


def _offsets(total: int, span: int, count: int, seed: int) -> list[int]:
    """`count` window starts spread over the corpus (evenly, jittered by `seed`), each leaving room for `span`."""
    if span > total:
        raise ValueError(f"a window of {span} tokens does not fit in the documentation's {total} tokens")
    room = total - span
    rng = random.Random(seed)
    stride = room / max(count, 1)
    return [min(room, int(i * stride + rng.random() * stride)) for i in range(count)]


def continuation_samples(
    tokenizer, length: int, count: int, *, continuation: int = 64, seed: int = 0
) -> list[ContinuationSample]:
    """`count` windows of `length` prompt tokens plus `continuation` true next tokens."""
    if length < 1 or continuation < 1 or count < 1:
        raise ValueError(f"length, continuation and count must be >= 1, got {length}, {continuation}, {count}")
    ids = _token_ids(tokenizer)
    out = []
    for start in _offsets(len(ids), length + continuation, count, seed):
        window = torch.tensor(ids[start : start + length + continuation])[None]
        out.append(ContinuationSample(window[:, :length], window[:, length:], start))
    return out


def retrieval_samples(
    tokenizer, length: int, depths: Sequence[float], per_depth: int, *, seed: int = 0
) -> list[RetrievalSample]:
    """For each depth, `per_depth` prompts of about `length` tokens with one planted fact and the question's stem.

    The fact is inserted at a sentence boundary of the documentation near `depth` of the context; every sample
    has its own key (adjective + noun) and 5-digit value, drawn from `seed`."""
    if length < 64:
        raise ValueError(f"retrieval prompts need length >= 64 tokens, got {length}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d!r}")
    ids = _token_ids(tokenizer)
    rng = random.Random(seed)
    keys = [f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    out = []
    starts = _offsets(len(ids), length, len(depths) * per_depth, seed + 1)
    depth_of = [d for d in depths for _ in range(per_depth)]
    for depth, start in zip(depth_of, starts, strict=True):
        key = keys[rng.randrange(len(keys))]
        value = f"{rng.randrange(10_000, 100_000)}"
        fact = f" The access code of the {key} is {value}. "
        question = f"\n\nQuestion: what is the access code of the {key}?\nAnswer: The access code of the {key} is"
        fact_ids = tokenizer(fact, add_special_tokens=False)["input_ids"]
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        context = length - len(fact_ids) - len(question_ids)
        if context < 16:
            raise ValueError(f"retrieval prompts of {length} tokens leave no room for context")
        text_ids = list(ids[start : start + context])
        at = _sentence_boundary(tokenizer, text_ids, round(depth * context))
        prompt = text_ids[:at] + fact_ids + text_ids[at:] + question_ids
        out.append(RetrievalSample(torch.tensor(prompt)[None], f" {value}", depth, key))
    return out


def _sentence_boundary(tokenizer, ids: Sequence[int], near: int) -> int:
    """The token index of the sentence end (a token ending in '.' or a newline) closest to `near`."""
    best, best_gap = near, None
    for j in range(max(0, near - 40), min(len(ids), near + 40) + 1):
        if j in (0, len(ids)) or tokenizer.decode([ids[j - 1]]).endswith((".", "\n")):
            gap = abs(j - near)
            if best_gap is None or gap < best_gap:
                best, best_gap = j, gap
    return best
