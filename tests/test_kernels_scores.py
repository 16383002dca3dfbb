"""`attention_scores` (Triton) against `attention_scores_ref` (float32 torch); on CPU through TRITON_INTERPRET=1."""

from __future__ import annotations

import math

import pytest
import torch

import kernels.scores as scores_module
from kernels import attention_scores, attention_scores_ref, kernels_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter mishandles bf16 tl.dot: bf16 runs only on the GPU.
CPU_DTYPES = [torch.float16, torch.float32]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (batch, q_heads, kv_heads, s_q, s_k, head_dim, causal, window): sizes off the block multiples (1, 97, 1025),
# head_dim 80 and 96 (padded BLOCK_D), MHA, GQA and MQA, full and windowed, s_q < s_k.
# The interpreter runs each program in numpy, so the 1025 cases keep one or two heads and one batch.
CPU_CASES = [
    (1, 2, 2, 1, 1, 64, True, None),
    (2, 4, 2, 97, 97, 80, True, None),
    (1, 2, 2, 97, 97, 96, False, None),
    (1, 4, 1, 97, 250, 128, True, 33),
    (1, 2, 1, 40, 97, 64, False, 7),
    (1, 1, 1, 1025, 1025, 64, True, None),
    (1, 2, 1, 1025, 1025, 128, True, 97),
]
GPU_CASES = [
    *CPU_CASES,
    (2, 32, 8, 4096, 4096, 128, True, None),
    (1, 32, 8, 1025, 8193, 128, True, None),
    (2, 16, 16, 2000, 2000, 80, False, None),
    (1, 28, 4, 8192, 8192, 96, True, 64),
    (1, 32, 8, 32768, 32768, 128, True, 512),
]


def _tolerance(head_dim: int) -> float:
    """Relative tolerance on each key's mass, the same for every input dtype.

    fp16/bf16 inputs convert exactly to fp32 and both the kernel and the reference accumulate dot products in fp32
    (fp32 inputs use "ieee" dots, not TF32), so the only error is fp32 rounding: about sqrt(head_dim) ulps in each
    logit, which exp turns into the same relative error in each probability and which sums over rows preserve.
    The factor 16 covers the log-sum-exp and the GPU's approximate exp2.
    """
    return 16 * torch.finfo(torch.float32).eps * math.sqrt(head_dim)


def _inputs(case, dtype, device=DEVICE, seed=0):
    batch, q_heads, kv_heads, s_q, s_k, head_dim, _, _ = case
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, q_heads, s_q, head_dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, s_k, head_dim, generator=gen, device=device).to(dtype)
    return q, k


def _check(case, dtype, device=DEVICE):
    batch, q_heads, _, s_q, s_k, head_dim, causal, window = case
    q, k = _inputs(case, dtype, device)
    out = torch.full((batch, q_heads, s_k), float("nan"), device=device)  # an unwritten element fails
    got = attention_scores(q, k, causal=causal, window=window, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = attention_scores_ref(q, k, causal=causal, window=window)
    rtol = _tolerance(head_dim)
    # Every visible key gets a mass of at least ~exp(-2 * max|logit|) per row, far above atol = rtol / 100.
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol / 100)
    # Each query row is a distribution: the masses sum to the number of queries.
    rows = s_q if window is None else min(window, s_q)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got[..., 0], float(rows)), rtol=rtol * 4, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_gpu(case, dtype):
    _check(case, dtype, device="cuda")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    # Model layout (batch, seq, heads, d) transposed to (batch, heads, seq, d), and keys taken as every other
    # feature of a wider tensor: no dimension has unit stride in the usual place.
    q = torch.randn(2, 97, 4, 64, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)
    k = torch.randn(2, 2, 120, 128, generator=gen, device=DEVICE).to(dtype)[:, :, 10:107, ::2]
    assert not q.is_contiguous() and k.stride(-1) == 2
    out = torch.full((4, 2, 97), float("nan"), device=DEVICE).transpose(0, 1)  # a strided output too
    got = attention_scores(q, k, window=50, out=out)
    want = attention_scores_ref(q.contiguous(), k.contiguous(), window=50)
    torch.testing.assert_close(got, want, rtol=_tolerance(64), atol=_tolerance(64) / 100)


def test_explicit_scale():
    case = (1, 2, 1, 97, 97, 64, True, None)
    q, k = _inputs(case, torch.float32)
    got = attention_scores(q, k, scale=0.3)
    want = attention_scores_ref(q, k, scale=0.3)
    torch.testing.assert_close(got, want, rtol=_tolerance(64), atol=_tolerance(64) / 100)


def test_falls_back_to_reference_without_kernels(monkeypatch):
    monkeypatch.setattr(scores_module, "_INTERPRET", False)
    assert not kernels_available("cpu")
    q, k = _inputs((1, 2, 1, 9, 9, 64, True, None), torch.float32, device="cpu")
    torch.testing.assert_close(attention_scores(q, k), attention_scores_ref(q, k), rtol=0, atol=0)


def test_kernels_available_on_cuda():
    assert kernels_available("cuda")
    assert kernels_available("cpu") == scores_module._INTERPRET


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "kwargs", "match"),
    [
        ((1, 2, 4, 64), (1, 2, 4), {}, "4-D"),
        ((1, 3, 4, 64), (1, 2, 4, 64), {}, "multiple of kv_heads"),
        ((1, 2, 9, 64), (1, 2, 4, 64), {}, "more queries"),
        ((1, 2, 4, 64), (1, 2, 4, 32), {}, "head_dim"),
        ((1, 2, 4, 64), (1, 2, 4, 64), {"window": 0}, "window"),
        ((1, 2, 4, 512), (1, 2, 4, 512), {}, "exceeds"),
        ((1, 2, 4, 64), (1, 2, 4, 64), {"out": torch.empty(1, 2, 5)}, "out must be"),
    ],
)
def test_rejects_bad_arguments(q_shape, k_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_scores(torch.randn(q_shape), torch.randn(k_shape), **kwargs)


def test_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        attention_scores(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64).half())
    with pytest.raises(ValueError, match="dtype"):
        attention_scores(torch.randn(1, 2, 4, 64).double(), torch.randn(1, 2, 4, 64).double())


@pytest.mark.parametrize("fn", [attention_scores, attention_scores_ref])
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ("q-list", {}, TypeError, r"^q must be a torch.Tensor, got list"),
        ("k-array", {}, TypeError, r"^k must be a torch.Tensor, got ndarray"),
        ("ok", {"window": 2.5}, TypeError, r"^window must be an int .* got 2.5$"),
        ("ok", {"window": True}, TypeError, r"^window must be an int .* got True$"),
        ("ok", {"scale": "x"}, TypeError, r"^scale must be a float or None, got 'x'$"),
        ("ok", {"scale": float("nan")}, ValueError, r"^scale must be a finite number > 0, got nan$"),
        ("ok", {"scale": -1.0}, ValueError, r"^scale must be a finite number > 0, got -1.0$"),
        ("ok", {"causal": "yes"}, TypeError, r"^causal must be a bool, got 'yes'$"),
        ("head-dim-0", {}, ValueError, r"^head_dim must be >= 1, got q \(1, 2, 4, 0\)$"),
    ],
)
def test_wrappers_reject_bad_input_at_the_door(fn, args, kwargs, error, match):
    # The audit: window=2.5, scale='x', head_dim 0 and a list gave TypeError/ZeroDivisionError/AttributeError from
    # deep inside; each now names the argument and the value.
    import numpy as np

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    if args == "q-list":
        q = q.tolist()
    elif args == "k-array":
        k = np.zeros((1, 2, 4, 8))
    elif args == "head-dim-0":
        q, k = torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 0)
    with pytest.raises(error, match=match):
        fn(q, k, **kwargs)


def test_numpy_integers_and_floats_are_accepted():
    import numpy as np

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    expected = attention_scores_ref(q, k, window=2, scale=0.5)
    torch.testing.assert_close(attention_scores(q, k, window=np.int64(2), scale=np.float32(0.5)), expected)


def test_fp32_tunes_only_small_blocks():
    """First-call cost: fp32 ("ieee" dot) autotunes over the small-block configs only; fp16/bf16 over all."""
    from kernels.scores import LSE_CONFIGS, SCORE_CONFIGS, _prune_fp32

    for configs in (LSE_CONFIGS, SCORE_CONFIGS):
        fp32 = _prune_fp32(configs, {"q_ptr": torch.empty(1)})
        assert 0 < len(fp32) < len(configs)
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in fp32)
        assert _prune_fp32(configs, {"q_ptr": torch.empty(1, dtype=torch.float16)}) == configs
