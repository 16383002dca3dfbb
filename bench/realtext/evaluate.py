"""Real-text quality of compressed caches: `python -m bench.realtext.evaluate --methods ... --budgets ...`.

On long prompts cut from Python's own documentation (`bench.realtext.corpus`), for each method x budget:
- `nll`: the mean per-token negative log-likelihood (nats) of the true continuation under the compressed cache
  (`prefixkv.continuation_logprobs`, teacher forcing), and `d_nll`, its excess over the full cache;
- `retrieval`: exact-match accuracy of a fact planted at controlled depths (`retrieval@<depth>` per depth);
- `agreement` / `rouge_l`: token agreement and ROUGE-L of the greedy output (`prefixkv.generate`) with the full
  cache's greedy output on the same prompts;
- `kept`: the mean kept entries per layer (from the cache's statistics).

A method is a name from `prefixkv.METHODS`, optionally with hyper-parameters in brackets:
`prefixkv[layer_floor=0.25,visibility_norm=True]`. Rows are appended to `--out` (JSON lines) as they finish, so
an interrupted run resumes where it stopped; the markdown table is printed at the end (and written to `--table`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import prefixkv
from bench import quality
from bench.realtext import corpus

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Settings:
    """What a run evaluates on: prompt length and the size of each task."""

    length: int = 512
    samples: int = 6  # continuation (perplexity) prompts
    continuation: int = 48
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    per_depth: int = 2
    agreement_samples: int = 4
    new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("length", "samples", "continuation", "agreement_samples", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.per_depth, bool) or not isinstance(self.per_depth, int) or self.per_depth < 0:
            raise ValueError(f"per_depth must be an integer >= 0, got {self.per_depth!r}")


@dataclass(frozen=True)
class Variant:
    """A method and its hyper-parameters; `label` is how it was written (`prefixkv[layer_floor=0.25]`)."""

    label: str
    method: str
    kwargs: dict = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """A method spec (`prefixkv.parse_method_spec`: `name` or `name[key=value,...]`); ValueError names the bad part."""
    name, kwargs = prefixkv.parse_method_spec(text)
    prefixkv.build_method(name, **kwargs)  # rejects bad hyper-parameters now, not after the full-cache pass
    return Variant(text.strip(), name, kwargs)


def parse_methods(text: str) -> list[Variant]:
    """Comma-separated variants (commas inside brackets belong to the variant); 'all' is every method."""
    out: list[Variant] = []
    for part in filter(None, prefixkv.split_method_specs(text)):
        out += [Variant(m, m) for m in prefixkv.METHODS] if part == "all" else [parse_variant(part)]
    return out


class Tasks:
    """The evaluation prompts of one run and the full cache's reference on them (computed once)."""

    def __init__(self, model, tokenizer, settings: Settings, progress: Callable[[str], None] = lambda s: None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        device = next(model.parameters()).device
        s = settings
        self.continuations = corpus.continuation_samples(
            tokenizer, s.length, s.samples, continuation=s.continuation, seed=s.seed
        )
        self.retrievals = corpus.retrieval_samples(tokenizer, s.length, s.depths, s.per_depth, seed=s.seed)
        self.answers = [tokenizer(r.answer, add_special_tokens=False)["input_ids"] for r in self.retrievals]
        self.agreement = [c.prompt for c in self.continuations[: s.agreement_samples]]
        self.device = device
        progress("full-cache reference")
        self.reference = [self._generate(p, "full", 1.0, {}) for p in self.agreement]

    def _inputs(self, ids: torch.Tensor) -> dict:
        ids = ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _generate(self, prompt: torch.Tensor, method: str, budget: float, kwargs: dict, new: int | None = None):
        out = prefixkv.generate(
            self.model, self._inputs(prompt), method=method, budget=budget,
            max_new_tokens=new or self.settings.new_tokens, **kwargs,
        )
        return out.sequences[0, prompt.shape[1] :].tolist(), out.cache_stats.kept

    def evaluate(self, method: str, budget: float, kwargs: dict) -> dict:
        """One row of metrics for `method` at `budget`."""
        start = time.perf_counter()
        nll = []
        for c in self.continuations:
            lp = prefixkv.continuation_logprobs(
                self.model, self._inputs(c.prompt), c.continuation.to(self.device), method=method, budget=budget,
                **kwargs,
            )
            nll += (-lp[0].float()).tolist()
        hits: dict[float, list[bool]] = {}
        for r, answer in zip(self.retrievals, self.answers, strict=True):
            ids, _ = self._generate(r.prompt, method, budget, kwargs, new=len(answer))
            hits.setdefault(r.depth, []).append(ids == answer)
        agree, rouge, kept = [], [], []
        for prompt, (ref, _) in zip(self.agreement, self.reference, strict=True):
            ids, layer_kept = self._generate(prompt, method, budget, kwargs)
            agree.append(quality.token_agreement(ids, ref))
            rouge.append(quality.rouge_l(self.tokenizer.decode(ids), self.tokenizer.decode(ref)))
            kept.append(layer_kept)
        row = {
            "nll": statistics.fmean(nll),
            "retrieval": statistics.fmean(h for v in hits.values() for h in v) if hits else None,
            **{f"retrieval@{d:g}": statistics.fmean(v) for d, v in sorted(hits.items())},
            "agreement": statistics.fmean(agree),
            "rouge_l": statistics.fmean(rouge),
            "kept": [statistics.fmean(k[i] for k in kept) for i in range(len(kept[0]))],
            "seconds": time.perf_counter() - start,
        }
        return row


def run(
    model,
    tokenizer,
    variants: Sequence[Variant],
    budgets: Sequence[float],
    settings: Settings,
    *,
    out: Path | None = None,
    model_name: str = "",
    progress: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Evaluate the full cache and every variant x budget; rows already in `out` (same settings) are reused.
    With `model=None` nothing is evaluated: the stored rows (full cache first) are returned as they are."""
    budgets = [prefixkv.check_budget(b) for b in budgets]
    ident = {"model": model_name, **settings.__dict__, "depths": list(settings.depths)}
    done: dict[tuple[str, float], dict] = {}
    if out is not None and out.is_file():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            if row.get("settings") == ident:
                done[(row["method"], row["budget"])] = row
    todo = [("full", 1.0, Variant("full", "full"))] + [(v.label, b, v) for v in variants if v.method != "full"
                                                       for b in budgets]
    if model is None:
        if ("full", 1.0) not in done:
            raise ValueError(f"{out} holds no full-cache row for these settings")
        order = {key: i for i, key in enumerate((label, b) for label, b, _ in todo)}
        todo = [("full", 1.0, None)] + [(label, b, None) for label, b in sorted(
            (k for k in done if k != ("full", 1.0)), key=lambda k: (order.get(k, len(order)), k[1], k[0]))]
    tasks = Tasks(model, tokenizer, settings, progress) if model is not None else None
    rows = []
    for i, (label, budget, variant) in enumerate(todo):
        if (label, budget) in done:
            rows.append(done[(label, budget)])
            continue
        progress(f"[{i + 1}/{len(todo)}] {label} @ {budget:g}")
        row = {"method": label, "budget": budget, **tasks.evaluate(variant.method, budget, variant.kwargs)}
        row["settings"] = ident
        rows.append(row)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:  # one line per row: a crash loses at most the row in progress
                f.write(json.dumps(row) + "\n")
    full = rows[0]["nll"]
    for row in rows:
        row["d_nll"] = row["nll"] - full
    return rows


def table(rows: Sequence[dict]) -> str:
    """A markdown table: one line per method x budget, full cache first."""
    depths = sorted({k for r in rows for k in r if k.startswith("retrieval@")}, key=lambda k: float(k[10:]))
    head = ["method", "budget", "nll", "Δnll vs full", "ppl", "retrieval", *depths, "agreement", "ROUGE-L",
            "kept min/max per layer", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["method"], f"{r['budget']:g}", f"{r['nll']:.3f}", f"{r['d_nll']:+.3f}", f"{2.718281828 ** r['nll']:.2f}",
            "-" if r["retrieval"] is None else f"{r['retrieval']:.2f}", *(f"{r[d]:.2f}" for d in depths),
            f"{r['agreement']:.2f}", f"{r['rouge_l']:.2f}", f"{min(r['kept']):.0f}/{max(r['kept']):.0f}",
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load(model: str, device: str, dtype: str):
    from bench.realtext.fetch import FetchError
    from bench.realtext.loading import load, load_dir

    try:
        return load_dir(Path(model), device, dtype) if os.sep in model or Path(model).is_dir() else load(
            model, device, dtype
        )
    except FetchError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a fetched model name, or a converted directory")
    parser.add_argument("--methods", default="all", help="comma-separated methods, 'all', or name[key=value,...]")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated budgets")
    parser.add_argument("--length", type=int, default=Settings.length, help="prompt tokens (512 to 4096)")
    parser.add_argument("--samples", type=int, default=Settings.samples, help="continuation prompts")
    parser.add_argument("--continuation", type=int, default=Settings.continuation, help="continuation tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated fact depths in [0, 1]")
    parser.add_argument("--per-depth", type=int, default=Settings.per_depth, help="retrieval prompts per depth")
    parser.add_argument("--agreement-samples", type=int, default=Settings.agreement_samples)
    parser.add_argument("--new-tokens", type=int, default=Settings.new_tokens, help="greedy tokens for agreement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended; resumes)")
    parser.add_argument("--table", type=Path, help="write the markdown table here too")
    parser.add_argument("--stored", action="store_true", help="evaluate nothing: tabulate every row in --out")
    args = parser.parse_args(argv)
    if args.stored and not args.out:
        print("error: --stored needs --out", file=sys.stderr)
        return 2
    try:
        variants = parse_methods(args.methods)
        budgets = [float(b) for b in args.budgets.split(",")]
        for b in budgets:
            prefixkv.check_budget(b)
        depths = tuple(float(d) for d in args.depths.split(",")) if args.depths else ()
        settings = Settings(
            length=args.length, samples=args.samples, continuation=args.continuation, depths=depths,
            per_depth=args.per_depth, agreement_samples=args.agreement_samples, new_tokens=args.new_tokens,
            seed=args.seed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = (None, None) if args.stored else _load(args.model, args.device, args.dtype)
    say = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        rows = run(model, tokenizer, variants, budgets, settings, out=args.out, model_name=args.model, progress=say)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.table.with_name(f".{args.table.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
