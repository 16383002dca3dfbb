"""Methods as the command line and the tables name them: method specs (`prefixkv.parse_method_spec`), e.g.
`prefixkv[visibility_norm=True,layer_floor=0.25]`."""

from __future__ import annotations

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
    """A method spec (`prefixkv.parse_method_spec`: `name` or `name[key=value,...]`); ValueError names the bad part."""
    name, kwargs = prefixkv.parse_method_spec(text)
    prefixkv.build_method(name, **kwargs)  # rejects bad hyper-parameters now, not after the full-cache pass
    return Variant(text.strip(), name, kwargs)


def parse_methods(text: str) -> list[Variant]:
    """Comma-separated variants (commas inside brackets belong to the variant); 'all' is every method."""
    out: list[Variant] = []
    for part in filter(None, prefixkv.split_method_specs(text)):
        out += [Variant(m, m) for m in prefixkv.METHODS] if part == "all" else [parse_variant(part)]
    return out
