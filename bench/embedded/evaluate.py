"""Quality of every KV-cache method at every budget on the embedded model's fixed held-out scenes.

    python -m bench.embedded.evaluate --methods all --budgets 0.1,0.2,0.3,0.5,1.0 [--scenes N] [--out FILE.csv|.md]

For each (method, budget): task scores against the scenes' ground truth (description object F1, question accuracy
per kind), closeness to the full cache (token agreement, ROUGE-L) and the perplexity of the reference answers with
the compressed prompt cache (teacher forcing). Prompts are batched per instruction kind (equal lengths, no padding).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import quality
from bench.embedded.loading import eval_pairs, load
from bench.embedded.model import answer_ids, build_inputs
from bench.embedded.scenes import KINDS, Instruction, Scene

DEFAULT_SCENES = 200
MAX_NEW_TOKENS = {"describe": 80, "count": 4, "lookup": 6, "relation": 14}  # longest answer + </s>, rounded up
QUESTION_KINDS = tuple(k for k in KINDS if k != "describe")
COLUMNS = (
    "method", "budget", "kept", "desc_precision", "desc_recall", "desc_f1", "count_acc", "lookup_acc",
    "relation_acc", "qa_acc", "agreement", "rouge_l", "ppl", "seconds", "error",
)


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _answers(tokenizer, sequences: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Generated ids after the prompt, truncated after the first </s>."""
    return [quality.truncate_at_eos(row[prompt_len:].tolist(), tokenizer.eos_token_id) for row in sequences]


def _text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def task_scores(kind: str, pairs: Sequence[tuple[Scene, Instruction]], texts: Sequence[str]) -> dict[str, float]:
    """Mean task scores of generated `texts` for one kind: precision/recall/F1 for describe, accuracy otherwise."""
    if kind == "describe":
        prf = [quality.description_prf(t, scene) for (scene, _), t in zip(pairs, texts, strict=True)]
        return {
            "desc_precision": sum(s.precision for s in prf) / len(prf),
            "desc_recall": sum(s.recall for s in prf) / len(prf),
            "desc_f1": sum(s.f1 for s in prf) / len(prf),
        }
    ok = [quality.answer_correct(t, ins.answer) for (_, ins), t in zip(pairs, texts, strict=True)]
    return {f"{kind}_acc": sum(ok) / len(ok)}


@torch.inference_mode()
def hf_generate(model, tokenizer, pairs, kind: str, batch_size: int = 50) -> list[list[int]]:
    """Greedy answers with the plain transformers `generate` and its full cache (independent of `prefixkv`)."""
    out = []
    for chunk in _chunks(pairs, batch_size):
        inputs = build_inputs(tokenizer, chunk, device=model.device)
        seq = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS[kind], do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        out.extend(_answers(tokenizer, seq, inputs["input_ids"].shape[1]))
    return out


def full_cache_scores(model, tokenizer, n_scenes: int = 50, batch_size: int = 50) -> dict[str, float]:
    """Held-out task scores with the full cache (plain `model.generate`), every instruction kind on `n_scenes`."""
    scores: dict[str, float] = {}
    for kind in KINDS:
        pairs = eval_pairs(kind, n_scenes)
        texts = [_text(tokenizer, ids) for ids in hf_generate(model, tokenizer, pairs, kind, batch_size)]
        scores.update(task_scores(kind, pairs, texts))
    scores["qa_acc"] = sum(scores[f"{k}_acc"] for k in QUESTION_KINDS) / len(QUESTION_KINDS)
    return {k: round(v, 4) for k, v in scores.items()}


def evaluate_cell(
    model, tokenizer, method: str, budget: float, sets: dict, reference: dict | None, batch_size: int,
    **method_kwargs,
) -> dict:
    """One (method, budget) row. `sets[kind]` holds the evaluation pairs; `reference[kind]` the full cache's
    generated ids (None while computing the reference itself). Returns the row and, under "_answers", the ids."""
    import prefixkv

    row: dict = {"method": method, "budget": budget}
    answers: dict[str, list[list[int]]] = {}
    agree, rouge, kept = [], [], []
    nll, n_tokens = 0.0, 0
    start = time.perf_counter()
    for kind, pairs in sets.items():
        answers[kind] = []
        for chunk in _chunks(pairs, batch_size):
            inputs = build_inputs(tokenizer, chunk, device=model.device)
            prompt_len = inputs["input_ids"].shape[1]
            out = prefixkv.generate(
                model, inputs, method=method, budget=budget, max_new_tokens=MAX_NEW_TOKENS[kind], **method_kwargs
            )
            answers[kind].extend(_answers(tokenizer, out.sequences, prompt_len))
            kept.append(out.cache_stats.kept_fraction)
            refs = [answer_ids(tokenizer, ins.answer) for _, ins in chunk]
            width = max(len(r) for r in refs)
            cont = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in refs], device=model.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in refs], device=model.device).bool()
            lp = prefixkv.continuation_logprobs(model, inputs, cont, method=method, budget=budget, **method_kwargs)
            nll -= lp[mask].double().sum().item()
            n_tokens += int(mask.sum())
        texts = [_text(tokenizer, ids) for ids in answers[kind]]
        row.update(task_scores(kind, pairs, texts))
        if reference is not None:
            for ids, ref in zip(answers[kind], reference[kind], strict=True):
                agree.append(quality.token_agreement(ids, ref))
                rouge.append(quality.rouge_l(_text(tokenizer, ids), _text(tokenizer, ref)))
    questions = [row[f"{k}_acc"] for k in QUESTION_KINDS if f"{k}_acc" in row]
    row["qa_acc"] = sum(questions) / len(questions) if questions else math.nan
    row["kept"] = sum(kept) / len(kept)
    row["agreement"] = sum(agree) / len(agree) if agree else 1.0
    row["rouge_l"] = sum(rouge) / len(rouge) if rouge else 1.0
    row["ppl"] = math.exp(nll / n_tokens)
    row["seconds"] = time.perf_counter() - start
    row["_answers"] = answers
    return row


def evaluate(
    model, tokenizer, methods: Sequence[str], budgets: Sequence[float], n_scenes: int = DEFAULT_SCENES,
    kinds: Sequence[str] = KINDS, batch_size: int = 50, method_kwargs: dict | None = None, log=print,
) -> list[dict]:
    """Rows for every (method, budget); a cell that fails records its error and the sweep goes on."""
    import prefixkv

    for method in methods:  # a name or a method spec; ValueError names an unknown one or a bad hyper-parameter
        prefixkv.build_method(method, **(method_kwargs or {}).get(method, {}))
    bad_kinds = [k for k in kinds if k not in KINDS]
    if bad_kinds:
        raise ValueError(f"unknown instruction kinds {bad_kinds}; expected some of {KINDS}")
    for b in budgets:
        prefixkv.check_budget(b)
    method_kwargs = method_kwargs or {}
    sets = {kind: eval_pairs(kind, n_scenes) for kind in kinds}
    full = evaluate_cell(model, tokenizer, "full", 1.0, sets, None, batch_size)
    reference = full.pop("_answers")
    rows = []
    for method in methods:
        for budget in budgets:
            try:
                row = evaluate_cell(
                    model, tokenizer, method, budget, sets, reference, batch_size, **method_kwargs.get(method, {})
                )
                row.pop("_answers")
            except Exception as err:  # one failing cell must not end the sweep
                row = {"method": method, "budget": budget, "error": f"{type(err).__name__}: {err}"}
            rows.append(row)
            log(format_row(row))
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if not math.isnan(value) else "nan"
    return "" if value is None else str(value)


def format_row(row: dict) -> str:
    return "  ".join(f"{c}={_fmt(row[c])}" for c in COLUMNS if c in row)


def markdown(rows: Sequence[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    if path.suffix == ".md":
        path.write_text(markdown(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"--out must end in .csv or .md, got {path}")


def _parse_budgets(text: str) -> list[float]:
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers, got {text!r}") from None


def _parse_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="all",
                        help="comma-separated method specs (`prefixkv[visibility_norm=False]`), or 'all'")
    parser.add_argument("--budgets", type=_parse_budgets, default=[0.1, 0.2, 0.3, 0.5, 1.0])
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES, help="held-out scenes per instruction kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--profile", default=None, help="calibration profile (JSON) for the prefixkv method")
    parser.add_argument(
        "--method-kwargs", default=None, type=_parse_kwargs,
        help='hyper-parameters for every listed method, as JSON (e.g. \'{"recent": 8}\'); rows are labelled with them',
    )
    parser.add_argument("--checkpoint", default=None, help="model directory (default: the shipped checkpoint)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the table to FILE.csv or FILE.md")
    parser.add_argument(
        "--plain", action="store_true", help="only the full-cache task scores, with plain `model.generate`"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plain:
        model, tokenizer = load() if args.checkpoint is None else load(path=args.checkpoint)
        print(json.dumps(full_cache_scores(model, tokenizer, args.scenes, args.batch_size), indent=1))
        return
    import prefixkv

    methods = list(prefixkv.METHODS) if args.methods == "all" else prefixkv.split_method_specs(args.methods)
    if args.out and Path(args.out).suffix not in (".csv", ".md"):
        parser.error(f"--out must end in .csv or .md, got {args.out}")
    model, tokenizer = load() if args.checkpoint is None else load(path=args.checkpoint)
    kwargs = {m: dict(args.method_kwargs or {}) for m in methods}
    if args.profile:  # for every PrefixKV spec listed
        for method in methods:
            if prefixkv.parse_method_spec(method)[0] == "prefixkv":
                kwargs[method]["profile"] = args.profile
    try:
        rows = evaluate(
            model, tokenizer, methods, args.budgets, args.scenes, kinds=args.kinds.split(","),
            batch_size=args.batch_size, method_kwargs=kwargs,
        )
    except ValueError as err:  # a bad method spec, kind or budget: one line
        parser.error(str(err))
    for row in rows:
        extra = kwargs.get(row["method"])
        if extra:
            row["method"] += " (" + ", ".join(f"{k}={Path(str(v)).name if k == 'profile' else v}"
                                              for k, v in sorted(extra.items())) + ")"
    print()
    print(markdown(rows))
    if args.out:
        write(rows, args.out)


if __name__ == "__main__":
    main()
