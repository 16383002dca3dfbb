"""The prompts of a quality evaluation, as token ids of the model's own tokenizer (or processor).

A `Prompt` is what one prefill serves: a `context` that is always compressed, a `question` that is compressed with
it (query-aware) or read after it (query-agnostic), and a `target` read back under every compressed cache - the
answer of a task, the true continuation of a window, or (empty here) the full cache's own greedy output, which the
run generates first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bench.evaluation.spec import MEASURES, RULER_TASKS, QualitySpec
from bench.tasks import haystack, ruler
from bench.tasks.chat import PromptFormat


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt. `id` is "task/index"; `measure` how its target is scored (`spec.MEASURES`); `extra`
    holds the processor's other inputs (`pixel_values`) of an image prompt."""

    id: str
    task: str
    context: tuple[int, ...]
    question: tuple[int, ...] = ()
    target: tuple[int, ...] = ()
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def measure(self) -> str:
        return MEASURES[self.task]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.question)


def text_prompts(tokenizer, spec: QualitySpec, tasks: Sequence[str]) -> list[Prompt]:
    """The prompts of `tasks` for a text model, `spec.prompts` per task, task after task."""
    fmt = PromptFormat.of(tokenizer)
    out: list[Prompt] = []
    for task in tasks:
        if task in RULER_TASKS:
            for s in ruler.samples(tokenizer, task, spec.length, spec.prompts, haystack_name=spec.haystack,
                                   seed=spec.seed, fmt=fmt):
                out.append(Prompt(f"{task}/{s.index}", task, s.context, s.question, s.answer))
        else:
            span = spec.continuation if task == "continuation" else 0
            for i, (start, window) in enumerate(_windows(tokenizer, spec, task, span)):
                target = window[spec.length :] if span else ()
                out.append(Prompt(f"{task}/{i}", task, window[: spec.length], (), target))
                del start
    return out


def _windows(tokenizer, spec: QualitySpec, task: str, span: int) -> list[tuple[int, tuple[int, ...]]]:
    """`spec.prompts` haystack windows of `spec.length` (+ `span`) tokens, spread over the haystack and jittered
    by a generator seeded with (task, length, seed): the continuation and agreement windows differ."""
    import random

    ids = haystack.token_ids(tokenizer, spec.haystack)
    size = spec.length + span
    room = len(ids) - size
    if room < 0:
        raise ValueError(f"a window of {size} tokens does not fit in the {spec.haystack} haystack ({len(ids)} tokens)")
    rng = random.Random(f"{task}:{spec.length}:{spec.seed}")
    stride = room / spec.prompts
    starts = [min(room, int(i * stride + rng.random() * stride)) for i in range(spec.prompts)]
    return [(s, tuple(ids[s : s + size])) for s in starts]
