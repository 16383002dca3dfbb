"""The byte floor of a decode step on a GPU: the bytes it must read (the decoder's weights and the KV cache held)
over the device's copy bandwidth measured in the same process. A measured step over its floor says how far the step
is from being bound by memory bandwidth alone."""

from __future__ import annotations

import torch


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: the text decoder and the LM head - not a vision tower or projector (run
    once, in prefill), nor an untied input embedding (one row per token is read)."""
    text = model.config.get_text_config(decoder=True)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    skipped = ("vision", "multi_modal_projector") + (() if tied else ("embed_tokens",))
    return sum(p.nbytes for name, p in model.named_parameters() if not any(s in name for s in skipped))


def copy_bandwidth_gbps(device: str) -> float | None:
    """GB/s of a 1 GiB device-to-device copy on `device` (read + write counted), timed as the kernel microbenchmark
    times it (`bench.kernels.copy_bandwidth`: do_bench median); None if it could not run."""
    from bench.kernels import Timer, copy_bandwidth

    with torch.cuda.device(device):
        row = copy_bandwidth(Timer("cuda", quick=True), "cuda", 1 << 30, torch.float16)
    torch.cuda.empty_cache()
    return row["gbps"]


def byte_floor(device: str, model: torch.nn.Module, stats) -> dict:
    """The decode step's byte floor on this GPU: decoder weights plus the mean KV cache held over the steps (`stats`:
    the generation's `CacheStats`), over the copy bandwidth measured now, in this process."""
    bandwidth = copy_bandwidth_gbps(device)
    if not bandwidth:
        return {"copy_bandwidth_gbps": None}
    entry_bytes = [b / h if h else 0.0 for b, h in zip(stats.bytes, stats.held, strict=True)]
    kv_mean = sum(e * (k + h) / 2 for e, k, h in zip(entry_bytes, stats.kept, stats.held, strict=True))
    floor_bytes = decode_weight_bytes(model) + kv_mean
    return {
        "copy_bandwidth_gbps": bandwidth,
        "decode_floor_bytes": int(floor_bytes),
        "decode_floor_s": floor_bytes / (bandwidth * 1e9),
    }
