"""Decode attention over a packed variable-length KV cache (flash-decoding, GQA).

The cache of one layer is two (slots, head_dim) buffers, keys and values; row (b, h) - sequence b, KV head h - owns
the slots `starts[b, h] .. starts[b, h] + lengths[b, h] - 1` (cu_seqlens style: rows may have any lengths, so the
buffer holds the sum of what the rows keep, not rows x the longest). One decode query per sequence and query head;
query head j reads KV head j // group.

`packed_decode_attention` runs two Triton launches:
- `_packed_decode_split_kernel`, grid (rows, splits): each program takes one row and one chunk of its slots
  (split-K, flash-decoding: a long row is spread over many programs), loads the row's `group` query heads once and
  keeps an online softmax for all of them, and writes its partial output and log-sum-exp;
- `_packed_decode_combine_kernel`, grid (rows, splits): every program merges its row's partial log-sum-exps; the
  first writes the output, and, when the caller accumulates per-entry attention (the `score` decode policy), each
  adds `sum_{heads of the group} softmax` to its chunk's slots - from logits the first kernel stored, so the keys are
  read once. A row is owned by its programs alone: no atomics.

`packed_decode_attention_ref` is the plain-torch float32 reference, and the CPU fallback. `packed_decode_attention_op`
is the same function registered as a torch custom op (`torch.ops.prefixkv_kernels.packed_decode_attention`), so that
`torch.compile` treats it as one opaque operation, as flash-attention's kernels are.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.scores import _INTERPRET, PERSIST_AUTOTUNE, _config_name, check_tensor, kernels_available

#: GPU autotuning space of the split kernel: keys per iteration, warps, pipeline stages. Decoding is a stream of
#: keys and values, so what matters is the bytes in flight per SM.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)]
]
# The interpreter runs every program in numpy and cannot time configs: one small block, so that the tests' odd
# lengths end in partial blocks and cross block boundaries.
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
#: Slots a split covers at least: a program should stream a few blocks of keys, or the combine step dominates.
MIN_CHUNK = 256


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 keys and values with 128-key blocks overflow shared memory at head_dim 256; keep the smaller blocks."""
    if named_args["k_ptr"].dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] <= 64] or configs[:1]


@triton.autotune(
    configs=_INTERPRET_CONFIGS if _INTERPRET else DECODE_CONFIGS,
    key=["BLOCK_G", "BLOCK_D", "chunk", "STORE_LOGITS"],
    prune_configs_by={"early_config_prune": _prune},
    **PERSIST_AUTOTUNE,
)
@triton.jit
def _packed_decode_split_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    start_ptr,
    length_ptr,
    part_out_ptr,
    part_lse_ptr,
    logits_ptr,
    # strides
    stride_qb,
    stride_qh,
    stride_ks,
    stride_vs,
    stride_sb,
    stride_sh,
    stride_lb,
    stride_lh,
    # sizes
    kv_heads,
    group,
    head_dim,
    splits,
    chunk,
    qk_scale,
    # meta-parameters
    STORE_LOGITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial attention of row (b, h) over its slots [split * chunk, min((split + 1) * chunk, length)).

    `part_out[row, split, g] = sum_j 2^(s_gj - lse_g) v_j` and `part_lse[row, split, g] = log2 sum_j 2^s_gj` (-inf
    for an empty chunk), with `s_gj = q[b, h * group + g] . k_j * qk_scale` in base 2 (`qk_scale` holds log2(e)).
    q: (batch, q_heads, d); k, v: (slots, d); starts, lengths: (batch, kv_heads) (any strides: 0 shares a row);
    part_out: (rows, splits, group, d) float32; part_lse: (rows, splits, group) float32; with STORE_LOGITS,
    logits[slot, g] = s_gj ((slots, group) float32). Rows are b * kv_heads + h. Grid: (rows, splits).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    h = (row % kv_heads).to(tl.int64)
    # int64 slot offsets: a long packed cache's slots * head_dim overflows int32.
    start = tl.load(start_ptr + b * stride_sb + h * stride_sh).to(tl.int64)
    length = tl.load(length_ptr + b * stride_lb + h * stride_lh).to(tl.int64)
    lo = split.to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, length)

    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    h_ok = heads < group
    d_ok = dims < head_dim
    # The group's query heads share the row's keys: one tile of BLOCK_G >= 16 rows (tl.dot's minimum), padded.
    q = tl.load(
        q_ptr + b * stride_qb + (h * group + heads)[:, None] * stride_qh + dims[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + cols
        n_ok = n < hi
        slots = start + n
        kt = tl.load(k_ptr + slots[None, :] * stride_ks + dims[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        if STORE_LOGITS:
            tl.store(logits_ptr + slots[None, :] * group + heads[:, None], qk, mask=h_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + dims[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    filled = l_i > 0.0
    lse = tl.where(filled, m_i + tl.math.log2(tl.where(filled, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(filled, l_i, 1.0)[:, None]
    part = (row.to(tl.int64) * splits + split) * group + heads
    tl.store(part_lse_ptr + part, lse, mask=h_ok)
    tl.store(part_out_ptr + part[:, None] * head_dim + dims[None, :], out, mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _packed_decode_combine_kernel(
    # pointers
    part_out_ptr,
    part_lse_ptr,
    logits_ptr,
    start_ptr,
    length_ptr,
    out_ptr,
    received_ptr,
    # strides
    stride_sb,
    stride_sh,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    # sizes
    kv_heads,
    group,
    head_dim,
    splits,
    chunk,
    # meta-parameters
    ACCUMULATE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge row (b, h)'s partials: `lse_g = log2 sum_s 2^part_lse[s, g]`, `out[b, h * group + g] = sum_s
    2^(part_lse[s, g] - lse_g) part_out[s, g]` (written by split 0; 0 for an empty row), and with ACCUMULATE
    `received[slot] += sum_g 2^(logits[slot, g] - lse_g)` over this program's chunk of the row.

    Shapes as in `_packed_decode_split_kernel`; out: (batch, q_heads, d) in the query dtype; received: (slots,)
    float32. Grid: (rows, splits).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    h = (row % kv_heads).to(tl.int64)
    heads = tl.arange(0, BLOCK_G)
    parts = tl.arange(0, BLOCK_S)
    h_ok = heads < group
    base = row.to(tl.int64) * splits
    lse_parts = tl.load(
        part_lse_ptr + (base + parts)[:, None] * group + heads[None, :],
        mask=(parts < splits)[:, None] & h_ok[None, :],
        other=float("-inf"),
    )
    top = tl.max(lse_parts, 0)
    top = tl.where(top > float("-inf"), top, 0.0)  # an empty row: every weight below is 0, and no nan
    total = tl.sum(tl.math.exp2(lse_parts - top[None, :]), 0)
    lse = top + tl.math.log2(tl.where(total > 0.0, total, 1.0))

    if split == 0:
        dims = tl.arange(0, BLOCK_D)
        d_ok = dims < head_dim
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for s in range(0, splits):
            part = (base + s) * group + heads
            weight = tl.math.exp2(tl.load(part_lse_ptr + part, mask=h_ok, other=float("-inf")) - lse)
            chunk_out = tl.load(
                part_out_ptr + part[:, None] * head_dim + dims[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0
            )
            acc += weight[:, None] * chunk_out
        tl.store(
            out_ptr + b * stride_ob + (h * group + heads)[:, None] * stride_oh + dims[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=h_ok[:, None] & d_ok[None, :],
        )

    if ACCUMULATE:
        start = tl.load(start_ptr + b * stride_sb + h * stride_sh).to(tl.int64)
        length = tl.load(length_ptr + b * stride_lb + h * stride_lh).to(tl.int64)
        lo = split.to(tl.int64) * chunk
        hi = tl.minimum(lo + chunk, length)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            slots = start + n
            logits = tl.load(
                logits_ptr + slots[None, :] * group + heads[:, None],
                mask=h_ok[:, None] & n_ok[None, :],
                other=float("-inf"),
            )
            probs = tl.sum(tl.math.exp2(logits - lse[:, None]), 0)
            seen = tl.load(received_ptr + slots, mask=n_ok, other=0.0)
            tl.store(received_ptr + slots, seen + probs, mask=n_ok)


def packed_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_length: int,
    scale: float | None = None,
    received: torch.Tensor | None = None,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query per sequence and head over a packed KV cache: `out[b, j] = softmax(q[b, j] . K_r^T * scale)
    V_r` for row r = (b, j // group).

    query: (batch, q_heads, d), q_heads = group * kv_heads, unit stride on d; keys, values: (slots, d) in the
    query's dtype (fp16, bf16, fp32) and device, unit stride on d; starts: (batch, kv_heads) and lengths:
    (batch or 1, kv_heads), int32/int64 on the same device, any strides (one row of lengths is shared by the batch):
    row (b, h) holds slots `starts[b, h] + [0, lengths[b, h])`. `max_length` bounds every length (a host int, the
    rows' capacity: it sizes the grid, so a step never reads a device value). A row of length 0 gives 0.
    `received`, if given, is a (slots,) float32 buffer to which each slot's attention, summed over the query heads
    of its group, is added in place (the `score` decode policy's bookkeeping, at no extra pass over the keys).
    `chunk`: slots per split (default: enough splits to fill the GPU, at least `MIN_CHUNK` slots each).
    `out`: an optional (batch, q_heads, d) buffer in the query's dtype to write (any strides).
    Returns (batch, q_heads, d) in the query's dtype. Row contents and lengths are not validated (a device sync);
    `packed_decode_attention_ref` reads the same layout. fp32 inputs use exact ("ieee") dot products.
    Falls back to `packed_decode_attention_ref` where `kernels_available(query.device)` is False.
    """
    batch, q_heads, kv_heads, head_dim, scale = _check(query, keys, values, starts, lengths, max_length, scale)
    lengths = lengths.expand(batch, -1)  # a shared row: stride 0 on the batch axis, no copy
    if received is not None:
        check_tensor("received", received)
        if received.shape != (keys.shape[0],) or received.dtype != torch.float32 or received.device != keys.device:
            raise ValueError(
                f"received must be float32 ({keys.shape[0]},) (one per slot) on {keys.device}; "
                f"got {received.dtype} {tuple(received.shape)} on {received.device}"
            )
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1 or None, got {chunk!r}")
    if out is None:
        out = torch.empty_like(query)
    else:
        check_tensor("out", out)
        if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
            raise ValueError(
                f"out must be {query.dtype} {tuple(query.shape)} on {query.device}; "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )

    if not kernels_available(query.device):
        ref = packed_decode_attention_ref(
            query, keys, values, starts, lengths, max_length=max_length, scale=scale, received=received
        )
        return out.copy_(ref)

    group = q_heads // kv_heads
    rows = batch * kv_heads
    if out.numel() == 0:
        return out
    chunk = chunk or _default_chunk(rows, max_length, query.device)
    splits = max(1, triton.cdiv(max_length, chunk))
    accumulate = received is not None
    part_out = torch.empty(rows, splits, group, head_dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(rows, splits, group, dtype=torch.float32, device=query.device)
    # Logits only where the per-entry attention is wanted; otherwise a placeholder the kernels never touch.
    logits = torch.empty(keys.shape[0] if accumulate else 0, group, dtype=torch.float32, device=query.device)
    blocks = {
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
    }
    geometry = (kv_heads, group, head_dim, splits, chunk)
    # Triton launches on the current CUDA device, which need not be the tensors'.
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        _packed_decode_split_kernel[(rows, splits)](
            query,
            keys,
            values,
            starts,
            lengths,
            part_out,
            part_lse,
            logits,
            query.stride(0),
            query.stride(1),
            keys.stride(0),
            values.stride(0),
            *starts.stride(),
            *lengths.stride(),
            *geometry,
            scale * _LOG2E,
            STORE_LOGITS=accumulate,
            INPUT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            **blocks,
        )
        _packed_decode_combine_kernel[(rows, splits)](
            part_out,
            part_lse,
            logits,
            starts,
            lengths,
            out,
            received if accumulate else part_lse,
            *starts.stride(),
            *lengths.stride(),
            out.stride(0),
            out.stride(1),
            *geometry,
            ACCUMULATE=accumulate,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_N=64,
            **blocks,
        )
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs per row are enough to exercise the split
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_chunk(rows: int, max_length: int, device: torch.device) -> int:
    """Slots per split: about four programs per SM in all (flash-decoding), each streaming at least `MIN_CHUNK`
    slots, rounded to 128 (the largest key block). Depends on host sizes only, so the grid is static."""
    splits = max(1, min(triton.cdiv(4 * _multiprocessors(device), max(rows, 1)), triton.cdiv(max_length, MIN_CHUNK)))
    return max(128, triton.cdiv(triton.cdiv(max(max_length, 1), splits), 128) * 128)


def autotuned_configs() -> dict[str, str | None]:
    """The config the split kernel's autotuner last picked (None before a launch), for benchmark records."""
    return {"packed_decode_split": _config_name(_packed_decode_split_kernel)}


def _check(query, keys, values, starts, lengths, max_length, scale) -> tuple[int, int, int, int, float]:
    """Shape, dtype, device and stride checks that need no sync; returns (batch, q_heads, kv_heads, d, scale)."""
    for name, tensor in (("query", query), ("keys", keys), ("values", values), ("starts", starts),
                         ("lengths", lengths)):
        check_tensor(name, tensor)
    if query.dim() != 3:
        raise ValueError(f"query must be (batch, q_heads, head_dim), got shape {tuple(query.shape)}")
    batch, q_heads, head_dim = query.shape
    if keys.dim() != 2 or keys.shape != values.shape or keys.shape[1] != head_dim:
        raise ValueError(
            f"keys and values must be (slots, head_dim={head_dim}) of one shape; "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if query.dtype not in _DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(
            f"query, keys and values must share a dtype among {_DTYPES}; got {query.dtype}, {keys.dtype}, "
            f"{values.dtype}"
        )
    devices = {t.device for t in (query, keys, values, starts, lengths)}
    if len(devices) != 1:
        raise ValueError(f"query, keys, values, starts and lengths share no device: {sorted(map(str, devices))}")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    for name, tensor in (("query", query), ("keys", keys), ("values", values)):
        if head_dim > 1 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on head_dim; got strides {tensor.stride()}")
    if starts.dim() != 2 or starts.shape[0] != batch or lengths.dim() != 2 or lengths.shape[1] != starts.shape[1]:
        raise ValueError(
            f"starts must be (batch={batch}, kv_heads) and lengths (batch or 1, kv_heads); "
            f"got {tuple(starts.shape)} and {tuple(lengths.shape)}"
        )
    if lengths.shape[0] not in (1, batch):
        raise ValueError(f"lengths must be (batch={batch} or 1, kv_heads), got {tuple(lengths.shape)}")
    for name, tensor in (("starts", starts), ("lengths", lengths)):
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")
    kv_heads = starts.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
        raise ValueError(f"max_length must be an int >= 0, got {max_length!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    return batch, q_heads, kv_heads, head_dim, float(scale)


def packed_decode_attention_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_length: int,
    scale: float | None = None,
    received: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a packed KV cache, in float32: arguments as in `packed_decode_attention`.

    Gathers each row's first `max_length` slots into a padded (batch, kv_heads, max_length, d) copy, masks the
    slots past the row's length, and attends (SDPA, or explicitly where the probabilities are wanted); a row of
    length 0 gives 0. With `received`, adds each valid slot's
    attention summed over its group's query heads. Returns (batch, q_heads, d) float32. No host synchronisation.
    """
    batch, q_heads, kv_heads, head_dim, scale = _check(query, keys, values, starts, lengths, max_length, scale)
    group = q_heads // kv_heads
    offsets = torch.arange(max_length, device=query.device)
    valid = offsets < lengths[..., None]  # (batch, kv_heads, max_length)
    # Padding reads slot 0 (any slot would do: it is masked); an empty buffer has no slot 0, nor any valid row.
    index = torch.where(valid, starts[..., None] + offsets, 0).reshape(-1)
    if keys.shape[0] == 0:
        return torch.zeros(batch, q_heads, head_dim, dtype=torch.float32, device=query.device)
    # Masked slots are zeroed: a weight of 0 times a NaN in an unused slot would still be NaN.
    unused = ~valid[..., None]
    k = keys.index_select(0, index).view(batch, kv_heads, max_length, head_dim).float().masked_fill_(unused, 0.0)
    v = values.index_select(0, index).view(batch, kv_heads, max_length, head_dim).float().masked_fill_(unused, 0.0)
    q = query.float().reshape(batch, kv_heads, group, head_dim)
    empty = ~valid[:, :, :1, None]  # (batch, kv_heads, 1, 1): rows of length 0
    if received is None:
        # The group's query heads as SDPA's query sequence: its fused CPU kernel, without materialising logits.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None], scale=scale)
        return out.masked_fill(empty, 0.0).view(batch, q_heads, head_dim)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, kv_heads, group, max_length)
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    top = logits.amax(-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
    probs = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    received.index_add_(0, index, probs.sum(2).reshape(-1))
    return torch.matmul(probs, v).view(batch, q_heads, head_dim)


@torch.library.custom_op("prefixkv_kernels::packed_decode_attention", mutates_args=("received",))
def packed_decode_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    received: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    """`packed_decode_attention` as one torch operation; `received` of size 0 accumulates nothing (an optional
    mutated argument is not supported by inductor)."""
    return packed_decode_attention(
        query, keys, values, starts, lengths, max_length=max_length, scale=scale,
        received=received if received.numel() else None,
    )


@packed_decode_attention_op.register_fake
def _(query, keys, values, starts, lengths, received, max_length, scale):
    return torch.empty_like(query)
