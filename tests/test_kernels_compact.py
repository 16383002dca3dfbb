"""`compact_kv` / `compact_kv_into` (Triton) against `compact_kv_ref`; on CPU through TRITON_INTERPRET=1.

A compaction is a copy, exact in every dtype, so results are compared with `torch.equal` (no tolerance).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.scores as scores_module
from kernels import check_indices, compact_kv, compact_kv_into, compact_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# No tl.dot here, so bf16 runs in the interpreter too.
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (batch, kv_heads, seq, head_dim, kept): sizes off the block multiples, head_dim 80 and 96, keep-one, keep-all.
CPU_CASES = [
    (1, 1, 1, 64, 1),
    (2, 3, 97, 80, 37),
    (1, 2, 97, 96, 97),
    (2, 2, 1025, 128, 500),
    (1, 1, 1025, 64, 1025),
]
# The interpreter runs each program in numpy: every dtype and index layout on the small cases, two combinations
# on the 1025 ones.
CPU_PARAMS = [
    *(
        (case, dtype, shared, index_dtype)
        for case in CPU_CASES[:3]
        for dtype in DTYPES
        for shared in (False, True)
        for index_dtype in (torch.int32, torch.int64)
    ),
    (CPU_CASES[3], torch.float16, False, torch.int64),
    (CPU_CASES[3], torch.bfloat16, True, torch.int32),
    (CPU_CASES[4], torch.float32, False, torch.int32),
]
GPU_CASES = [
    *CPU_CASES,
    (4, 8, 32768, 128, 16384),
    (1, 32, 8193, 80, 1025),
    (8, 8, 4096, 96, 4095),
]


def _cache(batch, heads, seq, head_dim, dtype, device=DEVICE, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(batch, heads, seq, head_dim, generator=gen, device=device).to(dtype)
    values = torch.randn(batch, heads, seq, head_dim, generator=gen, device=device).to(dtype)
    return keys, values


def _indices(batch, heads, seq, kept, *, shared=False, dtype=torch.int64, device=DEVICE, seed=0):
    """Random sorted unique indices: (batch, kept) when `shared`, else (batch, heads, kept)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = batch if shared else batch * heads
    idx = torch.rand(rows, seq, generator=gen, device=device).argsort(-1)[:, :kept].sort(-1).values
    return idx.view(batch, kept) if shared else idx.view(batch, heads, kept).to(dtype)


def _check(case, dtype, *, shared, index_dtype, device=DEVICE):
    batch, heads, seq, head_dim, kept = case
    keys, values = _cache(batch, heads, seq, head_dim, dtype, device)
    idx = _indices(batch, heads, seq, kept, shared=shared, device=device).to(index_dtype)
    # Poisoned, with spare slots past `kept` that must stay untouched.
    k_buf = torch.full((batch, heads, kept + 3, head_dim), float("nan"), dtype=dtype, device=device)
    v_buf = torch.full_like(k_buf, float("nan"))
    got_k, got_v = compact_kv(keys, values, idx, out=(k_buf, v_buf))
    want_k, want_v = compact_kv_ref(keys, values, idx)
    assert got_k.data_ptr() == k_buf.data_ptr() and got_v.data_ptr() == v_buf.data_ptr()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert k_buf[:, :, kept:].isnan().all() and v_buf[:, :, kept:].isnan().all()

    fresh_k, fresh_v = compact_kv(keys, values, idx)
    assert fresh_k.shape == (batch, heads, kept, head_dim) and fresh_k.is_contiguous()
    assert torch.equal(fresh_k, want_k) and torch.equal(fresh_v, want_v)


@pytest.mark.parametrize(("case", "dtype", "shared", "index_dtype"), CPU_PARAMS, ids=str)
def test_matches_reference(case, dtype, shared, index_dtype):
    _check(case, dtype, shared=shared, index_dtype=index_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["per_head", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_gpu(case, dtype, shared):
    _check(case, dtype, shared=shared, index_dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_source_and_destination(dtype):
    batch, heads, seq, head_dim, kept = 2, 4, 97, 80, 40
    # Source in model layout (batch, seq, heads, d) seen as (batch, heads, seq, d), values a prefix of a longer
    # cache; destination a window into a larger preallocated cache, in (batch, seq, heads, d) layout too.
    keys = torch.randn(batch, seq, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    values = torch.randn(batch, heads, seq + 30, head_dim, device=DEVICE).to(dtype)[:, :, :seq]
    big_k = torch.full((batch, 64, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    big_v = torch.full((batch, heads + 2, 64, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    dst_k, dst_v = big_k.transpose(1, 2)[:, :, 5:], big_v[:, 1 : heads + 1]
    idx = _indices(batch, heads, seq, kept)
    assert compact_kv_into(keys, values, idx, dst_k, dst_v) is None
    want_k, want_v = compact_kv_ref(keys, values, idx)
    assert torch.equal(dst_k[:, :, :kept], want_k) and torch.equal(dst_v[:, :, :kept], want_v)
    # Everything outside the written slots is still poison.
    written_k = big_k.isnan().logical_not().sum().item()
    written_v = big_v.isnan().logical_not().sum().item()
    assert written_k == written_v == batch * heads * kept * head_dim


@st.composite
def compactions(draw):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seq = draw(st.integers(1, 150))
    head_dim = draw(st.sampled_from([16, 64, 80]))
    shared = draw(st.booleans())
    rows = batch if shared else batch * heads
    sets = [draw(st.sets(st.integers(0, seq - 1), min_size=1, max_size=seq)) for _ in range(rows)]
    kept = min(len(s) for s in sets)  # one k for all heads: trim each row's set to the smallest
    idx = torch.tensor(
        [sorted(s)[:kept] for s in sets], dtype=draw(st.sampled_from([torch.int32, torch.int64]))
    )
    idx = idx.view(batch, kept) if shared else idx.view(batch, heads, kept)
    return batch, heads, seq, head_dim, idx, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(compactions())
def test_property_random_sorted_unique_indices(args):
    batch, heads, seq, head_dim, idx, seed = args
    keys, values = _cache(batch, heads, seq, head_dim, torch.float16, seed=seed)
    idx = idx.to(DEVICE)
    kept = idx.shape[-1]
    k_buf = torch.full((batch, heads, kept, head_dim), float("nan"), dtype=torch.float16, device=DEVICE)
    v_buf = torch.full_like(k_buf, float("nan"))
    got_k, got_v = compact_kv(keys, values, idx, out=(k_buf, v_buf), debug=True)
    want_k, want_v = compact_kv_ref(keys, values, idx)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # Kept rows keep their order: the compacted cache is the original with the dropped rows removed.
    full = check_indices(idx, batch, heads, seq)
    assert torch.equal(got_k[0, 0], keys[0, 0, full[0, 0]])


def test_full_budget_reproduces_cache():
    keys, values = _cache(2, 2, 97, 64, torch.float16)
    idx = torch.arange(97, device=DEVICE).expand(2, 97)
    got_k, got_v = compact_kv(keys, values, idx)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        ([[[0, 2, 1]]], "strictly increasing"),
        ([[[0, 2, 2]]], "strictly increasing"),
        ([[[0, 2, 9]]], "out of range"),
        ([[[-1, 2, 3]]], "out of range"),
    ],
)
def test_debug_catches_invalid_indices(idx, match):
    keys, values = _cache(1, 1, 9, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        compact_kv(keys, values, torch.tensor(idx, device=DEVICE), debug=True)


def test_rejects_bad_arguments():
    keys, values = _cache(1, 2, 9, 16, torch.float16)
    idx = torch.tensor([[1, 3, 5]], device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        compact_kv(keys, values[:, :1], idx)
    with pytest.raises(ValueError, match="share dtype"):
        compact_kv(keys, values.float(), idx)
    with pytest.raises(ValueError, match="unit stride"):
        compact_kv(keys[..., ::2], values[..., ::2], idx)
    with pytest.raises(ValueError, match="int32 or int64"):
        compact_kv(keys, values, idx.float())
    with pytest.raises(ValueError, match="indices must be"):
        compact_kv(keys, values, idx[None, None])
    with pytest.raises(ValueError, match="cannot be unique"):
        compact_kv(keys, values, torch.arange(10, device=DEVICE)[None])
    short = torch.empty(1, 2, 2, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=">= 3"):
        compact_kv_into(keys, values, idx, short, short.clone())
    buf = torch.empty(1, 2, 3, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="dst_k must be torch.float16"):
        compact_kv_into(keys, values, idx, buf, buf.clone())
    with pytest.raises(ValueError, match="overlaps src_k"):
        compact_kv_into(keys, values, idx, keys, values.clone())
    dst = torch.empty(1, 2, 3, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="dst_k and dst_v overlap"):
        compact_kv_into(keys, values, idx, dst, dst)


def test_falls_back_to_reference_without_kernels(monkeypatch):
    monkeypatch.setattr(scores_module, "_INTERPRET", False)
    keys, values = _cache(1, 2, 9, 16, torch.float32, device="cpu")
    idx = torch.tensor([[0, 4, 8]])
    dst_k = torch.full((1, 2, 5, 16), float("nan"))
    dst_v = torch.full_like(dst_k, float("nan"))
    compact_kv_into(keys, values, idx, dst_k, dst_v)
    want_k, want_v = compact_kv_ref(keys, values, idx)
    assert torch.equal(dst_k[:, :, :3], want_k) and torch.equal(dst_v[:, :, :3], want_v)
    assert dst_k[:, :, 3:].isnan().all()


def test_non_tensors_are_rejected_naming_the_argument():
    # The audit: a list instead of a tensor gave an AttributeError from deep inside.
    keys, values = _cache(1, 2, 9, 16, torch.float16)
    idx = torch.tensor([[1, 3, 5]], device=DEVICE)
    with pytest.raises(TypeError, match=r"^indices must be a torch.Tensor, got list \[\[1, 3, 5\]\]$"):
        compact_kv(keys, values, [[1, 3, 5]])
    with pytest.raises(TypeError, match=r"^keys must be a torch.Tensor, got list"):
        compact_kv(keys.tolist(), values, idx)
    with pytest.raises(TypeError, match=r"^src_v must be a torch.Tensor, got NoneType None$"):
        compact_kv_into(keys, None, idx, keys.clone(), values.clone())
    with pytest.raises(TypeError, match=r"^dst_k must be a torch.Tensor, got tuple"):
        compact_kv_into(keys, values, idx, (1, 2), values.clone())
    with pytest.raises(TypeError, match=r"^debug must be a bool, got 'yes'$"):
        compact_kv(keys, values, idx, debug="yes")
    with pytest.raises(TypeError, match=r"^indices must be a torch.Tensor"):
        compact_kv_ref(keys, values, [[1, 3, 5]])
    with pytest.raises(TypeError, match=r"^seq must be an int, got 9.0$"):
        check_indices(idx, 1, 2, 9.0)
    with pytest.raises(ValueError, match=r"^batch must be >= 0, got -1$"):
        check_indices(idx, -1, 2, 9)
