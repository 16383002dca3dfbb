"""PrefixKV (arXiv 2412.03409) and its baselines as a transformers KV cache.

    import prefixkv
    out = prefixkv.generate(model, inputs, method="prefixkv", budget=0.2, max_new_tokens=64)
    out.sequences, out.cache_stats.kept

    # one prefill, every method x budget: {(label, budget): (batch, T) log-probabilities}
    prefixkv.sweep_logprobs(model, inputs, continuation, methods=["snapkv", "prefixkv"], budgets=[0.1, 0.2])

`prefixkv.METHODS` maps each method name to its dataclass.
"""

from prefixkv.allocation import prefix_allocation, pyramid_allocation, uniform_allocation
from prefixkv.budget import check_budget
from prefixkv.cache import CacheStats, CompressedLayer, PrefixKVCache
from prefixkv.calibrate import calibrate
from prefixkv.generation import GenerationOutput, attach, continuation_logprobs, generate, prefill_scores
from prefixkv.methods import METHODS, Method, build_method, method_spec, parse_method_spec, split_method_specs
from prefixkv.packed import PackedLayer
from prefixkv.profile import Profile
from prefixkv.scoring import key_importance
from prefixkv.sweep import PrefilledPrompt, prefill, sweep_generate, sweep_logprobs
from prefixkv.timer import NullTimer, Timer

__all__ = [
    "METHODS",
    "CacheStats",
    "CompressedLayer",
    "GenerationOutput",
    "Method",
    "NullTimer",
    "PackedLayer",
    "PrefilledPrompt",
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
    "method_spec",
    "parse_method_spec",
    "prefill",
    "prefill_scores",
    "prefix_allocation",
    "pyramid_allocation",
    "split_method_specs",
    "sweep_generate",
    "sweep_logprobs",
    "uniform_allocation",
]
