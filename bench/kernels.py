"""Kernel microbenchmarks: `python -m bench.kernels [--out FILE.json] [--quick]`.

Times each Triton kernel against its torch baselines at sizes that fill the chip:
- compaction (`compact_kv_into`) against `torch.gather` and `index_select`, reported as GB/s and as a fraction of
  the copy bandwidth (a large `copy_`) measured in the same run;
- importance scoring (`attention_scores`) against eager attention (materialised softmax(QK^T), summed; OOM is
  recorded, not fatal) and against SDPA forward at the same shape, reported as a ratio to SDPA.
On CUDA, `triton.testing.do_bench` (median; inputs rotate through several buffers so the L2 cache does not
flatter small sizes). On CPU only the torch references and baselines are timed, with `time.perf_counter`.
Every row carries its shape, dtype, times and derived figures; the JSON also holds the environment fingerprint.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import kernels
import kernels.compact
import kernels.scores
from bench.environment import cpu_model, fingerprint

# Targets from the kernel issue; the JSON says for each measured row whether it met them.
COMPACT_MIN_COPY_FRACTION = 0.9  # for caches >= 256 MB
COMPACT_MIN_COPY_FRACTION_BYTES = 256 * 2**20
COMPACT_MIN_SPEEDUP_VS_GATHER = 2.0
SCORES_MAX_RATIO_TO_SDPA = 1.3


@dataclass(frozen=True)
class Sizes:
    copy_bytes: int
    #: (batch, kv_heads, seq, head_dim, keep fraction)
    compact: Sequence[tuple[int, int, int, int, float]]
    compact_dtype: torch.dtype
    #: (batch, q_heads, kv_heads, s_q, s_k, head_dim, dtype)
    scores: Sequence[tuple[int, int, int, int, int, int, torch.dtype]]


GPU_SIZES = Sizes(
    copy_bytes=2**30,
    compact=[
        (1, 8, 8192, 128, 0.5),
        (1, 8, 32768, 128, 0.5),
        (4, 8, 32768, 128, 0.5),
        (4, 8, 32768, 128, 0.2),
        (8, 32, 16384, 128, 0.5),
    ],
    compact_dtype=torch.float16,
    scores=[
        (1, 32, 8, 4096, 4096, 128, torch.float16),
        (1, 32, 8, 8192, 8192, 128, torch.float16),
        (1, 32, 8, 8192, 8192, 128, torch.bfloat16),
        (1, 32, 8, 16384, 16384, 128, torch.float16),
        (1, 32, 8, 32768, 32768, 128, torch.float16),
        (1, 32, 8, 64, 32768, 128, torch.float16),
    ],
)
GPU_QUICK_SIZES = Sizes(
    copy_bytes=2**28,
    compact=[(1, 8, 8192, 128, 0.5), (4, 8, 32768, 128, 0.5)],
    compact_dtype=torch.float16,
    scores=[(1, 32, 8, 4096, 4096, 128, torch.float16), (1, 32, 8, 64, 32768, 128, torch.float16)],
)
CPU_SIZES = Sizes(
    copy_bytes=2**26,
    compact=[(1, 8, 4096, 128, 0.5), (2, 8, 8192, 128, 0.2)],
    compact_dtype=torch.float32,
    scores=[(1, 8, 2, 512, 512, 64, torch.float32), (1, 8, 2, 32, 2048, 64, torch.float32)],
)
CPU_QUICK_SIZES = Sizes(
    copy_bytes=2**23,
    compact=[(1, 2, 256, 64, 0.5)],
    compact_dtype=torch.float32,
    scores=[(1, 2, 1, 128, 128, 64, torch.float32)],
)


class Timer:
    """Median milliseconds of a callable: do_bench on CUDA, perf_counter over a few calls on CPU."""

    def __init__(self, device: str, quick: bool) -> None:
        self.device = device
        self.quick = quick

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            import triton.testing

            warmup, rep = (10, 30) if self.quick else (25, 100)
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()  # warm-up: first-call allocations and lazy initialisation stay outside the timed calls
        samples = []
        for _ in range(3 if self.quick else 7):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


def cpu_last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest cache of CPU 0 as Linux reports it (`index*/size`, e.g. "8192K"); 0 where unreadable."""
    sizes = []
    for entry in cache_dir.glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def _l2_bytes(device: str) -> int:
    """The cache a kernel's inputs must not fit in: the GPU's L2, the CPU's last-level cache."""
    if device != "cuda":
        return cpu_last_level_cache_bytes()
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def _rotation(device: str, input_bytes: int) -> int:
    """How many input copies to cycle through so consecutive calls never find their inputs in L2 (on a CPU: in
    the last-level cache), at most 8."""
    l2 = _l2_bytes(device)
    if l2 == 0 or input_bytes <= 0:
        return 1
    return max(1, min(8, math.ceil(4 * l2 / input_bytes)))


def _cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _measure(timer: Timer, device: str, fn: Callable[[], object]) -> tuple[float | None, float | None, str]:
    """(median ms, peak MB allocated on the device by one call, status); a failed cell records why."""
    try:
        ms = timer(fn)
        peak = None
        if device == "cuda":
            # One separate call: the timed ones share the device with do_bench's own L2-flush buffer.
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
    except torch.OutOfMemoryError:
        _free(device)
        return None, None, "oom"
    except Exception as err:  # noqa: BLE001 - one failed cell must not end the sweep
        _free(device)
        return (
            None,
            None,
            f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
        )
    return ms, peak, "ok"


def copy_bandwidth(timer: Timer, device: str, nbytes: int, dtype: torch.dtype) -> dict[str, Any]:
    """GB/s of `dst.copy_(src)` over `nbytes`, counting the read and the write."""
    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(n, device=device, dtype=dtype)  # in its dtype: no float32 copy of a 1 GiB buffer
    dst = torch.empty_like(src)
    ms, peak, status = _measure(timer, device, lambda: dst.copy_(src))
    gbps = 2 * nbytes / (ms * 1e-3) / 1e9 if ms else None
    return {
        "kernel": "copy",
        "impl": "torch.copy_",
        "shape": {"bytes": nbytes},
        "dtype": str(dtype).removeprefix("torch."),
        "time_ms": ms,
        "status": status,
        "peak_mem_mb": peak,
        "gbps": gbps,
    }


def _compact_baselines(keys, values, idx, dst_k, dst_v):
    """(name, callable) for each way of compacting one input set into preallocated outputs where torch allows."""
    batch, heads, seq, head_dim = keys.shape
    kept = idx.shape[-1]
    # torch.gather wants int64 indices: converting them is set-up, outside the timed call.
    gather_idx = idx.long()[..., None].expand(-1, -1, -1, head_dim)
    # index_select takes one flat index: row (b, h, idx) of the (batch * heads * seq, d) view.
    flat_idx = (idx + torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * seq).reshape(-1)
    flat_k, flat_v = keys.reshape(-1, head_dim), values.reshape(-1, head_dim)
    out_k, out_v = dst_k.view(-1, head_dim), dst_v.view(-1, head_dim)
    return {
        "triton": lambda: kernels.compact_kv_into(keys, values, idx, dst_k, dst_v),
        "torch.gather": lambda: (
            torch.gather(keys, 2, gather_idx, out=dst_k),
            torch.gather(values, 2, gather_idx, out=dst_v),
        ),
        "index_select": lambda: (
            torch.index_select(flat_k, 0, flat_idx, out=out_k),
            torch.index_select(flat_v, 0, flat_idx, out=out_v),
        ),
        "ref": lambda: kernels.compact_kv_ref(keys, values, idx),
    }, batch * heads * kept * head_dim


def bench_compaction(timer: Timer, device: str, sizes: Sizes, copy_gbps: float | None) -> list[dict]:
    rows = []
    dtype = sizes.compact_dtype
    elem = torch.tensor([], dtype=dtype).element_size()
    impls = (
        ["triton", "torch.gather", "index_select"]
        if device == "cuda"
        else ["ref", "torch.gather", "index_select"]
    )
    for batch, heads, seq, head_dim, keep in sizes.compact:
        kept = max(1, round(keep * seq))
        cache_bytes = 2 * batch * heads * seq * head_dim * elem
        shape = {"batch": batch, "kv_heads": heads, "seq": seq, "head_dim": head_dim, "kept": kept}
        try:
            sets = []
            for _ in range(_rotation(device, cache_bytes)):
                keys = torch.randn(batch, heads, seq, head_dim, device=device).to(dtype)
                values = torch.randn_like(keys)
                idx = torch.rand(batch * heads, seq, device=device).argsort(-1)[:, :kept].sort(-1).values
                idx = idx.view(batch, heads, kept).to(torch.int32 if device == "cuda" else torch.int64)
                dst_k = torch.empty(batch, heads, kept, head_dim, dtype=dtype, device=device)
                sets.append(_compact_baselines(keys, values, idx, dst_k, torch.empty_like(dst_k)))
        except torch.OutOfMemoryError:
            sets = []
            _free(device)
            rows.append({"kernel": "compact", "impl": "setup", "shape": shape, "status": "oom"})
            continue
        resident = cache_bytes * len(sets) <= _l2_bytes(device)
        times = {}
        for impl in impls:
            fns = [s[0][impl] for s in sets]
            ms, peak, status = _measure(timer, device, _cycle(fns))
            times[impl] = ms
            moved = 2 * 2 * sets[0][1] * elem  # keys and values, each kept row read once and written once
            gbps = moved / (ms * 1e-3) / 1e9 if ms else None
            rows.append(
                {
                    "kernel": "compact",
                    "impl": impl,
                    "shape": shape,
                    "dtype": str(dtype).removeprefix("torch."),
                    "cache_mb": cache_bytes / 2**20,
                    "bytes_moved": moved,
                    "time_ms": ms,
                    "status": status,
                    "peak_mem_mb": peak,
                    "gbps": gbps,
                    # Inputs that fit in the cache are read from it, not from memory: a fraction of the copy
                    # bandwidth (a buffer beyond the cache) would exceed 100%, so there is none.
                    "cache_resident": resident,
                    "frac_copy_bw": gbps / copy_gbps if gbps and copy_gbps and not resident else None,
                    "inputs_rotated": len(sets),
                }
            )
        base = "triton" if device == "cuda" else "ref"
        for row in rows[-len(impls) :]:
            if row["impl"] == base and times.get(base) and times.get("torch.gather"):
                row["speedup_vs_gather"] = times["torch.gather"] / times[base]
            if row["impl"] == "triton":
                row["config"] = kernels.compact.autotuned_configs()["compact_kv"]
                row["meets_target"] = _compact_target(row, cache_bytes)
        del sets
        _free(device)
    return rows


def _compact_target(row: dict, cache_bytes: int) -> bool | None:
    if row["status"] != "ok" or row.get("speedup_vs_gather") is None:
        return None
    fast = row["speedup_vs_gather"] >= COMPACT_MIN_SPEEDUP_VS_GATHER
    if cache_bytes < COMPACT_MIN_COPY_FRACTION_BYTES or row["frac_copy_bw"] is None:
        return fast
    return fast and row["frac_copy_bw"] >= COMPACT_MIN_COPY_FRACTION


def eager_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """What a model's eager attention does: materialise softmax(QK^T) (fp32 softmax, as transformers does), sum."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        logits.masked_fill_(mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs.sum(dim=-2, dtype=torch.float32)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # torch without enable_gqa: expand the kv heads as eager does
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_scoring(timer: Timer, device: str, sizes: Sizes) -> list[dict]:
    rows = []
    for batch, q_heads, kv_heads, s_q, s_k, head_dim, dtype in sizes.scores:
        shape = {
            "batch": batch,
            "q_heads": q_heads,
            "kv_heads": kv_heads,
            "s_q": s_q,
            "s_k": s_k,
            "head_dim": head_dim,
            "causal": True,
        }
        try:
            rows += _scoring_cell(timer, device, shape, dtype)
        except torch.OutOfMemoryError:  # the inputs themselves did not fit
            rows.append({"kernel": "scores", "impl": "setup", "shape": shape, "status": "oom"})
        _free(device)
    return rows


def row_lse(q: torch.Tensor, k: torch.Tensor, *, causal: bool, chunk: int = 256) -> torch.Tensor:
    """Each query row's natural log-sum-exp over its visible keys, (batch, q_heads, s_q) float32, in query chunks
    (what flash attention returns beside its output; computed once, outside any timed region)."""
    batch, q_heads, s_q, head_dim = q.shape
    s_k, group = k.shape[2], q_heads // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    out = torch.empty(batch, q_heads, s_q, device=q.device)
    key_pos = torch.arange(s_k, device=q.device)
    for start in range(0, s_q, chunk):
        logits = q[:, :, start : start + chunk].float() @ kf.transpose(-1, -2) / math.sqrt(head_dim)
        if causal:
            query_pos = torch.arange(start, start + logits.shape[2], device=q.device) + (s_k - s_q)
            logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        out[:, :, start : start + chunk] = logits.logsumexp(-1)
    return out


def _scoring_cell(timer: Timer, device: str, shape: dict, dtype: torch.dtype) -> list[dict]:
    batch, s_q, s_k, head_dim = shape["batch"], shape["s_q"], shape["s_k"], shape["head_dim"]
    q = torch.randn(batch, shape["q_heads"], s_q, head_dim, device=device).to(dtype)
    k = torch.randn(batch, shape["kv_heads"], s_k, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    # No input rotation here: every input is far larger than L2, and do_bench flushes L2 between calls.
    # SDPA's is_causal aligns the mask top-left, so only the square case is causal there; with few queries
    # (a window) the full attention it does instead costs the same to within those queries' triangle.
    sdpa_causal = s_q == s_k

    def eager() -> torch.Tensor:
        pos = torch.arange(s_k, device=device)
        return eager_scores(q, k, pos[None, :] > pos[s_k - s_q :, None])

    # What the cache does in prefill: the attention hands over its log-sum-exp, so scoring is one pass (`_lse`).
    lse = row_lse(q, k, causal=True)
    impls: dict[str, Callable[[], object]] = {}
    if device == "cuda":
        impls["triton"] = lambda: kernels.attention_scores(q, k)
        impls["triton_lse"] = lambda: kernels.attention_scores(q, k, lse=lse)
    else:
        impls["ref"] = lambda: kernels.attention_scores_ref(q, k)
        impls["ref_lse"] = lambda: kernels.attention_scores_ref(q, k, lse=lse)
    impls["sdpa_forward"] = lambda: _sdpa(q, k, v, sdpa_causal)
    impls["eager"] = eager

    rows, times, results = [], {}, {}
    for impl, fn in impls.items():
        ms, peak, status = _measure(timer, device, fn)
        times[impl] = ms
        # Keep the outputs (batch x heads x s_k floats) to cross-check the implementations where eager is cheap.
        if status == "ok" and impl != "sdpa_forward" and s_q * s_k <= 8192 * 8192:
            results[impl] = fn()
        rows.append(
            {
                "kernel": "scores",
                "impl": impl,
                "shape": shape,
                "dtype": str(dtype).removeprefix("torch."),
                "time_ms": ms,
                "status": status,
                "peak_mem_mb": peak,
            }
        )
        _free(device)
    eager_status = rows[-1]["status"]
    for row in rows:
        ms, sdpa_ms = row["time_ms"], times.get("sdpa_forward")
        if row["impl"] != "sdpa_forward" and ms and sdpa_ms:
            row["ratio_to_sdpa"] = ms / sdpa_ms
        if row["impl"] in results and "eager" in results and row["impl"] != "eager":
            row["max_abs_diff_vs_eager"] = float((results[row["impl"]] - results["eager"]).abs().max())
        if row["impl"] in ("triton", "triton_lse"):
            row["config"] = kernels.scores.autotuned_configs()
            ratio = row.get("ratio_to_sdpa")
            row["meets_target"] = None if ratio is None else ratio <= SCORES_MAX_RATIO_TO_SDPA
            row["eager_status"] = eager_status
            row["runs_where_eager_cannot"] = row["status"] == "ok" and eager_status == "oom"
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_SHAPE_KEYS = {
    "bytes": "",
    "batch": "b",
    "kv_heads": "kvh",
    "q_heads": "qh",
    "seq": "s",
    "s_q": "sq",
    "s_k": "sk",
    "head_dim": "d",
    "kept": "k",
}


def _shape_text(shape: dict) -> str:
    return " ".join(f"{_SHAPE_KEYS[k]}{v}" for k, v in shape.items() if k in _SHAPE_KEYS)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Kernel microbenchmarks on {report['device']}")
    for col in [
        "kernel",
        "impl",
        "shape",
        "dtype",
        "ms",
        "GB/s",
        "copy BW",
        "vs gather",
        "vs SDPA",
        "status",
    ]:
        table.add_column(col, justify="left" if col in {"kernel", "impl", "shape", "status"} else "right")
    for row in report["rows"]:
        shape = _shape_text(row.get("shape", {}))
        table.add_row(
            row["kernel"],
            row["impl"],
            shape,
            row.get("dtype", "-"),
            _fmt(row.get("time_ms"), ".3f"),
            _fmt(row.get("gbps"), ".1f"),
            "in cache" if row.get("cache_resident") else _fmt(row.get("frac_copy_bw"), ".0%"),
            _fmt(row.get("speedup_vs_gather"), ".2f"),
            _fmt(row.get("ratio_to_sdpa"), ".2f"),
            row.get("status", "-"),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a log file: do not wrap the table at 80 columns
    console.print(table)


def run(quick: bool = False, device: str | None = None) -> dict:
    """Run the sweep on `device` (CUDA when available) and return the report (environment, rows)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        sizes = GPU_QUICK_SIZES if quick else GPU_SIZES
        name = torch.cuda.get_device_name(0)
    else:
        sizes = CPU_QUICK_SIZES if quick else CPU_SIZES
        name = f"CPU {cpu_model()}"
    timer = Timer(device, quick)
    # The copy's source and destination together exceed the cache (the LLC on a CPU: a bigger one than the size
    # table assumed gets a bigger buffer), so that the bandwidth is memory's, not the cache's.
    copy_bytes = max(sizes.copy_bytes, _l2_bytes(device))
    copy = copy_bandwidth(timer, device, copy_bytes, sizes.compact_dtype)
    _free(device)
    rows = [copy]
    rows += bench_compaction(timer, device, sizes, copy["gbps"])
    rows += bench_scoring(timer, device, sizes)
    return {
        "device": name,
        "torch_device": device,
        "quick": quick,
        "timing": "triton.testing.do_bench median" if device == "cuda" else "time.perf_counter median",
        "kernels_timed": device == "cuda",
        "copy_bandwidth_gbps": copy["gbps"],
        "targets": {
            "compact_min_copy_fraction": COMPACT_MIN_COPY_FRACTION,
            "compact_min_copy_fraction_cache_mb": COMPACT_MIN_COPY_FRACTION_BYTES / 2**20,
            "compact_min_speedup_vs_gather": COMPACT_MIN_SPEEDUP_VS_GATHER,
            "scores_max_ratio_to_sdpa": SCORES_MAX_RATIO_TO_SDPA,
        },
        "env": fingerprint(),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions")
    args = parser.parse_args(argv)
    report = run(quick=args.quick)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
