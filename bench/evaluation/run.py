"""Run a quality evaluation: per prompt one prefill, then its target read back under every variant x budget.

Each prompt's result is one JSON line appended to the results file as soon as it is done (under a file lock, so
several processes - `shard` - can share one file): a crash loses at most the prompt in hand, and a re-run with the
same settings skips what is there, computing for a partly done prompt only the variant x budget pairs it lacks.

A line: `{"settings": {...}, "prompt": "niah_single/3", "task": ..., "measure": ..., "seconds": ...,
"pairs": {"prefixkv@0.2": {"exact": 1, "nll": 0.12}, "full@1": {...}, ...}}` - per pair, by measure:
`exact` (1 when greedy decoding reproduces the answer) and `nll` (its mean loss per token); `nll` of the true
continuation; `agreement` (top-1 agreement with the full cache's greedy output) and `nll` (that output's loss).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import filelock
import torch

from bench.evaluation.prompts import Prompt
from bench.evaluation.read import FULL, Prefilled, Reading
from bench.evaluation.variants import Variant


def pair_key(label: str, budget: float) -> str:
    """`prefixkv@0.2`: a variant at a budget, as results files and tables name it."""
    return f"{label}@{budget:g}"


def _pairs(variants: Sequence[Variant], budgets: Sequence[float]) -> list[tuple[str, float]]:
    out = [(FULL.label, 1.0)]
    out += [(v.label, b) for v in variants if v.method != "full" for b in budgets]
    return list(dict.fromkeys(out))


def load(path: Path | None, settings: Mapping) -> dict[str, dict]:
    """The records of `path` made with `settings`, one per prompt (the pairs of its lines merged)."""
    records: dict[str, dict] = {}
    if path is None or not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write: that prompt is simply redone
            continue
        if row.get("settings") != settings:
            continue
        known = records.setdefault(row["prompt"], {**row, "pairs": {}, "seconds": 0.0})
        known["pairs"].update(row["pairs"])
        known["seconds"] += row.get("seconds", 0.0)
    return records


def _scores(measure: str, reading: Reading) -> dict:
    if measure == "exact":
        return {"exact": int(reading.exact), "nll": reading.nll}
    if measure == "loyalty":
        return {"agreement": reading.agreement, "nll": reading.nll}
    return {"nll": reading.nll}


def _inputs(prompt: Prompt, protocol: str, device) -> tuple[dict, torch.Tensor | None]:
    """The compressed part's inputs and the question read after it (None under the query-aware protocol)."""
    agnostic = protocol == "query-agnostic" and prompt.question
    ids = list(prompt.context) if agnostic else list(prompt.context + prompt.question)
    input_ids = torch.tensor([ids], device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              **{k: v.to(device) for k, v in prompt.extra.items()}}
    question = torch.tensor([list(prompt.question)], device=device) if agnostic else None
    return inputs, question


def evaluate_prompt(model, prompt: Prompt, variants: Sequence[Variant], pairs: Iterable[tuple[str, float]], *,
                    protocol: str, new_tokens: int) -> dict[str, dict]:
    """{pair key: scores} of one prompt for `pairs` (the full cache's included when asked)."""
    device = next(model.parameters()).device
    inputs, question = _inputs(prompt, protocol, device)
    prefilled = Prefilled(model, inputs, variants, question)
    if prompt.measure == "loyalty":
        target = prefilled.full_greedy(new_tokens)
    else:
        target = torch.tensor([list(prompt.target)], device=device)
    return {pair_key(label, budget): _scores(prompt.measure, prefilled.read(target, label, budget))
            for label, budget in pairs}


def evaluate(
    model,
    prompts: Sequence[Prompt],
    variants: Sequence[Variant],
    budgets: Sequence[float],
    *,
    protocol: str,
    new_tokens: int,
    settings: Mapping,
    out: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, dict]:
    """Evaluate this shard's prompts (every `shard[1]`-th from `shard[0]`) under every variant x budget and the
    full cache; returns every record of `out` with these settings (others' shards included)."""
    pairs = _pairs(variants, budgets)
    lock = filelock.FileLock(str(out) + ".lock") if out is not None else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    done = load(out, settings)
    mine = [p for i, p in enumerate(prompts) if i % shard[1] == shard[0]]
    todo = [(p, [pair for pair in pairs if pair_key(*pair) not in done.get(p.id, {}).get("pairs", {})])
            for p in mine]
    todo = [(p, missing) for p, missing in todo if missing]
    if len(todo) < len(mine):
        progress(f"{len(mine) - len(todo)} of {len(mine)} prompts already in {out}: skipped")
    started = time.perf_counter()
    for n, (prompt, missing) in enumerate(todo, 1):
        t0 = time.perf_counter()
        scores = evaluate_prompt(model, prompt, variants, missing, protocol=protocol, new_tokens=new_tokens)
        row = {"settings": dict(settings), "prompt": prompt.id, "task": prompt.task, "measure": prompt.measure,
               "seconds": time.perf_counter() - t0, "pairs": scores}
        if out is not None:
            with lock:  # one line per prompt: a crash loses at most the prompt in hand
                _append(out, json.dumps(row))
        record = done.setdefault(prompt.id, {**row, "pairs": {}})
        record["pairs"].update(scores)
        elapsed = time.perf_counter() - started
        eta = elapsed / n * (len(todo) - n)
        progress(f"[{n}/{len(todo)}] {prompt.id}  {row['seconds']:.0f} s  ({len(missing)} pairs)  elapsed "
                 f"{_clock(elapsed)}  ETA {_clock(eta)}")
    return load(out, settings) if out is not None else done


def _append(path: Path, line: str) -> None:
    """Append `line` to `path` on a line of its own, even after a line that a crash cut short."""
    with open(path, "a+b") as f:
        size = f.seek(0, 2)
        cut = size > 0 and f.seek(size - 1) >= 0 and f.read(1) != b"\n"
        f.write((b"\n" if cut else b"") + line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
