"""`packed_decode_attention` (Triton) against `packed_decode_attention_ref`; on CPU through TRITON_INTERPRET=1.

The reference itself is checked against plain SDPA over each row, so that the kernel is compared with attention
and not only with a second implementation of the same layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.scores as scores_module
from kernels.decode_attention import (
    packed_decode_attention,
    packed_decode_attention_op,
    packed_decode_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 tl.dot is wrong in the interpreter: bf16 runs on CUDA only.
CPU_DTYPES = [torch.float16, torch.float32]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _tolerance(dtype: torch.dtype) -> dict:
    # Inputs are exact in every dtype (drawn in it); the kernel rounds the probabilities to the value dtype before
    # the second dot (as flash attention does) and writes the output in it: a few units of its last place on O(1)
    # outputs. fp32 uses exact dots, so only summation order differs.
    return {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float16: {"atol": 3e-3, "rtol": 3e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}[dtype]


def _packed(lengths, head_dim, dtype, *, spare=3, device=DEVICE, seed=0, poison_unused=True):
    """A packed cache with rows of `lengths` ((batch, kv_heads) list) valid entries plus `spare` unused slots each,
    laid out head-major; unused slots hold NaN (a kernel that reads one fails)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.tensor(lengths)
    batch, heads = lengths.shape
    capacity = lengths.amax(0) + spare  # per head, shared by the batch, as the cache lays it out
    head_start = torch.cat([torch.zeros(1, dtype=torch.long), (batch * capacity).cumsum(0)[:-1]])
    starts = head_start[None, :] + torch.arange(batch)[:, None] * capacity[None, :]
    slots = int(batch * capacity.sum())
    keys = torch.randn(slots, head_dim, generator=gen).to(dtype)
    values = torch.randn(slots, head_dim, generator=gen).to(dtype)
    if poison_unused:
        used = torch.zeros(slots, dtype=torch.bool)
        for b in range(batch):
            for h in range(heads):
                used[starts[b, h] : starts[b, h] + lengths[b, h]] = True
        keys[~used] = float("nan")
        values[~used] = float("nan")
    return (keys.to(device), values.to(device), starts.to(device), lengths.to(device), int(capacity.max()))


def _query(batch, q_heads, head_dim, dtype, device=DEVICE, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(batch, q_heads, head_dim, generator=gen) * 2).to(dtype).to(device)


def _received_start(keys):
    return torch.rand(keys.shape[0], generator=torch.Generator(device="cpu").manual_seed(2)).to(keys.device)


def _run(query, keys, values, starts, lengths, max_length, *, chunk=None, accumulate=True):
    """Kernel and reference on the same inputs: ((out, received), (out_ref, received_ref)); received starts random,
    the output poisoned."""
    received = _received_start(keys) if accumulate else None
    received_ref = None if received is None else received.clone()
    out = torch.full_like(query, float("nan"))
    got = packed_decode_attention(
        query, keys, values, starts, lengths, max_length=max_length, received=received, chunk=chunk, out=out
    )
    assert got.data_ptr() == out.data_ptr()
    want = packed_decode_attention_ref(
        query, keys, values, starts, lengths, max_length=max_length, received=received_ref
    )
    return (got, received), (want, received_ref)


# (lengths per (batch, kv head), group, head_dim, chunk): odd lengths, empty and single-entry rows, batch > 1, GQA
# and MHA, head_dim 80 (not a power of two); chunk 16 splits rows into several programs (split-K), None is one.
CPU_CASES = [
    ([[1]], 1, 16, None),
    ([[5, 0, 37], [1, 20, 70]], 4, 80, 16),
    ([[0, 0], [0, 0]], 2, 32, None),
    ([[97, 1, 33, 2]], 1, 64, 32),
    ([[64], [17], [0]], 8, 64, 16),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize(("lengths", "group", "head_dim", "chunk"), CPU_CASES, ids=str)
def test_matches_reference(lengths, group, head_dim, chunk, dtype):
    keys, values, starts, lens, longest = _packed(lengths, head_dim, dtype)
    query = _query(len(lengths), group * len(lengths[0]), head_dim, dtype)
    (out, received), (want, received_ref) = _run(query, keys, values, starts, lens, longest, chunk=chunk)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want, **_tolerance(dtype))
    # The reference's two paths (SDPA over the padded rows; explicit probabilities when they are accumulated) agree.
    plain = packed_decode_attention_ref(query, keys, values, starts, lens, max_length=longest)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)
    # Attention received: added to valid slots only (NaN-poisoned unused slots stay untouched, random start kept),
    # and every query head's attention sums to 1 over its row (0 for an empty row).
    torch.testing.assert_close(received, received_ref, atol=1e-5, rtol=1e-5)
    heads_seeing_something = group * sum(1 for row in lengths for n in row if n > 0)
    added = (received - _received_start(keys)).sum()
    torch.testing.assert_close(added, torch.tensor(float(heads_seeing_something), device=keys.device))


def test_split_and_unsplit_agree():
    """Split-K merges partial softmaxes exactly: any chunk gives the same output."""
    keys, values, starts, lens, longest = _packed([[150, 7], [33, 100]], 32, torch.float32)
    query = _query(2, 4, 32, torch.float32)
    outs = [
        packed_decode_attention(query, keys, values, starts, lens, max_length=longest, chunk=chunk)
        for chunk in (16, 48, 1024)
    ]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


def test_reference_is_attention():
    """The reference equals SDPA over each row's slots, row by row."""
    lengths = [[5, 1, 12], [9, 3, 1]]
    keys, values, starts, lens, longest = _packed(lengths, 32, torch.float32, device="cpu")
    query = _query(2, 6, 32, torch.float32, device="cpu")
    received = torch.zeros(keys.shape[0])
    out = packed_decode_attention_ref(
        query, keys, values, starts, lens, max_length=longest, received=received
    )
    for b in range(2):
        for h in range(3):
            rows = slice(int(starts[b, h]), int(starts[b, h] + lens[b, h]))
            q = query[b, 2 * h : 2 * h + 2][:, None]  # (group, 1, d)
            want = F.scaled_dot_product_attention(q, keys[rows][None], values[rows][None])
            torch.testing.assert_close(out[b, 2 * h : 2 * h + 2], want[:, 0], atol=1e-6, rtol=1e-6)
            probs = torch.softmax(q[:, 0] @ keys[rows].T / 32**0.5, -1).sum(0)
            torch.testing.assert_close(received[rows], probs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shared", ["one row", "stride 0"])
def test_lengths_shared_by_the_batch(shared):
    """The cache passes one row of lengths per KV head for the whole batch: (1, kv_heads), or a stride-0 view."""
    keys, values, starts, _, longest = _packed([[6, 11], [6, 11], [6, 11]], 16, torch.float16, spare=5)
    lens = torch.tensor([[6, 11]], device=DEVICE)
    if shared == "stride 0":
        lens = lens.expand(3, -1)
    query = _query(3, 2, 16, torch.float16)
    (out, _), (want, _) = _run(query, keys, values, starts, lens, longest, accumulate=False)
    torch.testing.assert_close(out.float(), want, **_tolerance(torch.float16))


def test_custom_op_compiles_into_one_graph():
    """As a torch custom op the kernel is one opaque node: fullgraph compilation, and `received` mutated in place."""
    keys, values, starts, lens, longest = _packed([[5, 9]], 16, torch.float32, poison_unused=False)
    query = _query(1, 4, 16, torch.float32)
    received = torch.zeros(keys.shape[0], device=DEVICE)

    def step(q):
        return packed_decode_attention_op(q, keys, values, starts, lens, received, longest, 0.25) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(query)
    want = packed_decode_attention_ref(query, keys, values, starts, lens, max_length=longest, scale=0.25) * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received.sum(), torch.tensor(4.0, device=DEVICE))
    torch._dynamo.reset()


def test_opcheck():
    keys, values, starts, lens, longest = _packed([[3, 8]], 16, torch.float32, poison_unused=False)
    query = _query(1, 2, 16, torch.float32)
    received = torch.zeros(keys.shape[0], device=DEVICE)
    torch.library.opcheck(
        packed_decode_attention_op, (query, keys, values, starts, lens, received, longest, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_falls_back_to_reference_without_kernels(monkeypatch):
    monkeypatch.setattr(scores_module, "_INTERPRET", False)
    keys, values, starts, lens, longest = _packed([[4, 0]], 16, torch.float32, device="cpu")
    query = _query(1, 2, 16, torch.float32, device="cpu")
    got = packed_decode_attention(query, keys, values, starts, lens, max_length=longest)
    want = packed_decode_attention_ref(query, keys, values, starts, lens, max_length=longest)
    assert torch.equal(got, want)
    assert torch.equal(got[0, 1], torch.zeros(16))  # the empty row


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"query": [1, 2, 3]}, r"^query must be a torch.Tensor"),
        ({"query": "4d"}, r"query must be \(batch, q_heads, head_dim\)"),
        ({"keys": "short"}, "keys and values must be"),
        ({"values": "fp16"}, "share a dtype"),
        ({"starts": "float"}, "starts must be int32 or int64"),
        ({"lengths": "shape"}, "starts must be"),
        ({"lengths": "batch"}, "lengths must be"),
        ({"query": "3 heads"}, "not a multiple of kv_heads"),
        ({"max_length": -1}, "max_length must be an int >= 0"),
        ({"max_length": 2.0}, "max_length must be an int >= 0"),
        ({"scale": 0.0}, "scale must be a finite number > 0"),
        ({"received": "short"}, r"received must be float32 \(\d+,\)"),
        ({"chunk": 0}, "chunk must be an int >= 1"),
        ({"out": "wrong"}, "out must be"),
    ],
)
def test_rejects_bad_arguments(change, match):
    keys, values, starts, lens, longest = _packed([[3, 8]], 16, torch.float32, poison_unused=False)
    args = {"query": _query(1, 2, 16, torch.float32), "keys": keys, "values": values, "starts": starts,
            "lengths": lens, "max_length": longest}
    variants = {
        "4d": args["query"][None], "short": keys[:, :8], "fp16": values.half(), "float": starts.float(),
        "shape": lens[:, :1], "batch": lens.expand(3, -1), "3 heads": _query(1, 3, 16, torch.float32),
        "wrong": torch.empty(1, 2, 8, device=DEVICE),
    }
    for key, value in change.items():
        if key == "received":
            args[key] = torch.zeros(3, device=DEVICE)
        else:
            args[key] = variants.get(value, value) if isinstance(value, str) else value
    with pytest.raises((ValueError, TypeError), match=match):
        packed_decode_attention(**args)


# --- CUDA: full sizes, bf16, long rows split over many programs -------------------------------------------------

GPU_CASES = [
    *[(lengths, group, head_dim, None) for lengths, group, head_dim, _ in CPU_CASES],
    ([[4096, 1, 0, 8191]] * 4, 4, 128, None),
    ([[32768, 1025], [3, 20000]], 8, 128, None),
    ([[1000, 2000, 3000]] * 16, 1, 80, 256),
    ([[65536]], 4, 256, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(("lengths", "group", "head_dim", "chunk"), GPU_CASES, ids=str)
def test_matches_reference_gpu(lengths, group, head_dim, chunk, dtype):
    keys, values, starts, lens, longest = _packed(lengths, head_dim, dtype, device="cuda")
    query = _query(len(lengths), group * len(lengths[0]), head_dim, dtype, device="cuda")
    (out, received), (want, received_ref) = _run(query, keys, values, starts, lens, longest, chunk=chunk)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want, **_tolerance(dtype))
    torch.testing.assert_close(received, received_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_replays_the_kernel():
    """Captured in a CUDA graph (static grid, no host read), replays follow new lengths and new queries."""
    keys, values, starts, _, longest = _packed([[700, 30], [5, 900]], 128, torch.float16, device="cuda",
                                               poison_unused=False)
    lens = torch.tensor([[700, 30], [5, 900]], device="cuda")
    query = _query(2, 8, 128, torch.float16, device="cuda")
    out = packed_decode_attention(query, keys, values, starts, lens, max_length=longest)  # warm-up, autotune
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = packed_decode_attention(query, keys, values, starts, lens, max_length=longest)
    query.copy_(_query(2, 8, 128, torch.float16, device="cuda", seed=5))
    lens.sub_(1)
    graph.replay()
    want = packed_decode_attention_ref(query, keys, values, starts, lens, max_length=longest)
    torch.testing.assert_close(out.float(), want, **_tolerance(torch.float16))
