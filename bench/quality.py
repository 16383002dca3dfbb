"""Output quality of a compressed KV cache: task scores against the scene's ground truth, and closeness to the
full cache (token agreement, ROUGE-L, perplexity of the reference answer under teacher forcing).

Task scores: object-level precision / recall / F1 for descriptions (the generated text is parsed back into
(size, colour, shape, row, column) objects), exact-match accuracy for questions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer

from bench.embedded.scenes import COLOURS, GRID, SHAPES, SIZES, Scene

ObjectKey = tuple[str, str, str, int, int]  # size, colour, shape, row, column

_OBJECT = re.compile(
    rf"\ba ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at row ([1-{GRID}]) column ([1-{GRID}])\b"
)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def parse_description(text: str) -> list[ObjectKey]:
    """The objects a description names, in order (malformed fragments are skipped, duplicates kept)."""
    return [(s, c, sh, int(r), int(col)) for s, c, sh, r, col in _OBJECT.findall(text)]


def scene_objects(scene: Scene) -> list[ObjectKey]:
    return [(o.size, o.colour, o.shape, o.row, o.col) for o in scene.objects]


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float


def object_prf(predicted: Sequence[ObjectKey], reference: Sequence[ObjectKey]) -> PRF:
    """Object-level precision, recall and F1; a repeated prediction counts once as a hit and then as a false
    positive. Two empty lists score 1.0."""
    ref = list(reference)
    hits = 0
    for obj in predicted:
        if obj in ref:
            ref.remove(obj)
            hits += 1
    if not predicted and not reference:
        return PRF(1.0, 1.0, 1.0)
    p = hits / len(predicted) if predicted else 0.0
    r = hits / len(reference) if reference else 0.0
    return PRF(p, r, 2 * p * r / (p + r) if p + r else 0.0)


def description_prf(text: str, scene: Scene) -> PRF:
    """Object-level scores of a generated description against the scene's ground truth."""
    return object_prf(parse_description(text), scene_objects(scene))


def normalise(text: str) -> str:
    return " ".join(text.split())


def answer_correct(text: str, reference: str) -> bool:
    """Exact match after whitespace normalisation."""
    return normalise(text) == normalise(reference)


def truncate_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """`ids` up to and including the first `eos_id` (all of them if there is none)."""
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def token_agreement(ids: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference's positions (the full cache's answer, eos included) where `ids` has the same token.
    1.0 when both are empty."""
    if not reference:
        return 1.0 if not ids else 0.0
    return sum(a == b for a, b in zip(ids, reference, strict=False)) / len(reference)


def rouge_l(text: str, reference: str) -> float:
    """ROUGE-L F-measure (the `rouge-score` package)."""
    if not text.strip() and not reference.strip():
        return 1.0
    return float(_ROUGE.score(reference, text)["rougeL"].fmeasure)


def perplexity(logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(-mean log-prob) over the tokens where `mask` is true (all by default); `logprobs` is (batch, T)."""
    lp = logprobs.float()
    if mask is not None:
        if mask.shape != lp.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(lp.shape)}")
        lp = lp[mask.bool()]
    if lp.numel() == 0:
        raise ValueError("perplexity of zero tokens")
    return math.exp(-lp.mean().item())
