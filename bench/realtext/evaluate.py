"""Quality of compressed caches on real prompts: `python -m bench.realtext.evaluate --methods ... --budgets ...`.

A thin driver over the quality engine (`bench.evaluation`): for every prompt one uncompressed prefill, from which
every method x budget is compressed and its target read back (`prefixkv.prefill`); then per task the paired loss
against the full cache on the same prompts, with 95% bootstrap intervals.

Models: a fetched model (`smollm2-135m`), `hf:<id or path>` or a local checkpoint directory (nothing is
downloaded). A text model gets RULER-style tasks over real text (`bench.tasks.ruler`, exact match), the per-token
loss of true continuations, and agreement with the full cache's greedy output, all through its own tokenizer and
chat template; a LLaVA-family model gets real photographs (`bench.evaluation.photos`) with description and question
instructions through its processor, scored by loyalty to the full cache's answer.

A method is a name from `prefixkv.METHODS`, optionally with hyper-parameters in brackets:
`prefixkv[layer_floor=0.25,visibility_norm=True]`. One JSON line per prompt is appended to `--out` as it finishes,
so an interrupted run resumes where it stopped (and `--shard I/N` splits the prompts over processes sharing one
file); the markdown tables are printed at the end (and written to `--table`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import prefixkv
from bench.evaluation import run, summary
from bench.evaluation.spec import QualitySpec
from bench.evaluation.variants import Variant, parse_methods, parse_variant

DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)

__all__ = ["DEFAULT_BUDGETS", "Variant", "main", "parse_methods", "parse_variant", "tables"]


def tables(records: dict, labels: list[str], budgets: list[float], versus: str | None = None) -> str:
    """The markdown of a run: the headline loss per method x budget, each task at each budget, PrefixKV's
    allocation gain over `uniform` with the same scores where both ran, and every method's paired gain over
    `versus` if given."""
    parts = ["Headline: paired loss vs the full cache, mean [95% interval] ('~': the interval contains 0).", "",
             summary.headline_table(records, labels, budgets)]
    for budget in budgets:
        parts += ["", f"Budget {budget:g}, per task:", "", summary.task_table(records, labels, budget)]
    pairs = [(label, label.replace("prefixkv", "uniform", 1)) for label in labels if label.startswith("prefixkv")]
    pairs = [(label, over) for label, over in pairs if over in labels]
    if versus is not None:
        pairs += [(label, versus) for label in labels if label != versus]
    for label, over in pairs:
        parts += ["", f"`{label}` over `{over}`, paired (positive: `{label}` better), the headline's measure:", "",
                  summary.gain_table(records, label, over, budgets), "", "and the per-token loss (nats/token) of "
                  "every prompt's target (answers, continuations):", "",
                  summary.gain_table(records, label, over, budgets, loss=True)]
    return "\n".join(parts)


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard must be I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return shard


def _prompts(model, tokenizer, processor, spec: QualitySpec):
    from bench.evaluation.prompts import text_prompts

    if processor is None:
        return text_prompts(tokenizer, spec, spec.tasks_for(image_model=False))
    from bench.evaluation.photos import image_prompts

    token = getattr(model.config, "image_token_index", getattr(model.config, "image_token_id", None))
    return image_prompts(processor, token, spec, spec.tasks_for(image_model=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtext.evaluate", description=__doc__.splitlines()[0])
    defaults = QualitySpec()
    parser.add_argument("--model", default="smollm2-135m",
                        help="a fetched model name, hf:<id or path>, or a local checkpoint directory")
    parser.add_argument("--methods", default="all", help="comma-separated methods, 'all', or name[key=value,...]")
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated budgets")
    parser.add_argument("--tasks", default="auto", help="comma-separated tasks, or 'auto' (every task of the model)")
    parser.add_argument("--prompts", type=int, default=defaults.prompts,
                        help="prompts per task (the tables: the first N of each task that --out holds)")
    parser.add_argument("--length", type=int, default=defaults.length, help="tokens per text prompt (exact)")
    parser.add_argument("--protocol", default=defaults.protocol, choices=("query-aware", "query-agnostic"))
    parser.add_argument("--haystack", default=defaults.haystack, help="pydoc or docstrings")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="places windows, draws keys and values")
    parser.add_argument("--continuation", type=int, default=defaults.continuation, help="continuation tokens scored")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help="full cache's greedy tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--shard", default="0/1", help="I/N: evaluate every N-th prompt from the I-th")
    parser.add_argument("--out", type=Path, help="JSON-lines results file (appended; resumes)")
    parser.add_argument("--table", type=Path, help="write the markdown tables here too")
    parser.add_argument("--stored", action="store_true", help="evaluate nothing: tabulate what --out holds")
    parser.add_argument("--versus", help="also tabulate every method's paired gain over this one (a --methods label)")
    args = parser.parse_args(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.stored and not args.out:
        say("error: --stored needs --out")
        return 2
    try:
        variants = [v for v in parse_methods(args.methods) if not (v.method == "full" and not v.kwargs)]
        budgets = [prefixkv.check_budget(float(b)) for b in args.budgets.split(",")]
        spec = QualitySpec(tasks=tuple(args.tasks.split(",")), prompts=args.prompts, length=args.length,
                           protocol=args.protocol, haystack=args.haystack, seed=args.seed,
                           continuation=args.continuation, new_tokens=args.new_tokens)
        shard = _shard(args.shard)
    except ValueError as err:
        say(f"error: {err}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = spec.settings(args.model)
    labels = [v.label for v in variants]
    if args.stored:
        records = run.load(args.out, settings)
        if not records:
            say(f"error: {args.out} holds no record with these settings")
            return 2
    else:
        from bench.models import ModelError, load_pretrained

        try:
            model, tokenizer, processor = load_pretrained(args.model, args.device, args.dtype)
            prompts = _prompts(model, tokenizer, processor, spec)
        except (ModelError, ValueError) as err:
            say(f"error: {err}")
            return 2
        say(f"{len(prompts)} prompts x ({len(variants)} methods x {len(budgets)} budgets + the full cache), "
            f"shard {shard[0]}/{shard[1]}")
        records = run.evaluate(model, prompts, variants, budgets, protocol=spec.protocol, new_tokens=spec.new_tokens,
                               settings=settings, out=args.out, shard=shard, progress=say)
    if "auto" not in spec.tasks:  # the file may hold other tasks' prompts too (same settings): tabulate these
        records = {key: r for key, r in records.items() if r["task"] in spec.tasks}
    # ... and more prompts per task than asked for (prompt i of a task is the same whatever the count): the first N
    records = {key: r for key, r in records.items() if int(r["prompt"].rpartition("/")[2]) < spec.prompts}
    text = tables(records, labels, budgets, args.versus)
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.table.with_name(f".{args.table.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
