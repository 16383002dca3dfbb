"""The method registry: one name per method; it drives `prefixkv.generate`, the bench matrix and the tests."""

from __future__ import annotations

from prefixkv.methods.base import Method
from prefixkv.methods.full import FullCache
from prefixkv.methods.h2o import H2O
from prefixkv.methods.prefixkv import PrefixKV
from prefixkv.methods.pyramidkv import PyramidKV
from prefixkv.methods.snapkv import SnapKV
from prefixkv.methods.spec import method_spec, parse_method_spec, split_method_specs
from prefixkv.methods.streaming_llm import StreamingLLM
from prefixkv.methods.uniform import Uniform

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, PyramidKV, Uniform, PrefixKV)
}


def build_method(method: str | Method, **kwargs) -> Method:
    """An instance of `method`: a registered name or a method spec (`prefixkv[visibility_norm=True]`, see
    `prefixkv.methods.spec`), with `kwargs` as further hyper-parameters; a `Method` instance is returned as it is.
    ValueError (one line) names an unknown method or a bad hyper-parameter."""
    if isinstance(method, Method):
        if kwargs:
            raise ValueError(f"method instance {method!r} given together with keyword arguments {sorted(kwargs)}")
        return method
    name, given = parse_method_spec(method)
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise ValueError(f"method {method!r}: {', '.join(twice)} given both in the spec and as keyword arguments")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        return METHODS[name](**given, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for method {method!r}: {err}") from None


__all__ = ["METHODS", "Method", "build_method", "method_spec", "parse_method_spec", "split_method_specs"]
