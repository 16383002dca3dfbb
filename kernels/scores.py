"""Importance scoring: the attention mass each key receives from a block of queries.

`attention_scores` runs two flash-style Triton passes and never materialises the s_q x s_k matrix:
`_attention_lse_kernel` computes each query row's log-sum-exp, then `_attention_scores_kernel` gives each program a
block of keys and loops over query blocks, summing `exp(q . k * scale - lse)` down the rows, so every key's sum is
owned by one program and no atomics are needed. Extra memory is the (batch, q_heads, s_q) float32 log-sum-exp.

`attention_scores_ref` is the plain-torch float32 reference and the CPU fallback.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted, so read the switch once, at import, too.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "on", "yes", "y"}

#: GPU autotuning space for pass 1 (one program = BLOCK_M query rows, looping over key blocks).
LSE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 32, 4, 4),
        (64, 32, 4, 2),  # small enough for fp32 inputs with head_dim 256, where the others run out of smem
    ]
]
#: GPU autotuning space for pass 2 (one program = BLOCK_N keys, looping over query blocks of BLOCK_M rows).
SCORE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 128, 4, 3),
        (64, 128, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (128, 64, 4, 3),
        (32, 128, 4, 4),
        (32, 64, 4, 2),  # small enough for fp32 inputs with head_dim 256, where the others run out of smem
    ]
]
# The interpreter runs every program in numpy and autotuning would time it with CUDA events: one small fixed
# config, with unequal BLOCK_M and BLOCK_N so that the tests cross block boundaries of both kinds.
_INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


_reference_only = False


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA devices, or any device under TRITON_INTERPRET=1,
    unless `reference_only()` is active.

    Where this is False the wrappers (`attention_scores`, `compact_kv`, `compact_kv_into`) run the torch references.
    """
    return not _reference_only and (_INTERPRET or torch.device(device).type == "cuda")


@contextlib.contextmanager
def reference_only():
    """Run the torch references even where the kernels could run: to compare the two paths end to end, and to keep
    model-level tests fast under the interpreter (which runs every kernel program in numpy)."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def autotuned_configs() -> dict[str, str | None]:
    """The config each scoring kernel's autotuner last picked (None before a launch), for benchmark records."""
    return {
        "attention_lse": _config_name(_attention_lse_kernel),
        "attention_scores": _config_name(_attention_scores_kernel),
    }


def _config_name(kernel) -> str | None:
    config = getattr(kernel, "best_config", None)
    return None if config is None else str(config)


def _configs(configs: list[triton.Config]) -> list[triton.Config]:
    return _INTERPRET_CONFIGS if _INTERPRET else configs


def _prune_fp32(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 inputs run the "ieee" dot, several times slower to compile and to run per config: tuning all of them cost
    50-70 s per new length bucket on an H100, so fp32 keeps only the small-block configs (which also fit its smem)."""
    if named_args["q_ptr"].dtype != torch.float32:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return small or configs[-1:]


#: Autotuning results persist in Triton's cache directory (keyed on the kernel, its key and the argument dtypes)
#: where this Triton supports it, so a new process does not tune again; the interpreter has nothing to tune.
PERSIST_AUTOTUNE = (
    {"cache_results": True}
    if not _INTERPRET and "cache_results" in inspect.signature(triton.autotune).parameters
    else {}
)
_TUNING = {"prune_configs_by": {"early_config_prune": _prune_fp32}, **PERSIST_AUTOTUNE}


@triton.autotune(configs=_configs(LSE_CONFIGS), key=["S_Q_BUCKET", "S_K_BUCKET", "BLOCK_D", "CAUSAL"], **_TUNING)
@triton.jit
def _attention_lse_kernel(
    # pointers
    q_ptr,
    k_ptr,
    lse_ptr,
    # strides
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    # sizes
    q_heads,
    s_q,
    s_k,
    head_dim,
    qk_scale,
    S_Q_BUCKET,
    S_K_BUCKET,
    # meta-parameters
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 1: `lse[b, h, i] = log2 sum_j 2^(q[b, h, i] . k[b, h // GROUP, j] * qk_scale)` over the visible keys.

    q: (batch, q_heads, s_q, d); k: (batch, q_heads // GROUP, s_k, d); lse: (batch, q_heads, s_q) float32, in base 2
    (`qk_scale` already holds log2(e)). Query i sits at key position s_k - s_q + i; with CAUSAL it sees j <= that.
    Grid: (cdiv(s_q, BLOCK_M), batch * q_heads).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    offset = s_k - s_q

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < head_dim
    # int64 bases: batch * heads * seq * head_dim overflows int32 for long contexts.
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    q = tl.load(
        q_base + rows[:, None].to(tl.int64) * stride_qm + dims[None, :] * stride_qd,
        mask=(rows[:, None] < s_q) & d_ok[None, :],
        other=0.0,
    )
    # -inf would give exp2(-inf - -inf) = nan for a row whose first key block is fully masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Keys [0, unmasked_end) are visible to every row of the block: no mask needed there.
    if CAUSAL:
        unmasked_end = ((offset + pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(s_k, offset + pid_m * BLOCK_M + BLOCK_M)
    else:
        unmasked_end = (s_k // BLOCK_N) * BLOCK_N
        end = s_k
    for start_n in range(0, unmasked_end, BLOCK_N):
        n = start_n + cols
        kt = tl.load(
            k_base + dims[:, None] * stride_kd + n[None, :].to(tl.int64) * stride_kn,
            mask=d_ok[:, None],
            other=0.0,
        )
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    for start_n in range(unmasked_end, end, BLOCK_N):
        n = start_n + cols
        kt = tl.load(
            k_base + dims[:, None] * stride_kd + n[None, :].to(tl.int64) * stride_kn,
            mask=d_ok[:, None] & (n[None, :] < s_k),
            other=0.0,
        )
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        visible = n[None, :] < s_k
        if CAUSAL:
            visible = visible & (n[None, :] <= offset + rows[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
        m_i = m_new

    lse = m_i + tl.math.log2(l_i)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * s_q + rows, lse, mask=rows < s_q)


@triton.autotune(configs=_configs(SCORE_CONFIGS), key=["S_Q_BUCKET", "S_K_BUCKET", "BLOCK_D", "CAUSAL"], **_TUNING)
@triton.jit
def _attention_scores_kernel(
    # pointers
    q_ptr,
    k_ptr,
    lse_ptr,
    out_ptr,
    # strides
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_ob,
    stride_oh,
    stride_on,
    # sizes
    q_heads,
    s_q,
    s_k,
    head_dim,
    qk_scale,
    S_Q_BUCKET,
    S_K_BUCKET,
    # meta-parameters
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 2: `out[b, h, j] = sum_i 2^(q[b, h, i] . k[b, h // GROUP, j] * qk_scale - lse[b, h, i])`, i visible to j.

    Shapes as in `_attention_lse_kernel`; out: (batch, q_heads, s_k) float32, every element written (0 for a key no
    query sees). Each program owns BLOCK_N keys and loops over query blocks, so the sums need no atomics.
    Grid: (cdiv(s_k, BLOCK_N), batch * q_heads).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    offset = s_k - s_q

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < head_dim
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    lse_base = lse_ptr + pid_bh.to(tl.int64) * s_q
    # Keys past s_k load as zeros; their sums are never stored, so they need no mask below.
    kt = tl.load(
        k_base + dims[:, None] * stride_kd + n[None, :].to(tl.int64) * stride_kn,
        mask=d_ok[:, None] & (n[None, :] < s_k),
        other=0.0,
    )
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    # Rows before `first` see none of these keys; rows from `unmasked_start` on see all of them. Rows past s_q get
    # lse = +inf, so 2^(qk - lse) = 0 and they need no mask either.
    if CAUSAL:
        first = (tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
        unmasked_start = tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        unmasked_start = tl.minimum(unmasked_start, s_q)
    else:
        first = 0
        unmasked_start = 0
    for start_m in range(first, unmasked_start, BLOCK_M):
        rows = start_m + rows0
        q = tl.load(
            q_base + rows[:, None].to(tl.int64) * stride_qm + dims[None, :] * stride_qd,
            mask=(rows[:, None] < s_q) & d_ok[None, :],
            other=0.0,
        )
        lse = tl.load(lse_base + rows, mask=rows < s_q, other=float("inf"))
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        p = tl.where(n[None, :] <= offset + rows[:, None], p, 0.0)
        acc += tl.sum(p, 0)
    for start_m in range(unmasked_start, s_q, BLOCK_M):
        rows = start_m + rows0
        q = tl.load(
            q_base + rows[:, None].to(tl.int64) * stride_qm + dims[None, :] * stride_qd,
            mask=(rows[:, None] < s_q) & d_ok[None, :],
            other=0.0,
        )
        lse = tl.load(lse_base + rows, mask=rows < s_q, other=float("inf"))
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        acc += tl.sum(tl.math.exp2(qk - lse[:, None]), 0)

    out_base = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(out_base + n.to(tl.int64) * stride_on, acc, mask=n < s_k)


def _bucket(size: int) -> int:
    # Autotune per power-of-two length, not per exact length: the cache scores many different lengths.
    return triton.next_power_of_2(max(size, 1))


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass per key, `out[b, h, j] = sum_i softmax_j(q[b, h, i] . k[b, h // g, j] * scale)`, in float32.

    q: (batch, q_heads, s_q, d); k: (batch, kv_heads, s_k, d), q_heads = g * kv_heads; same dtype (fp16, bf16,
    fp32) and device; any strides. The s_q queries sit at the last s_q key positions; `window` keeps the last
    `window` queries. `out`, if given, is a float32 (batch, q_heads, s_k) buffer to write (any strides).
    Returns (batch, q_heads, s_k) float32. Extra memory: a (batch, q_heads, s_q) float32 log-sum-exp.
    fp32 inputs use exact ("ieee") dot products rather than TF32, matching the reference to fp32 rounding.
    Falls back to `attention_scores_ref` where `kernels_available(q.device)` is False.
    """
    _check_qk(q, k, window)
    _check_options(causal, window, scale)
    window, scale = _plain(window, int), _plain(scale, float)
    if out is not None:
        check_tensor("out", out)
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among {_DTYPES}; got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device; got {q.device} and {k.device}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} exceeds the kernel's maximum {_MAX_HEAD_DIM}")
    batch, q_heads, _, head_dim = q.shape
    s_k = k.shape[2]
    if out is not None and (
        out.shape != (batch, q_heads, s_k) or out.dtype != torch.float32 or out.device != q.device
    ):
        raise ValueError(
            f"out must be float32 {(batch, q_heads, s_k)} on {q.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )

    if not kernels_available(q.device):
        result = attention_scores_ref(q, k, causal=causal, window=window, scale=scale)
        return result if out is None else out.copy_(result)

    if window is not None:
        q = q[:, :, -window:]
    s_q = q.shape[2]
    if out is None:
        out = torch.empty(batch, q_heads, s_k, dtype=torch.float32, device=q.device)
    if s_q == 0 or out.numel() == 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # The kernels work in base 2 (exp2 is the native instruction): fold log2(e) into the scale.
    qk_scale = scale * 1.4426950408889634
    lse = torch.empty(batch, q_heads, s_q, dtype=torch.float32, device=q.device)
    common = dict(
        q_heads=q_heads,
        s_q=s_q,
        s_k=s_k,
        head_dim=head_dim,
        qk_scale=qk_scale,
        S_Q_BUCKET=_bucket(s_q),
        S_K_BUCKET=_bucket(s_k),
        GROUP=q_heads // k.shape[1],
        CAUSAL=causal,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    # Triton launches on the current CUDA device, which need not be q's.
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        grid = lambda META: (triton.cdiv(s_q, META["BLOCK_M"]), batch * q_heads)
        _attention_lse_kernel[grid](q, k, lse, *q.stride(), *k.stride(), **common)
        grid = lambda META: (triton.cdiv(s_k, META["BLOCK_N"]), batch * q_heads)
        _attention_scores_kernel[grid](q, k, lse, out, *q.stride(), *k.stride(), *out.stride(), **common)
    return out


def check_tensor(name: str, value: object) -> None:
    """TypeError naming the argument when `value` is not a tensor (a list, an array): checked before any attribute."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} {_short(value)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_options(causal: object, window: object, scale: object) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {_short(causal)}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool)):
        raise TypeError(f"window must be an int number of queries or None, got {_short(window)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of queries, got {window}")
    if scale is not None:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {_short(scale)}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}")


def _plain(value, kind):
    """numpy scalars as Python numbers (the Triton interpreter takes only those); None stays None."""
    return None if value is None else kind(value)


def _check_qk(q: torch.Tensor, k: torch.Tensor, window: int | None) -> None:
    check_tensor("q", q)
    check_tensor("k", k)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, heads, seq, head_dim); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads={q.shape[1]} is not a multiple of kv_heads={k.shape[1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"more queries ({q.shape[2]}) than keys ({k.shape[2]}): queries align with the last keys"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")


def attention_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Attention mass per key, `out[b, h, j] = sum_i softmax_j(q[b, h, i] . k[b, h // g, j] * scale)`, in float32.

    q: (batch, q_heads, s_q, d); k: (batch, kv_heads, s_k, d) with q_heads = g * kv_heads (GQA when g > 1).
    The s_q queries sit at the last s_q key positions; with `causal`, query i sees keys j <= s_k - s_q + i.
    `window` keeps only the last `window` queries (SnapKV's observation window).
    Returns (batch, q_heads, s_k) float32. Memory is O(chunk_size x s_k) per head: the s_q x s_k matrix is never
    materialised whole.
    """
    _check_qk(q, k, window)
    _check_options(causal, window, scale)
    window, scale = _plain(window, int), _plain(scale, float)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {_short(chunk_size)}")
    if window is not None:
        q = q[:, :, -window:]
    batch, q_heads, s_q, d = q.shape
    kv_heads, s_k = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    kf = k.float().unsqueeze(2)  # (b, kv_heads, 1, s_k, d): broadcast over the query heads of each group
    # reshape, not view: a non-contiguous q (a window of a longer q, a transposed layout) cannot always be viewed.
    qf = q.float().reshape(batch, kv_heads, group, s_q, d)
    out = torch.zeros(batch, kv_heads, group, s_k, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(s_k, device=q.device)
    for start in range(0, s_q, chunk_size):
        rows = qf[:, :, :, start : start + chunk_size]
        logits = torch.matmul(rows, kf.transpose(-1, -2)) * scale  # (b, kv_heads, g, c, s_k)
        if causal:
            query_pos = torch.arange(start, start + rows.shape[3], device=q.device) + (s_k - s_q)
            logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        out += torch.softmax(logits, dim=-1).sum(dim=3)
    return out.view(batch, q_heads, s_k)
