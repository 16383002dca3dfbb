"""What a quality evaluation measures: `QualitySpec`, the `[quality]` table of a matrix and the evaluate command's
settings alike.

Tasks of a text model (its own tokenizer, chat template where it has one):
- the RULER-style tasks of `bench.tasks.ruler` (`niah_single`, `niah_multikey`, `niah_multivalue`,
  `variable_tracking`, `common_words`, `passage_qa`), scored by exact match;
- `continuation`: the per-token loss of the true next `continuation` tokens of a haystack window (nats/token);
- `agreement`: the full cache's greedy output (`new_tokens` tokens) on a haystack window, read back under the
  compressed cache: top-1 agreement with it and its per-token loss ("loyalty").
Tasks of a LLaVA model (`bench.evaluation.photos`): `describe` and `question` over real photographs, scored as
`agreement`. "auto" is every task of the model's kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from bench.tasks import haystack, ruler

#: Exact-match tasks of text models, then the two measured against the haystack itself.
RULER_TASKS = tuple(ruler.TASKS)
TEXT_TASKS = (*RULER_TASKS, "continuation", "agreement")
IMAGE_TASKS = ("describe", "question")
PROTOCOLS = ("query-aware", "query-agnostic")
#: How each task is measured: "exact" (greedy reproduces the answer), "nll" (loss of the true continuation),
#: "loyalty" (agreement with, and loss of, the full cache's own greedy output).
MEASURES = {**dict.fromkeys(RULER_TASKS, "exact"), "continuation": "nll", "agreement": "loyalty",
            **dict.fromkeys(IMAGE_TASKS, "loyalty")}


@dataclass(frozen=True)
class QualitySpec:
    """The prompts of a quality evaluation. `prompts` per task; `length` tokens per text prompt (exact);
    `protocol`: "query-aware" compresses the question with the context, "query-agnostic" compresses the context
    and then reads the question; `haystack`: the real text (`bench.tasks.haystack`); `seed` places the windows and
    draws keys and values (another seed, another evaluation set)."""

    tasks: tuple[str, ...] = ("auto",)
    prompts: int = 64
    length: int = 2048
    protocol: str = "query-aware"
    haystack: str = "pydoc"
    seed: int = 0
    continuation: int = 64
    new_tokens: int = 32
    #: False: the matrix's cells are not timed, their rows carry the configuration and the quality only.
    timing: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks:
            raise ValueError(f"quality tasks must be a non-empty list, got {self.tasks!r}")
        known = ("auto", *TEXT_TASKS, *IMAGE_TASKS)
        for task in self.tasks:
            if task not in known:
                raise ValueError(f"unknown quality task {task!r}; known: {', '.join(known)}")
        for name, low in (("prompts", 1), ("length", 256), ("seed", 0), ("continuation", 1), ("new_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"quality {name} must be an integer >= {low}, got {value!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown quality protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        haystack.check_haystack(self.haystack)
        if not isinstance(self.timing, bool):
            raise ValueError(f"quality timing must be true or false, got {self.timing!r}")

    def tasks_for(self, image_model: bool) -> tuple[str, ...]:
        """The tasks run on a model of that kind ("auto" expanded); ValueError for a task of the other kind."""
        kind, other = (IMAGE_TASKS, TEXT_TASKS) if image_model else (TEXT_TASKS, IMAGE_TASKS)
        out: list[str] = []
        for task in self.tasks:
            if task in other:
                raise ValueError(f"quality task {task!r} needs a {'text' if image_model else 'LLaVA'} model")
            out += list(kind) if task == "auto" else [task]
        return tuple(dict.fromkeys(out))

    def settings(self, model: str) -> dict:
        """What one prompt's scores depend on, besides its id ("task/index"): records of other settings are not
        reused. The number of prompts and the list of tasks are not part of it (prompt i of a task is the same in
        a run of any size), so a larger run extends a smaller one."""
        out = asdict(self)
        for name in ("tasks", "prompts", "timing"):
            out.pop(name)
        return {"model": model, **out}

    def describe(self, tasks: tuple[str, ...]) -> str:
        """`ruler-2k query-aware (6 tasks x 64, pydoc, seed 0)`: the prompts in one phrase (`quality_source`)."""
        size = f"{self.length // 1024}k" if self.length % 1024 == 0 else str(self.length)
        return (f"engine: {size} {self.protocol} ({len(tasks)} tasks x {self.prompts}, {self.haystack}, "
                f"seed {self.seed})")

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> QualitySpec:
        """A `[quality]` table of a matrix (ValueError names the bad key or value)."""
        if not isinstance(table, Mapping):
            raise ValueError("[quality] must be a table")
        fields = set(cls.__dataclass_fields__)
        unknown = set(table) - fields
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in [quality]; known: {', '.join(sorted(fields))}")
        values = dict(table)
        if "tasks" in values:
            tasks = values["tasks"]
            values["tasks"] = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        return cls(**values)
