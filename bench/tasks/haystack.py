"""Real haystack text that every Python installation ships, so nothing is downloaded:

- `pydoc`: `pydoc_data.topics`, the language reference behind `help()` (about 465k characters in 79 topics; the
  text the real-text evaluation has always used);
- `docstrings`: the docstrings (300 characters or more) of the standard library's own modules, classes and
  functions, read from the source files with `ast` (nothing imported; about 960k characters on CPython 3.11;
  tests and GUI packages left out). A different register of English from the reference manual: the held-out text.

Both are functions of the installed Python version only. A haystack is consumed as token ids of the model's own
tokenizer (tokenized once per tokenizer and cached).
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

#: Top-level stdlib folders whose docstrings are not prose for a reader (tests, GUI demos, vendored code).
_SKIPPED = frozenset({"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip"})
_MIN_DOCSTRING = 300


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The text of every pydoc topic, in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@lru_cache(maxsize=1)
def docstrings_text() -> str:
    """The standard library's long docstrings (modules, classes, functions), in sorted file order, separated by
    blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if _SKIPPED.intersection(parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):  # a file this Python cannot parse holds no prose for us
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef |
                                                                       ast.ClassDef))]
        docs += [d.strip() for d in map(ast.get_docstring, nodes) if d and len(d) >= _MIN_DOCSTRING]
    return "\n\n".join(docs)


HAYSTACKS = {"pydoc": pydoc_text, "docstrings": docstrings_text}


def check_haystack(name: str) -> str:
    if name not in HAYSTACKS:
        raise ValueError(f"unknown haystack {name!r}; known: {', '.join(HAYSTACKS)}")
    return name


def text(name: str) -> str:
    return HAYSTACKS[check_haystack(name)]()


@lru_cache(maxsize=8)
def token_ids(tokenizer, name: str) -> tuple[int, ...]:
    """The haystack `name` as token ids of `tokenizer` (no special tokens)."""
    return tuple(tokenizer(text(name), add_special_tokens=False)["input_ids"])


def sentence_boundary(tokenizer, ids: Sequence[int], near: int, reach: int = 40) -> int:
    """The index in `ids` of the sentence end (right after a token ending in '.' or a newline) closest to `near`,
    looking `reach` tokens either way; 0 and len(ids) always count; `near` itself when none is in reach."""
    best, best_gap = near, None
    for j in range(max(0, near - reach), min(len(ids), near + reach) + 1):
        if j in (0, len(ids)) or tokenizer.decode([ids[j - 1]]).endswith((".", "\n")):
            gap = abs(j - near)
            if best_gap is None or gap < best_gap:
                best, best_gap = j, gap
    return best
