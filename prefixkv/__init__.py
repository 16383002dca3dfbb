"""PrefixKV (arXiv 2412.03409) and its baselines as a transformers KV cache.

    import prefixkv
    out = prefixkv.generate(model, inputs, method="prefixkv", budget=0.2, max_new_tokens=64)
    out.sequences, out.cache_stats.kept

`prefixkv.METHODS` maps each method name to its dataclass.
"""

from prefixkv.allocation import prefix_allocation, pyramid_allocation, uniform_allocation
from prefixkv.budget import check_budget
from prefixkv.cache import CacheStats, CompressedLayer, PrefixKVCache
from prefixkv.calibrate import calibrate
from prefixkv.generation import GenerationOutput, attach, continuation_logprobs, generate, prefill_scores
from prefixkv.methods import METHODS, Method, build_method
from prefixkv.packed import PackedLayer
from prefixkv.profile import Profile
from prefixkv.scoring import key_importance
from prefixkv.timer import NullTimer, Timer

__all__ = [
    "METHODS",
    "CacheStats",
    "CompressedLayer",
    "GenerationOutput",
    "Method",
    "NullTimer",
    "PackedLayer",
    "PrefixKVCache",
    "Profile",
    "Timer",
    "attach",
    "build_method",
    "calibrate",
    "check_budget",
    "continuation_logprobs",
    "generate",
    "key_importance",
    "prefill_scores",
    "prefix_allocation",
    "pyramid_allocation",
    "uniform_allocation",
]
