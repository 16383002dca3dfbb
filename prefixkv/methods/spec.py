"""The method-spec syntax: one string naming a method and its hyper-parameters, accepted wherever a method is named
(`prefixkv.build_method`, `generate(method=...)`, `attach`, `bench run --methods`, matrix files,
`bench.realtext.evaluate`)::

    prefixkv
    prefixkv[visibility_norm=True,layer_floor=0.25]
    h2o[decode='score',recent_ratio=0.5]

A value is a Python literal (`ast.literal_eval`: `0.25`, `True`, `None`, `'score'`); a bare word is taken as a string
(`decode=score`). Several specs are separated by commas; a comma inside brackets belongs to its spec.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping


def parse_method_spec(text: str) -> tuple[str, dict[str, object]]:
    """`name[key=value,...]` as (name, {key: value}); ValueError (one line) naming the bad part."""
    if not isinstance(text, str):
        raise ValueError(f"a method spec is a string such as 'prefixkv[recent=8]', got {text!r}")
    spec = text.strip()
    name, bracket, rest = spec.partition("[")
    name = name.strip()
    if not name:
        raise ValueError(f"method spec {text!r} names no method")
    if not bracket:
        return name, {}
    if not rest.endswith("]") or "[" in rest[:-1] or "]" in rest[:-1]:
        raise ValueError(f"method spec {text!r}: hyper-parameters go in one pair of brackets at the end, "
                         "e.g. prefixkv[recent=8]")
    kwargs: dict[str, object] = {}
    body = rest[:-1].strip()
    for item in (s.strip() for s in body.split(",")) if body else ():
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key.isidentifier():
            raise ValueError(f"method spec {text!r}: {item!r} is not key=value")
        if key in kwargs:
            raise ValueError(f"method spec {text!r}: {key!r} is given twice")
        kwargs[key] = _literal(text, item, value)
    return name, kwargs


def _literal(text: str, item: str, value: str) -> object:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if value.isidentifier():  # a bare word: decode=score
            return value
        raise ValueError(f"method spec {text!r}: the value of {item!r} is not a Python literal") from None


def method_spec(name: str, kwargs: Mapping[str, object] | None = None) -> str:
    """The canonical spec of `name` with `kwargs`: keys sorted, values as Python literals (`repr`), no spaces;
    `name` alone without hyper-parameters. `parse_method_spec(method_spec(n, k)) == (n, k)` for literal values."""
    if not kwargs:
        return name
    return f"{name}[{','.join(f'{key}={value!r}' for key, value in sorted(kwargs.items()))}]"


def split_method_specs(text: str) -> list[str]:
    """Comma-separated specs (`uniform,prefixkv[recent=8,layer_floor=0.25]`) as a list; a comma inside brackets
    belongs to its spec. Items are stripped; empty items are kept (as '') for the caller to refuse."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items
