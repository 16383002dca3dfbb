"""Windows of real text every Python installation ships (`pydoc_data.topics`, the language reference behind
`help()`; `bench.tasks.haystack`), nothing downloaded: `continuation_samples` are windows of `length` tokens and
their true next `continuation` tokens, deterministic functions of (tokenizer, length, count, seed). They feed the
real model's timed cells, its calibration and its attention study; the quality engine's tasks live in
`bench.tasks` and `bench.evaluation`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from bench.tasks import haystack


def documentation() -> str:
    """The text of every pydoc topic, in sorted topic order, separated by blank lines."""
    return haystack.pydoc_text()


def _token_ids(tokenizer) -> tuple[int, ...]:
    return haystack.token_ids(tokenizer, "pydoc")


@dataclass(frozen=True)
class ContinuationSample:
    """`prompt` (1, length) and its true `continuation` (1, T) token ids; `offset` is the window's first token."""

    prompt: torch.Tensor
    continuation: torch.Tensor
    offset: int


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
