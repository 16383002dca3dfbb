"""The method registry: one name per method; it drives `prefixkv.generate`, the bench matrix and the tests."""

from __future__ import annotations

from prefixkv.methods.base import Method
from prefixkv.methods.full import FullCache
from prefixkv.methods.h2o import H2O
from prefixkv.methods.prefixkv import PrefixKV
from prefixkv.methods.pyramidkv import PyramidKV
from prefixkv.methods.snapkv import SnapKV
from prefixkv.methods.streaming_llm import StreamingLLM
from prefixkv.methods.uniform import Uniform

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, PyramidKV, Uniform, PrefixKV)
}


def build_method(name: str | Method, **kwargs) -> Method:
    """An instance of the method called `name`, with `kwargs` as its hyper-parameters."""
    if isinstance(name, Method):
        if kwargs:
            raise ValueError(f"method instance {name!r} given together with keyword arguments {sorted(kwargs)}")
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for method {name!r}: {err}") from None


__all__ = ["METHODS", "Method", "build_method"]
