"""Triton kernels for PrefixKV's heavy steps, each with a plain-torch reference beside it.

This package imports only torch and triton; it never imports `prefixkv` or `bench`. Where
`kernels_available(device)` is False (CPU tensors without TRITON_INTERPRET=1) the wrappers run the references.
"""

from kernels.compact import check_indices, compact_kv, compact_kv_into, compact_kv_ref
from kernels.decode_attention import packed_decode_attention, packed_decode_attention_ref
from kernels.scores import attention_scores, attention_scores_ref, kernels_available, reference_only

__all__ = [
    "attention_scores",
    "attention_scores_ref",
    "check_indices",
    "compact_kv",
    "compact_kv_into",
    "compact_kv_ref",
    "kernels_available",
    "packed_decode_attention",
    "packed_decode_attention_ref",
    "reference_only",
]
