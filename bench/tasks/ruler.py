"""RULER-style long-context tasks (Hsieh et al., arXiv 2404.06654), generated offline over real haystack text.

Every sample is a deterministic function of (tokenizer, task, length, haystack, seed, index): its haystack window,
keys, values and depths are drawn from a `random.Random` seeded by those, so a run reproduces to the token. Its
length is exact in the model's own tokenizer: the prompt is assembled from token ids - the chat template's framing
(`bench.tasks.chat`), the instruction, a window of the haystack with the task's sentences inserted at sentence
boundaries, the question and the start of the answer - and the haystack window fills what the rest leaves.

A sample is split into `context` (the template's opening, the instruction and the haystack) and `question` (the
question, the opening of the assistant's turn and the start of its answer): under the query-aware protocol both are
compressed together; under the query-agnostic one the context is compressed and the question follows it. Its
`answer` is scored by exact match: the greedy continuation must begin with exactly those tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from bench.tasks import haystack
from bench.tasks.chat import PromptFormat, encode

_ADJECTIVES = (
    "amber", "ancient", "blue", "brave", "bright", "calm", "copper", "crimson", "curious", "distant", "eager",
    "frozen", "gentle", "golden", "hidden", "hollow", "humble", "ivory", "jolly", "lively", "lucky", "misty",
    "northern", "olive", "patient", "quiet", "rapid", "rusty", "silent", "silver", "stormy", "tender", "velvet",
)
_NOUNS = (
    "anchor", "badger", "beacon", "canyon", "citadel", "compass", "falcon", "fountain", "glacier", "harbour",
    "heron", "island", "lantern", "meadow", "orchard", "otter", "pebble", "pioneer", "quarry", "raven", "river",
    "saddle", "spruce", "summit", "thistle", "tunnel", "valley", "walrus", "willow", "zephyr",
)


@dataclass(frozen=True)
class TaskSample:
    """One prompt of a task, as token ids of the model's tokenizer.

    `context` + `question` is the prompt (exactly the requested length); `answer` the tokens the greedy
    continuation must start with; `evidence` the inserted sentences (each present exactly once in the context);
    `depth` the relative depth in the haystack of the sentence that answers (None where the evidence is spread)."""

    task: str
    index: int
    context: tuple[int, ...]
    question: tuple[int, ...]
    answer: tuple[int, ...]
    answer_text: str
    evidence: tuple[str, ...]
    depth: float | None
    offset: int  # the haystack window's first token

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.context + self.question

    @property
    def length(self) -> int:
        return len(self.context) + len(self.question)


@dataclass
class Draft:
    """What a task generator decides before the haystack is cut: texts, and where the inserted sentences go."""

    instruction: str
    question: str
    stem: str
    answer: str
    inserts: list[tuple[float, str]] = field(default_factory=list)  # (relative depth in the haystack, sentence)
    depth: float | None = None
    #: Strings that must occur exactly once in the context (the values a needle carries).
    unique: tuple[str, ...] = ()


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    """`count` different values of `draw()`, in the order drawn."""
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in values:
            values.append(value)
    return values


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


_NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def niah_single(rng: random.Random, depth: float) -> Draft:
    """One needle ("One of the special magic numbers for amber-falcon is: 4821337."); the question asks its value."""
    key, value = _key(rng), _number(rng)
    return Draft(
        _NIAH_INSTRUCTION,
        f"\n\nWhat is the special magic number for {key} mentioned in the provided text?",
        f"The special magic number for {key} mentioned in the provided text is: ",
        value,
        [(depth, _needle(key, value))],
        depth,
        (value,),
    )


def niah_multikey(rng: random.Random, depth: float, keys: int = 4) -> Draft:
    """`keys` needles with distinct keys (the others are distractors at random depths); one is asked."""
    names, values = _distinct(lambda: _key(rng), keys), _distinct(lambda: _number(rng), keys)
    inserts = [(depth, _needle(names[0], values[0]))]
    inserts += [(rng.random(), _needle(k, v)) for k, v in zip(names[1:], values[1:], strict=True)]
    return Draft(
        _NIAH_INSTRUCTION,
        f"\n\nWhat is the special magic number for {names[0]} mentioned in the provided text?",
        f"The special magic number for {names[0]} mentioned in the provided text is: ",
        values[0],
        inserts,
        depth,
        tuple(values),
    )


def niah_multivalue(rng: random.Random, depth: float, values: int = 2) -> Draft:
    """`values` needles with the same key and different values, the first at `depth`, the others after it; the
    answer lists them all, in the order they appear."""
    key, numbers = _key(rng), _distinct(lambda: _number(rng), values)
    depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(values - 1))
    return Draft(
        _NIAH_INSTRUCTION,
        f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text, in order?",
        f"The special magic numbers for {key} mentioned in the provided text are:\n- ",
        "\n- ".join(numbers),
        [(d, _needle(key, n)) for d, n in zip(depths, numbers, strict=True)],
        depth,
        tuple(numbers),
    )


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def variable_tracking(rng: random.Random, depth: float, hops: int = 1) -> Draft:
    """A chain of assignments (`VAR QWERT = 4821337.`, then `VAR ASDFG = VAR QWERT.` ...) from `depth` on, one
    statement per hop at increasing depths; the question asks the value of the chain's last variable."""
    names = _distinct(lambda: _variable(rng), hops + 1)
    value = _number(rng)
    depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(hops))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    return Draft(
        "Memorize and track the chain of variable assignments hidden in the following text.\n\n",
        f"\n\nFollowing the chain of assignments in the text above, what is the value of VAR {names[-1]}?",
        f"Following the chain of assignments, the value of VAR {names[-1]} is",
        f" {value}",
        list(zip(depths, statements, strict=True)),
        depth,
        (value,),
    )


def common_words(rng: random.Random, depth: float, distractors: int = 4, repeats: int = 5) -> Draft:
    """Labelled words inserted through the haystack: one word `repeats` times, `distractors` others once each, at
    random depths; the question asks for the most frequent."""
    words = [f"{a}{n}" for a, n in zip(rng.sample(_ADJECTIVES, distractors + 1), rng.sample(_NOUNS, distractors + 1),
                                         strict=True)]
    common, others = words[0], words[1:]
    labelled = [common] * repeats + others
    return Draft(
        "The following text contains code words, each written as 'The code word is \"X\".'. Some code words "
        "appear more often than others. Memorize how often each appears.\n\n",
        "\n\nWhich code word appears most often in the text above?",
        'The code word that appears most often in the text above is "',
        common,
        [(rng.random(), f'The code word is "{w}".') for w in labelled],
        None,
    )


_FIRST = ("Elena", "Marcus", "Ingrid", "Tobias", "Amara", "Felix", "Greta", "Hugo", "Leona", "Osric", "Priya",
          "Rafael", "Selma", "Viktor", "Yara", "Anselm")
_LAST = ("Marsh", "Okafor", "Lindqvist", "Brennan", "Castell", "Dumont", "Halloway", "Ivers", "Kowalski", "Moreau",
         "Nakamura", "Pellegrini", "Quist", "Ravensworth", "Sandoval", "Thorne")
_TOWNS = ("Quarry Bay", "Millbrook", "Ashford Vale", "Port Elwyn", "Dunmore", "Kestrel Point", "Larkhaven",
          "Westerholm", "Brackenridge", "Saltcombe", "Fenwick", "Oakhurst")
_SHOPS = ("bakery", "bookshop", "pharmacy", "workshop", "tea house", "gallery", "boatyard", "bicycle shop")


def _story(rng: random.Random, name: str) -> tuple[str, dict[str, str]]:
    facts = {"town": rng.choice(_TOWNS), "year": str(rng.randrange(1900, 2000)), "shop": rng.choice(_SHOPS),
             "title": f"The {rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()}"}
    text = (f"In {facts['year']}, {name} moved to {facts['town']}, where {name.split()[0]} opened a {facts['shop']} "
            f"called {facts['title']}.")
    return text, facts


def passage_qa(rng: random.Random, depth: float, distractors: int = 1) -> Draft:
    """A question answered by one short passage of the text (RULER's QA: a gold paragraph among others): passages
    about invented people ("In 1934, Elena Marsh moved to Quarry Bay, where Elena opened a bakery called The Amber
    Falcon.") are inserted, the gold one at `depth`; the question asks one fact of the gold passage in other words."""
    people: list[str] = []
    while len(people) < distractors + 1:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name.split()[0] not in {p.split()[0] for p in people}:
            people.append(name)
    stories = [_story(rng, name) for name in people]
    name, (gold, facts) = people[0], stories[0]
    first = name.split()[0]
    kind = rng.choice(("year", "town", "title"))
    question, stem, answer = {
        "year": (f"In which year did {name} move to {facts['town']}?", f"{name} moved to {facts['town']} in the year",
                 f" {facts['year']}"),
        "town": (f"To which town did {name} move?", f"{name} moved to the town of", f" {facts['town']}"),
        "title": (f"What was the name of the {facts['shop']} that {first} opened?",
                  f"The name of the {facts['shop']} that {first} opened was", f" {facts['title']}"),
    }[kind]
    inserts = [(depth, gold)] + [(rng.random(), text) for text, _ in stories[1:]]
    return Draft(
        "Answer the question based on the passages hidden in the following text. Only give the answer.\n\n",
        f"\n\nQuestion: {question}",
        stem,
        answer,
        inserts,
        depth,
        (gold,),
    )


#: Task name -> generator (rng, depth) -> Draft.
TASKS: dict[str, Callable[[random.Random, float], Draft]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "passage_qa": passage_qa,
}


def check_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return name


def depth_of(index: int) -> float:
    """The depth of sample `index`: a golden-ratio sequence over [0.05, 0.95], so that any first n samples spread
    evenly over depths and a sample does not depend on how many are drawn."""
    return 0.05 + 0.9 * ((index * 0.6180339887498949) % 1.0)


def samples(
    tokenizer, task: str, length: int, count: int, *, haystack_name: str = "pydoc", seed: int = 0,
    fmt: PromptFormat | None = None,
) -> list[TaskSample]:
    """`count` prompts of `task`, each exactly `length` tokens of `tokenizer`, over the haystack `haystack_name`."""
    check_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"task prompts need a length of at least 256 tokens, got {length!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    fmt = fmt or PromptFormat.of(tokenizer)
    hay = haystack.token_ids(tokenizer, haystack.check_haystack(haystack_name))
    return [_sample(tokenizer, fmt, hay, task, length, seed, i) for i in range(count)]


def _sample(tokenizer, fmt: PromptFormat, hay: Sequence[int], task: str, length: int, seed: int,
            index: int) -> TaskSample:
    rng = random.Random(f"{task}:{length}:{seed}:{index}")
    depth = depth_of(index)
    for _attempt in range(100):
        draft = TASKS[task](rng, depth)
        sample = _assemble(tokenizer, fmt, hay, task, index, length, draft, rng)
        if sample is not None:
            return sample
    raise ValueError(f"task {task!r}: no valid prompt of {length} tokens after 100 draws (sample {index})")


def _assemble(tokenizer, fmt, hay, task, index, length, draft: Draft, rng: random.Random) -> TaskSample | None:
    """The sample of `draft` over a window of `hay` drawn from `rng`, or None when the draw is unusable (a value
    that also occurs in the haystack, a quote that is not unique)."""
    head = list(fmt.before) + encode(tokenizer, draft.instruction)
    tail = encode(tokenizer, draft.question) + list(fmt.after) + encode(tokenizer, draft.stem)
    inserts = sorted(((d, encode(tokenizer, " " + text + "\n"), text) for d, text in draft.inserts),
                     key=lambda item: item[0])
    room = length - len(head) - len(tail) - sum(len(ids) for _, ids, _ in inserts)
    if room < 64:
        raise ValueError(f"task {task!r} needs more than {length} tokens (only {room} left for the haystack)")
    offset = rng.randrange(0, len(hay) - room)
    window = list(hay[offset : offset + room])
    body, cut = [], 0
    for d, ids, _ in inserts:
        at = max(cut, haystack.sentence_boundary(tokenizer, window, round(d * room)))
        body += window[cut:at] + ids
        cut = at
    body += window[cut:]
    context = tuple(head + body)
    text = tokenizer.decode(context)
    texts = [t for _, _, t in inserts]
    evidence = tuple(dict.fromkeys(texts))
    if any(text.count(e) != texts.count(e) for e in evidence) or any(text.count(u) != 1 for u in draft.unique):
        return None
    return TaskSample(task, index, context, tuple(tail), tuple(encode(tokenizer, draft.answer)), draft.answer,
                      evidence, draft.depth, offset)
