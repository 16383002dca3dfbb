"""The compressed cache end to end through the Triton kernels (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

import prefixkv
from kernels import kernels_available, reference_only
from tests.models import text_inputs, tiny_llama
from tests.oracle import oracle_logits
from tests.test_cache import compressed_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not kernels_available(DEVICE), reason="the kernels run neither on CUDA nor in the interpreter")
@pytest.mark.parametrize(("method", "decode"), [("prefixkv", "grow"), ("snapkv", "score")])
def test_kernels_match_references_and_oracle(method, decode):
    llama = tiny_llama().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in text_inputs(batch=2, seq=40, seed=4).items()}
    kwargs = {"decode": decode, "window": 8} if method == "snapkv" else {"decode": decode}
    out = prefixkv.generate(llama, inputs, method=method, budget=0.25, max_new_tokens=5, **kwargs)
    with reference_only():
        ref = prefixkv.generate(llama, inputs, method=method, budget=0.25, max_new_tokens=5, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.cache_stats.kept == ref.cache_stats.kept
    for a, b in zip(out.cache_stats.positions, ref.cache_stats.positions, strict=True):
        assert torch.equal(a, b)
    generated = out.sequences[:, 40:]
    logits, cache = compressed_logits(llama, inputs, method, 0.25, generated, **kwargs)
    expected = oracle_logits(llama, inputs, generated, [layer.history for layer in cache.layers])
    torch.testing.assert_close(logits, expected.to(logits.device), atol=2e-4, rtol=2e-4)
