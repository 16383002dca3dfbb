"""What one prefill buys: a sweep of every method x budget against one `continuation_logprobs` call.

`python -m bench.sweep_cost` times, on real text (`bench.realtext.corpus`, a 1024-token window of Python's
documentation and its true 64-token continuation) and a fetched real model (SmolLM2-135M by default), A/B/A/B:
- A: one `prefixkv.continuation_logprobs` call (one method at one budget: prefill, compression, one chunk forward
  scoring the T continuation tokens);
- B: one `prefixkv.sweep_logprobs` over `--methods` x `--budgets` (every method of `prefixkv.METHODS` at 0.1, 0.2,
  0.3, 0.5 by default; the full cache included, computed once, as the reference every sweep returns).
Each repetition gives one B / A ratio from two runs side by side; the median and the range of those ratios are the
figure (the issue's target: B <= 3 A). Wall-clock seconds and the process's CPU seconds are both recorded: on a
shared machine another process's load stretches the wall clock of one run and not the other's, while the CPU time
of a one-thread process counts only its own work. The sweep's time is broken down by the library's regions
(prefill - scoring included -, score, allocate, compact, chunk). The load average is read before and after; pin
`--threads 1` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import prefixkv
from bench.environment import fingerprint
from bench.timing import RegionTimer, timed
from prefixkv.sweep import sweep_cells

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)
REGIONS = ("prefill", "score", "allocate", "compact", "chunk")


def measure(
    one: Callable[[], object],
    sweep: Callable[[RegionTimer], object],
    *,
    repetitions: int,
    device: str,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Time `one()` and `sweep(timer)` alternately, `repetitions` times each after one warm-up of each; returns the
    per-repetition wall and CPU seconds, the paired ratios and the sweep's wall seconds per region."""
    one()
    sweep(RegionTimer(device))
    wall: dict[str, list[float]] = {"one": [], "sweep": []}
    cpu: dict[str, list[float]] = {"one": [], "sweep": []}
    regions = []
    for rep in range(repetitions):
        timer = RegionTimer(device)
        for kind, work in (("one", one), ("sweep", lambda timer=timer: sweep(timer))):
            started = time.process_time()
            _, seconds = timed(work, device)
            cpu[kind].append(time.process_time() - started)
            wall[kind].append(seconds)
        regions.append({name: timer.total(name) for name in REGIONS})
        progress(f"repetition {rep + 1}/{repetitions}: one call {wall['one'][-1]:.2f} s, sweep "
                 f"{wall['sweep'][-1]:.2f} s, ratio {wall['sweep'][-1] / wall['one'][-1]:.2f} (CPU time "
                 f"{cpu['sweep'][-1] / cpu['one'][-1]:.2f})")
    ratios = [b / a for a, b in zip(wall["one"], wall["sweep"], strict=True)]
    cpu_ratios = [b / a for a, b in zip(cpu["one"], cpu["sweep"], strict=True)]
    return {
        "one_call_s": wall["one"],
        "sweep_s": wall["sweep"],
        "one_call_cpu_s": cpu["one"],
        "sweep_cpu_s": cpu["sweep"],
        "ratio": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "cpu_ratio": cpu_ratios,
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
        "sweep_regions_s": regions,
    }


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    from bench.realtext import corpus
    from bench.realtext.loading import load, load_dir

    methods = list(prefixkv.METHODS) if args.methods == "all" else args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    sweep_cells(methods, budgets, {})  # a bad method or budget is named before the model loads
    prefixkv.build_method(args.method)
    prefixkv.check_budget(args.budget)
    torch.set_num_threads(args.threads)
    if Path(args.model).is_dir():
        model, tokenizer = load_dir(Path(args.model), args.device, args.dtype)
    else:
        model, tokenizer = load(args.model, args.device, args.dtype)
    sample = corpus.continuation_samples(tokenizer, args.length, 1, continuation=args.continuation, seed=args.seed)[0]
    ids = sample.prompt.to(args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    continuation = sample.continuation.to(args.device)
    one = lambda: prefixkv.continuation_logprobs(model, inputs, continuation, method=args.method, budget=args.budget)
    sweep = lambda timer: prefixkv.sweep_logprobs(
        model, inputs, continuation, methods=methods, budgets=budgets, timer=timer
    )
    load_before = os.getloadavg()
    started = time.time()
    result = measure(one, sweep, repetitions=args.repetitions, device=args.device, progress=progress)
    return {
        "command": "python -m bench.sweep_cost " + " ".join(sys.argv[1:]),
        "model": args.model,
        "prompt_tokens": args.length,
        "continuation_tokens": args.continuation,
        "one_call": {"method": args.method, "budget": args.budget},
        "sweep": {"methods": methods, "budgets": budgets, "cells": len(methods) * len(budgets),
                  "reference": "full at 1.0, included"},
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "machine": platform.node(),
        **result,
        "env": fingerprint(),
    }


def summary(report: dict) -> str:
    def spread(values: Sequence[float]) -> str:
        return f"median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"

    regions = {name: statistics.median(r[name] for r in report["sweep_regions_s"]) for name in REGIONS}
    one = report["one_call"]
    lines = [
        f"{report['model']}, {report['prompt_tokens']}-token prompt, {report['continuation_tokens']} continuation "
        f"tokens, {report['threads']} thread(s), {len(report['ratio'])} A/B repetitions",
        f"A  continuation_logprobs({one['method']} @ {one['budget']}): {spread(report['one_call_s'])}",
        f"B  sweep_logprobs({len(report['sweep']['methods'])} methods x {len(report['sweep']['budgets'])} budgets): "
        f"{spread(report['sweep_s'])}",
        f"B / A wall clock: median {report['ratio_median']:.2f}, range {report['ratio_range'][0]:.2f}-"
        f"{report['ratio_range'][1]:.2f}  (samples: {', '.join(f'{r:.2f}' for r in report['ratio'])})",
        f"B / A CPU time:   median {report['cpu_ratio_median']:.2f}, range {report['cpu_ratio_range'][0]:.2f}-"
        f"{report['cpu_ratio_range'][1]:.2f}  (samples: {', '.join(f'{r:.2f}' for r in report['cpu_ratio'])})",
        "sweep by region (median s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in regions.items())
        + "  (prefill includes score; compact and allocate run per cell)",
        "load average before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
            *report["load_average_before"], *report["load_average_after"]
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a fetched model name, or a converted directory")
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--continuation", type=int, default=64, help="continuation tokens scored")
    parser.add_argument("--method", default="prefixkv", help="the one call's method")
    parser.add_argument("--budget", type=float, default=0.2, help="the one call's budget")
    parser.add_argument("--methods", default="all", help="the sweep's methods: comma-separated, or 'all'")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="the sweep's budgets")
    parser.add_argument("--repetitions", type=int, default=5, help="A/B pairs timed after one warm-up each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="which window of the documentation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.repetitions < 1 or args.threads < 1:
        parser.error("--repetitions and --threads must be >= 1")
    say = lambda line: print(line, file=sys.stderr, flush=True)
    try:
        report = run(args, say)
    except ValueError as err:  # a bad method, budget or an unfetched model, in one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
