"""PrefixKV's published efficiency figures, and our measured cells at the same shapes beside them.

The published rows are the paper's (Wang et al., arXiv 2412.03409, efficiency comparison on LLaVA-1.5-7B with the
fixed-position decode protocol); `bench/matrices/paper.toml` measures the same shapes here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SOURCE = "Wang et al., PrefixKV, arXiv 2412.03409: LLaVA-1.5-7B, budget 20%, fixed-position decoding"

#: (batch, prompt tokens, generated tokens) -> the paper's throughput in tokens/s (None: out of memory).
PUBLISHED = [
    {"model": "llava-1.5-7b", "batch": 16, "prompt": 1024, "new": 512, "method": "full", "budget": 1.0,
     "tokens_per_s": 267.0, "status": "ok"},
    {"model": "llava-1.5-7b", "batch": 16, "prompt": 1024, "new": 512, "method": "prefixkv", "budget": 0.2,
     "tokens_per_s": 487.0, "status": "ok"},
    {"model": "llava-1.5-7b", "batch": 48, "prompt": 624, "new": 256, "method": "full", "budget": 1.0,
     "tokens_per_s": None, "status": "oom"},
    {"model": "llava-1.5-7b", "batch": 48, "prompt": 624, "new": 256, "method": "prefixkv", "budget": 0.2,
     "tokens_per_s": None, "status": "ok"},
]

_SHAPE = ["model", "batch", "prompt", "new"]


def published() -> pd.DataFrame:
    """The paper's rows with their speed-up over the full cache at the same shape."""
    table = pd.DataFrame(PUBLISHED)
    full = table[table["method"] == "full"].set_index(_SHAPE)["tokens_per_s"].rename("full_tokens_per_s")
    table = table.join(full, on=_SHAPE)
    table["speedup"] = table["tokens_per_s"] / table["full_tokens_per_s"]
    return table.drop(columns="full_tokens_per_s")


def comparison(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the published rows, our cells at the paper's shapes): for each of our cells the median end-to-end tokens/s
    (generated tokens over the whole generate call, as the paper counts them), its repetitions `n` and their 95%
    bootstrap `interval`, peak memory, status, and the
    speed-up over our full cache at the same shape on the same hardware."""
    pub = published()
    needed = {"model", "batch_size", "prompt_length", "new_tokens", "method", "budget", "status"}
    if frame.empty or not needed <= set(frame.columns):
        return pub, pd.DataFrame()
    shapes = set(zip(pub["model"], pub["batch"], pub["prompt"], pub["new"], strict=True))
    rows = frame.copy()
    # Failed cells have no prompt_length: the prompt is the model's 576 image tokens plus the text.
    prompt = rows["prompt_length"].fillna(rows.get("text_tokens", np.nan) + 576)
    rows = rows.assign(prompt=prompt, batch=rows["batch_size"], new=rows["new_tokens"])
    rows = rows[[s in shapes for s in zip(rows["model"], rows["batch"], rows["prompt"], rows["new"], strict=True)]]
    if rows.empty:
        return pub, pd.DataFrame()
    rows["decode"] = rows["decode"].fillna("grow") if "decode" in rows else "grow"
    rows["hardware"] = rows["device_name"].fillna(rows["env_machine"]) if "device_name" in rows else rows["env_machine"]
    group = ["hardware", *_SHAPE, "method", "budget", "decode"]
    ok = rows[rows["status"] == "ok"]
    measured = ok.groupby(group).agg(tokens_per_s=("tokens_per_s", "median"), n=("tokens_per_s", "size"),
                                     interval=("tokens_per_s", _interval),
                                     peak_memory_gib=("peak_memory_bytes", lambda b: b.max() / 2**30))
    failed = rows[rows["status"] != "ok"].groupby(group)["status"].first()
    table = measured.join(failed, how="outer").reset_index()
    table["status"] = table["status"].fillna("ok")
    fulls = table[table["method"] == "full"].set_index(["hardware", *_SHAPE])
    table = table.join(fulls["tokens_per_s"].rename("full"), on=["hardware", *_SHAPE])
    table = table.join(fulls["status"].rename("full_status"), on=["hardware", *_SHAPE])
    table["speedup"] = table["tokens_per_s"] / table["full"]
    return pub, table.drop(columns="full").sort_values(group)


def _speedup_text(speedup: pd.Series, method: pd.Series, full_status: pd.Series) -> pd.Series:
    """`1.82x`, or why there is none: a compressed cell beside a full cache that failed (or did not run) never shows
    a bare dash next to "ok"."""
    def one(value, name, status):
        if pd.notna(value):
            return f"{value:.2f}x"
        if name == "full":
            return "-"
        return f"none: full cache {status}" if isinstance(status, str) else "none: no full cache"

    return pd.Series([one(*values) for values in zip(speedup, method, full_status, strict=True)], index=speedup.index)


def _interval(samples: pd.Series) -> str:
    from bench.uncertainty import median_ci

    e = median_ci(samples.to_numpy(dtype=float))
    return "-" if not e.known or e.n < 2 else f"{e.lo:,.0f}-{e.hi:,.0f}"


def published_display() -> pd.DataFrame:
    """The published rows as the report shows them: readable headings, consistent numbers."""
    t = published()
    full_status = t[t["method"] == "full"].set_index(_SHAPE)["status"]
    t = t.join(full_status.rename("full_status"), on=_SHAPE)
    ran_unpublished = (t["status"] == "ok") & t["tokens_per_s"].isna()
    return pd.DataFrame({
        "model": t["model"], "batch": t["batch"], "prompt + new tokens": t["prompt"].astype(str) + "+"
        + t["new"].astype(str), "method": t["method"], "budget": t["budget"].map(lambda b: f"{b:g}"),
        "end-to-end tok/s": t["tokens_per_s"].map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}"),
        "x full": _speedup_text(t["speedup"], t["method"], t["full_status"]),
        "status": t["status"].where(~ran_unpublished, "ran (no throughput published)"),
    })


def display(measured: pd.DataFrame) -> pd.DataFrame:
    """Our cells at the paper's shapes, as the report shows them."""
    m = measured
    return pd.DataFrame({
        "hardware": m["hardware"], "model": m["model"], "batch": m["batch"],
        "prompt + new tokens": m["prompt"].map(lambda v: f"{v:.0f}") + "+" + m["new"].map(lambda v: f"{v:.0f}"),
        "method": m["method"] + np.where(m["decode"] == "grow", "", "/" + m["decode"].astype(str)),
        "budget": m["budget"].map(lambda b: f"{b:g}"),
        "reps": m["n"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}"),
        "end-to-end tok/s": m["tokens_per_s"].map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}"),
        "interval": m["interval"].fillna("-"),
        "x full": _speedup_text(m["speedup"], m["method"], m["full_status"]),
        "peak GiB": m["peak_memory_gib"].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}"),
        "status": m["status"],
    })


def sentence(measured: pd.DataFrame) -> str | None:
    """In words: were our compressed cells at the paper's shapes faster or slower than our full cache, against the
    paper's 1.82x at batch 16?"""
    if measured.empty:
        return None
    pub = published()
    paper_x = float(pub.loc[(pub["batch"] == 16) & (pub["method"] == "prefixkv"), "speedup"].iloc[0])
    comp = measured[(measured["method"] != "full") & measured["speedup"].notna()]
    if comp.empty:
        return "No compressed cell at the paper's shapes has a full-cache cell beside it to compare with."
    lo, hi = comp["speedup"].min(), comp["speedup"].max()
    span = f"{lo:.2f}x" if lo == hi else f"{lo:.2f}-{hi:.2f}x"
    if hi < 1:
        verdict = f"every compressed cell was slower than our full cache ({span} its end-to-end throughput)"
    elif lo > 1:
        verdict = f"every compressed cell was faster than our full cache ({span})"
    else:
        verdict = f"compressed cells ranged from slower to faster than our full cache ({span})"
    return f"At the paper's shapes {verdict}, against the paper's {paper_x:.2f}x for PrefixKV at budget 0.2."
