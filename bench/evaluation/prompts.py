"""The prompts of a quality evaluation, as token ids of the model's own tokenizer (or processor).

A `Prompt` is what one prefill serves: a `context` that is always compressed, a `question` that is compressed with
it (query-aware) or read after it (query-agnostic), and a `target` read back under every compressed cache - the
answer of a task, the true continuation of a window, or (empty here) the full cache's own greedy output, which the
run generates first.
"""

from __future__ import annotations

import random
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
    """The prompts of `tasks` for a text model, `spec.prompts` per task, interleaved (the first prompt of every
    task, then the second...), so that a run stopped early has every task at about the same count. Prompt i of a
    task does not depend on how many are drawn: a larger run extends a smaller one."""
    fmt = PromptFormat.of(tokenizer)
    by_task: list[list[Prompt]] = []
    for task in tasks:
        if task in RULER_TASKS:
            samples = ruler.samples(tokenizer, task, spec.length, spec.prompts, haystack_name=spec.haystack,
                                    seed=spec.seed, fmt=fmt)
            by_task.append([Prompt(f"{task}/{s.index}", task, s.context, s.question, s.answer) for s in samples])
        else:
            span = spec.continuation if task == "continuation" else 0
            windows = [_window(tokenizer, spec, task, i, spec.length + span) for i in range(spec.prompts)]
            by_task.append([Prompt(f"{task}/{i}", task, w[: spec.length], (), w[spec.length :])
                            for i, w in enumerate(windows)])
    return [prompts[i] for i in range(spec.prompts) for prompts in by_task]


def _window(tokenizer, spec: QualitySpec, task: str, index: int, size: int) -> tuple[int, ...]:
    """A window of `size` tokens of the haystack, placed by a generator seeded with (task, length, seed, index)."""
    ids = haystack.token_ids(tokenizer, spec.haystack)
    if size > len(ids):
        raise ValueError(f"a window of {size} tokens does not fit in the {spec.haystack} haystack ({len(ids)} tokens)")
    start = random.Random(f"{task}:{spec.length}:{spec.seed}:{index}").randrange(len(ids) - size + 1)
    return tuple(ids[start : start + size])
