"""Our cells at the paper's shapes beside its published figures."""

from __future__ import annotations

import pandas as pd
import pytest

from bench import paper


def test_published_speedup():
    table = paper.published()
    row = table[(table["batch"] == 16) & (table["method"] == "prefixkv")].iloc[0]
    assert row["speedup"] == pytest.approx(487 / 267)
    assert set(table[table["batch"] == 48]["status"]) == {"oom", "ok"}


def _row(method, budget, decode, batch, text, new, status="ok", tokens_per_s=None, rep=0):
    return {
        "model": "llava-1.5-7b", "batch_size": batch, "text_tokens": text, "new_tokens": new,
        "prompt_length": 576 + text if status == "ok" else None, "method": method, "budget": budget,
        "decode": decode if status == "ok" else None, "status": status, "tokens_per_s": tokens_per_s,
        "peak_memory_bytes": 40 * 2**30 if status == "ok" else None, "device_name": "NVIDIA H100", "rep": rep,
        "env_machine": "h100",
    }


def test_comparison_matches_shapes_and_computes_speedup():
    frame = pd.DataFrame(
        [_row("full", 1.0, "grow", 16, 448, 512, tokens_per_s=t, rep=i) for i, t in enumerate((100, 110, 90))]
        + [_row("prefixkv", 0.2, "fixed_position", 16, 448, 512, tokens_per_s=t, rep=i)
           for i, t in enumerate((200, 180, 190))]
        + [_row("full", 1.0, "grow", 48, 48, 256, status="oom")]
        + [_row("prefixkv", 0.2, "fixed_position", 48, 48, 256, tokens_per_s=300.0)]
        + [_row("h2o", 0.2, "grow", 4, 100, 16, tokens_per_s=50.0)]  # not a paper shape
    )
    _, measured = paper.comparison(frame)
    assert len(measured) == 4 and "h2o" not in set(measured["method"])
    b16 = measured[(measured["batch"] == 16) & (measured["method"] == "prefixkv")].iloc[0]
    assert b16["tokens_per_s"] == 190 and b16["speedup"] == pytest.approx(1.9)
    assert b16["decode"] == "fixed_position" and b16["prompt"] == 1024
    oom = measured[(measured["batch"] == 48) & (measured["method"] == "full")].iloc[0]
    assert oom["status"] == "oom" and oom["prompt"] == 624
    assert pd.isna(measured[(measured["batch"] == 48) & (measured["method"] == "prefixkv")].iloc[0]["speedup"])


def test_no_paper_shapes():
    _, measured = paper.comparison(pd.DataFrame([_row("h2o", 0.2, "grow", 4, 100, 16, tokens_per_s=50.0)]))
    assert measured.empty
