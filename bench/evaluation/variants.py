"""Methods as the command line and the tables name them: `name` or `name[key=value,...]` (values as Python
literals), e.g. `prefixkv[visibility_norm=True,layer_floor=0.25]`."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import prefixkv


@dataclass(frozen=True)
class Variant:
    """A method and its hyper-parameters; `label` is how it was written (`prefixkv[layer_floor=0.25]`)."""

    label: str
    method: str
    kwargs: dict = field(default_factory=dict)

    def build(self) -> prefixkv.Method:
        return prefixkv.build_method(self.method, **self.kwargs)


def parse_variant(text: str) -> Variant:
    """`name` or `name[key=value,...]` (values as Python literals); ValueError names the bad part."""
    text = text.strip()
    name, _, rest = text.partition("[")
    kwargs: dict = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"method {text!r}: hyper-parameters must be closed by ']'")
        for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method {text!r}: {item!r} is not key=value")
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
    if name not in prefixkv.METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(prefixkv.METHODS)}")
    prefixkv.build_method(name, **kwargs)  # rejects bad hyper-parameters now, not after the full-cache pass
    return Variant(text, name, kwargs)


def parse_methods(text: str) -> list[Variant]:
    """Comma-separated variants (commas inside brackets belong to the variant); 'all' is every method."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out: list[Variant] = []
    for part in filter(None, (p.strip() for p in parts)):
        out += [Variant(m, m) for m in prefixkv.METHODS] if part == "all" else [parse_variant(part)]
    return out
