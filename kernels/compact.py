"""KV compaction: gather each head's kept entries into a dense cache.

`compact_kv` / `compact_kv_into` move keys and values in one Triton launch; `compact_kv_into` writes into the
caller's buffers and allocates nothing. `compact_kv_ref` is the plain-torch reference and the CPU fallback.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# One switch for the whole package: whether kernels run here, and whether they are interpreted.
from kernels.scores import _INTERPRET, PERSIST_AUTOTUNE, _config_name, check_tensor, kernels_available

#: GPU autotuning space: rows per program and warps. A pure copy, so only the bytes in flight matter.
COMPACT_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=1)
    for bk, w in [(8, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
]
# The interpreter runs each program in numpy and cannot time configs: one small fixed block, so the tests with
# k = 97 or 1025 end in a partial block.
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]


@triton.autotune(
    configs=_INTERPRET_CONFIGS if _INTERPRET else COMPACT_CONFIGS, key=["BLOCK_D", "K_BUCKET"], **PERSIST_AUTOTUNE
)
@triton.jit
def _compact_kv_kernel(
    # pointers
    src_k_ptr,
    src_v_ptr,
    idx_ptr,
    dst_k_ptr,
    dst_v_ptr,
    # strides
    stride_skb,
    stride_skh,
    stride_sks,
    stride_svb,
    stride_svh,
    stride_svs,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    # sizes
    heads,
    n_keep,
    head_dim,
    K_BUCKET,
    # meta-parameters
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`dst_k[b, h, i] = src_k[b, h, idx[b, h, i]]` and the same for values, for i < n_keep.

    src_*: (batch, heads, s, head_dim); idx: (batch, heads, n_keep) int32/int64 (stride_ih = 0 shares one row of
    indices across heads); dst_*: (batch, heads, >= n_keep, head_dim). Unit stride on head_dim everywhere.
    Grid: (cdiv(n_keep, BLOCK_K), batch * heads); each program copies BLOCK_K rows of keys and of values.
    """
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)

    slots = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    slot_ok = slots < n_keep
    mask = slot_ok[:, None] & (dims[None, :] < head_dim)
    # int64 offsets: a long cache's batch * heads * seq * head_dim overflows int32.
    rows = tl.load(idx_ptr + b * stride_ib + h * stride_ih + slots * stride_ik, mask=slot_ok, other=0).to(
        tl.int64
    )
    slots = slots.to(tl.int64)

    keys = tl.load(
        src_k_ptr + b * stride_skb + h * stride_skh + rows[:, None] * stride_sks + dims[None, :], mask=mask
    )
    tl.store(
        dst_k_ptr + b * stride_dkb + h * stride_dkh + slots[:, None] * stride_dks + dims[None, :],
        keys,
        mask=mask,
    )
    values = tl.load(
        src_v_ptr + b * stride_svb + h * stride_svh + rows[:, None] * stride_svs + dims[None, :], mask=mask
    )
    tl.store(
        dst_v_ptr + b * stride_dvb + h * stride_dvh + slots[:, None] * stride_dvs + dims[None, :],
        values,
        mask=mask,
    )


def compact_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    debug: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept entries: `out[b, h, i] = x[b, h, indices[b, h, i]]` for keys and values, in one launch.

    keys, values: (batch, kv_heads, s, d), same dtype and device, any strides with unit stride on d.
    indices: (batch, kv_heads, k) or (batch, k) (shared by all heads), int32/int64, sorted ascending, unique, in
    [0, s). Invalid indices are undefined behaviour (the kernel reads whatever rows they name); `debug=True`
    validates them first with `check_indices` (a device sync).
    out: optional (k_buf, v_buf), each (batch, kv_heads, >= k, d); the first k slots are written and returned as
    views, and nothing is allocated (see `compact_kv_into`).
    Returns dense (batch, kv_heads, k, d) keys and values in the input dtype. Falls back to `compact_kv_ref` where
    `kernels_available(keys.device)` is False.
    """
    batch, heads, _, head_dim = _check_kv(keys, values)
    n_keep = _check_index_shape(indices, keys)
    _check_debug(debug)
    if out is None:
        dst_k = torch.empty(batch, heads, n_keep, head_dim, dtype=keys.dtype, device=keys.device)
        dst_v = torch.empty(batch, heads, n_keep, head_dim, dtype=values.dtype, device=values.device)
    else:
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError(f"out must be a pair (k_buf, v_buf), got {type(out).__name__}")
        dst_k, dst_v = out
        check_tensor("out[0]", dst_k)
        check_tensor("out[1]", dst_v)
    compact_kv_into(keys, values, indices, dst_k, dst_v, debug=debug)
    return dst_k[:, :, :n_keep], dst_v[:, :, :n_keep]


def compact_kv_into(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    indices: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    *,
    debug: bool = False,
) -> None:
    """Write `dst[:, :, i] = src[:, :, indices[:, :, i]]` for keys and values into the caller's buffers.

    src_k, src_v: (batch, kv_heads, s, d); indices as in `compact_kv` (k of them per head); dst_k, dst_v:
    (batch, kv_heads, >= k, d) in the source dtype and device, any strides with unit stride on d (views of a
    larger cache are fine). Slots k and beyond are left untouched; nothing is allocated on the kernel path.
    dst must not overlap src: programs run in any order, so block j could read a source row that block i < j has
    already overwritten. Overlap raises ValueError.
    """
    batch, heads, seq, head_dim = _check_kv(src_k, src_v, ("src_k", "src_v"))
    n_keep = _check_index_shape(indices, src_k)
    _check_debug(debug)
    check_tensor("dst_k", dst_k)
    check_tensor("dst_v", dst_v)
    for name, dst in (("dst_k", dst_k), ("dst_v", dst_v)):
        if dst.dim() != 4 or tuple(dst.shape[:2]) != (batch, heads) or dst.shape[2] < n_keep:
            raise ValueError(
                f"{name} must be (batch={batch}, kv_heads={heads}, >= {n_keep}, {head_dim}); got {tuple(dst.shape)}"
            )
        if dst.shape[3] != head_dim or dst.dtype != src_k.dtype or dst.device != src_k.device:
            raise ValueError(
                f"{name} must be {src_k.dtype} with head_dim {head_dim} on {src_k.device}; "
                f"got {dst.dtype} {tuple(dst.shape)} on {dst.device}"
            )
        if head_dim > 1 and dst.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on head_dim; got strides {dst.stride()}")
        for src_name, src in (("src_k", src_k), ("src_v", src_v)):
            if _overlaps(dst, src):
                raise ValueError(f"{name} overlaps {src_name}: in-place compaction would race")
    if _overlaps(dst_k, dst_v):
        raise ValueError("dst_k and dst_v overlap")
    if debug:
        check_indices(indices, batch, heads, seq)
    if n_keep == 0 or batch * heads == 0 or head_dim == 0:
        return

    if not kernels_available(src_k.device):
        ref_k, ref_v = compact_kv_ref(src_k, src_v, indices)
        dst_k[:, :, :n_keep].copy_(ref_k)
        dst_v[:, :, :n_keep].copy_(ref_v)
        return

    # A stride-0 head axis shares a (batch, k) row of indices without copying it.
    idx_strides = (indices.stride(0), 0, indices.stride(1)) if indices.dim() == 2 else indices.stride()
    grid = lambda META: (triton.cdiv(n_keep, META["BLOCK_K"]), batch * heads)
    # Triton launches on the current CUDA device, which need not be the tensors'.
    with torch.cuda.device(src_k.device) if src_k.device.type == "cuda" else contextlib.nullcontext():
        _compact_kv_kernel[grid](
            src_k,
            src_v,
            indices,
            dst_k,
            dst_v,
            *src_k.stride()[:3],
            *src_v.stride()[:3],
            *idx_strides,
            *dst_k.stride()[:3],
            *dst_v.stride()[:3],
            heads,
            n_keep,
            head_dim,
            K_BUCKET=triton.next_power_of_2(n_keep),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )


def autotuned_configs() -> dict[str, str | None]:
    """The config the compaction kernel's autotuner last picked (None before a launch), for benchmark records."""
    return {"compact_kv": _config_name(_compact_kv_kernel)}


def _check_kv(
    keys: torch.Tensor, values: torch.Tensor, names: tuple[str, str] = ("keys", "values")
) -> tuple[int, int, int, int]:
    check_tensor(names[0], keys)
    check_tensor(names[1], values)
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"keys and values must be 4-D (batch, kv_heads, seq, head_dim) of one shape; "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.dtype != values.dtype or keys.device != values.device:
        raise ValueError(
            f"keys and values must share dtype and device; got {keys.dtype} on {keys.device} "
            f"and {values.dtype} on {values.device}"
        )
    for name, x in (("keys", keys), ("values", values)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on head_dim; got strides {x.stride()}")
    return tuple(keys.shape)


def _check_index_shape(indices: torch.Tensor, keys: torch.Tensor) -> int:
    """Shape, dtype and device checks that need no sync; returns k. Values are checked only by `check_indices`."""
    check_tensor("indices", indices)
    batch, heads, seq, _ = keys.shape
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.device != keys.device:
        raise ValueError(f"indices are on {indices.device}, keys on {keys.device}")
    ok = (indices.dim() == 2 and indices.shape[0] == batch) or (
        indices.dim() == 3 and tuple(indices.shape[:2]) == (batch, heads)
    )
    if not ok:
        raise ValueError(
            f"indices must be (batch={batch}, kv_heads={heads}, k) or (batch={batch}, k); got {tuple(indices.shape)}"
        )
    n_keep = indices.shape[-1]
    if n_keep > seq:
        raise ValueError(f"{n_keep} indices cannot be unique in a sequence of {seq}")
    return n_keep


def _check_debug(debug: object) -> None:
    if not isinstance(debug, bool):
        raise TypeError(f"debug must be a bool, got {debug!r}"[:120])


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of `a` and `b` intersect (a conservative test: interleaved views count)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(x: torch.Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride(), strict=True))
        return x.data_ptr(), x.data_ptr() + (extent + 1) * x.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_indices(indices: torch.Tensor, batch: int, heads: int, seq: int) -> torch.Tensor:
    """Validate kept indices and return them as (batch, heads, k) int64 (a (batch, k) input is shared by all heads).

    Indices must be sorted ascending, unique and in [0, seq); raises ValueError naming the first bad entry.
    """
    check_tensor("indices", indices)
    for name, v in (("batch", batch), ("heads", heads), ("seq", seq)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}"[:120])
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if indices.dim() == 2:
        indices = indices[:, None, :].expand(indices.shape[0], heads, indices.shape[1])
    if indices.dim() != 3 or indices.shape[0] != batch or indices.shape[1] != heads:
        raise ValueError(
            f"indices must be (batch={batch}, heads={heads}, k) or (batch, k); got {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= seq:
            raise ValueError(f"indices out of range [0, {seq}): min {lo}, max {hi}")
        if indices.shape[-1] > 1:
            bad = (indices[..., 1:] <= indices[..., :-1]).nonzero()
            if bad.numel():
                b, h, i = (int(v) for v in bad[0])
                raise ValueError(
                    "indices must be strictly increasing along the last dimension (sorted, unique); "
                    f"indices[{b}, {h}, {i + 1}] = {int(indices[b, h, i + 1])} follows {int(indices[b, h, i])}"
                )
    return indices.long()


def compact_kv_ref(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept entries: `out[b, h, i] = x[b, h, indices[b, h, i]]` for keys and values.

    keys, values: (batch, kv_heads, s, d); indices: (batch, kv_heads, k) or (batch, k), sorted, unique, in [0, s).
    Returns dense (batch, kv_heads, k, d) tensors in the input dtype (a copy is exact in any dtype).
    """
    check_tensor("keys", keys)
    check_tensor("values", values)
    if keys.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"keys and values must be 4-D (batch, kv_heads, seq, head_dim); got {tuple(keys.shape)} and "
            f"{tuple(values.shape)}"
        )
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on (batch, heads, seq)"
        )
    batch, heads, seq, _ = keys.shape
    idx = check_indices(indices, batch, heads, seq)
    k_out = torch.gather(keys, 2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
    v_out = torch.gather(values, 2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
    return k_out, v_out
