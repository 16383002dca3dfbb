"""Importance scores against a naive full-matrix softmax in float64."""

from __future__ import annotations

import pytest
import torch

from kernels.scores import attention_scores_ref
from prefixkv.scoring import attention_mass, key_importance


def naive_mass(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """(batch, q_heads, s_k) float64 from the materialised causal attention matrix."""
    q, k = q.double(), k.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    s_q, s_k = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    rows = torch.arange(s_q)[:, None] + (s_k - s_q)
    logits = logits.masked_fill(torch.arange(s_k)[None, :] > rows, float("-inf"))
    probs = torch.softmax(logits, -1)
    if window is not None:
        probs = probs[:, :, -window:]
    return probs.sum(2)


SHAPES = [  # (batch, q_heads, kv_heads, s_q, s_k, head_dim)
    (1, 4, 4, 33, 33, 16),  # MHA, prompt scoring
    (2, 8, 2, 70, 70, 32),  # GQA
    (2, 6, 3, 5, 41, 80),  # queries aligned with the last keys; head_dim 80
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [None, 7])
def test_reference_matches_naive(shape, window):
    batch, hq, hkv, s_q, s_k, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, hq, s_q, d, generator=gen) * 2
    k = torch.randn(batch, hkv, s_k, d, generator=gen)
    expected = naive_mass(q, k, window)
    # chunk_size 16 exercises several query chunks and a ragged last one
    out = attention_scores_ref(q, k, window=window, chunk_size=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_key_importance(shape, window, per_kv_head):
    batch, hq, hkv, s_q, s_k, d = shape
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, hq, s_q, d, generator=gen)
    k = torch.randn(batch, hkv, s_k, d, generator=gen)
    mass = naive_mass(q, k, window)
    expected = mass.view(batch, hkv, hq // hkv, s_k).mean(2) if per_kv_head else mass.mean(1)
    expected = expected / expected.sum(-1, keepdim=True)
    out = key_importance(q, k, window=window, per_kv_head=per_kv_head)
    assert out.dtype == torch.float32
    assert out.shape == ((batch, hkv, s_k) if per_kv_head else (batch, s_k))
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1).double(), torch.ones(out.shape[:-1], dtype=torch.float64), atol=1e-6, rtol=0)


def test_window_longer_than_prompt_is_the_prompt():
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    torch.testing.assert_close(attention_mass(q, k, window=64), attention_mass(q, k))


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "message"),
    [
        ((1, 3, 4, 8), (1, 2, 4, 8), "multiple"),
        ((1, 2, 9, 8), (1, 2, 4, 8), "more queries"),
        ((1, 2, 4, 8), (1, 2, 4, 16), "head_dim"),
        ((2, 4, 8), (1, 2, 4, 8), "4-D"),
    ],
)
def test_bad_shapes_name_values(q_shape, k_shape, message):
    with pytest.raises(ValueError, match=message):
        attention_scores_ref(torch.randn(q_shape), torch.randn(k_shape))
