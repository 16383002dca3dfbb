"""From per-prompt records (`bench.evaluation.run`) to the figures a decision rests on: per variant x budget and
task, the paired loss against the full cache on the same prompts with its 95% bootstrap interval
(`bench.paired`), the headline loss that the matrix's rows carry, and one variant's gain over another.

Losses are oriented so that higher is worse:
- exact-match tasks: the full cache's exact-match minus the variant's, in points (100 = every prompt lost);
- `continuation`: the variant's per-token loss of the true continuation minus the full cache's (nats/token);
- `agreement`, `describe`, `question`: 100 x (1 - top-1 agreement with the full cache's greedy output), in points,
  and, as "<task> nll", the excess per-token loss of that output under the compressed cache (nats/token).
The headline (`quality_loss`) pools the exact-match tasks' prompts when there are any, else the "nll" of the
agreement tasks (EffiVLM-Bench's loyalty), else the continuation's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bench.evaluation.run import pair_key
from bench.paired import Interval, mean_interval

POINTS, NATS = "exact-match points", "nats/token"
AGREEMENT_POINTS = "agreement points"


@dataclass(frozen=True)
class Figure:
    """One task's figure for a variant at a budget: the means over `loss.n` paired prompts of the full cache's
    value and the variant's, and the paired loss with its interval."""

    full: float
    value: float
    loss: Interval
    unit: str

    def as_dict(self) -> dict:
        return {"full": self.full, "value": self.value, "loss": self.loss.mean, "lo": self.loss.lo,
                "hi": self.loss.hi, "n": self.loss.n, "unit": self.unit}


def _measures(measure: str, task: str) -> list[tuple[str, str, str, float, bool]]:
    """(figure name, score key, unit, scale, higher is better) of each figure a task gives."""
    if measure == "exact":
        return [(task, "exact", POINTS, 100.0, True)]
    if measure == "loyalty":
        return [(task, "agreement", AGREEMENT_POINTS, 100.0, True), (f"{task} nll", "nll", NATS, 1.0, False)]
    return [(task, "nll", NATS, 1.0, False)]


def _paired(records: Sequence[Mapping], key: str, score: str, scale: float,
            higher_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """(full, variant) values of the prompts that have both, in record order."""
    full_key = pair_key("full", 1.0)
    rows = [(r["pairs"][full_key][score], r["pairs"][key][score]) for r in records
            if full_key in r["pairs"] and key in r["pairs"]]
    values = np.asarray(rows, dtype=float).reshape(-1, 2) * scale
    return values[:, 0], values[:, 1]


def _loss(full: np.ndarray, value: np.ndarray, higher_is_better: bool) -> np.ndarray:
    return full - value if higher_is_better else value - full


def figures(records: Mapping[str, Mapping], label: str, budget: float) -> dict[str, Figure]:
    """{figure name: Figure} of `label` at `budget`, one or two per task, in task order."""
    by_task: dict[str, list[Mapping]] = {}
    for record in records.values():
        by_task.setdefault(record["task"], []).append(record)
    key = pair_key(label, budget)
    out: dict[str, Figure] = {}
    for task, rows in by_task.items():
        for name, score, unit, scale, higher in _measures(rows[0]["measure"], task):
            full, value = _paired(rows, key, score, scale, higher)
            if len(full):
                out[name] = Figure(float(full.mean()), float(value.mean()),
                                   mean_interval(_loss(full, value, higher)), unit)
    return out


@dataclass(frozen=True)
class Headline:
    """A variant's pooled loss (`loss`, in `unit`) over the prompts of one measure (`measure`), and the full
    cache's mean value on them (`full`: exact-match % or nats/token)."""

    loss: Interval
    unit: str
    measure: str
    full: float


def headline(records: Mapping[str, Mapping], label: str, budget: float) -> Headline | None:
    """`label`'s headline at `budget`: the exact-match tasks pooled if any ran, else the agreement tasks' loss,
    else the continuation's; None when no prompt has it."""
    key = pair_key(label, budget)
    rows = list(records.values())
    for measure, score, unit, scale, higher in (("exact", "exact", POINTS, 100.0, True),
                                                ("loyalty", "nll", NATS, 1.0, False),
                                                ("nll", "nll", NATS, 1.0, False)):
        chosen = [r for r in rows if r["measure"] == measure]
        full, value = _paired(chosen, key, score, scale, higher)
        if len(full):
            return Headline(mean_interval(_loss(full, value, higher)), unit, measure, float(full.mean()))
    return None


def gain(records: Mapping[str, Mapping], label: str, over: str, budget: float, *,
         loss: bool = False) -> dict[str, Interval]:
    """How much better `label` does than `over` at `budget` on the same prompts ({"pooled": ..., task: ...}):
    the paired difference of their scores, positive when `label` is better - the headline's measure pooled, and
    each task's first figure; with `loss`, every task's per-token loss (nats/token: an exact-match task's answer,
    a continuation, the full cache's output), pooled over every prompt."""
    a_key, b_key = pair_key(label, budget), pair_key(over, budget)
    out: dict[str, list[float]] = {}
    pooled: dict[str, list[float]] = {}
    for record in records.values():
        pairs = record["pairs"]
        if a_key not in pairs or b_key not in pairs:
            continue
        name, score, _unit, scale, higher = _measures(record["measure"], record["task"])[0]
        if loss:
            name, score, scale, higher = record["task"], "nll", 1.0, False
        diff = (pairs[a_key][score] - pairs[b_key][score]) * scale
        diff = diff if higher else -diff
        out.setdefault(name, []).append(diff)
        pooled.setdefault("all" if loss else record["measure"], []).append(diff)
    result = {task: mean_interval(values) for task, values in out.items()}
    for measure in ("all", "exact", "loyalty", "nll"):
        if measure in pooled:
            return {"pooled": mean_interval(pooled[measure]), **result}
    return result


def row_columns(records: Mapping[str, Mapping], label: str, budget: float, source: str) -> dict:
    """The quality columns of a matrix row for `label` at `budget` (the contract with the report):
    `quality_loss` (mean paired loss vs the full cache; higher is worse) in `quality_loss_unit`, its 95% interval
    `quality_loss_lo` / `quality_loss_hi`, `quality_samples` (prompts), `quality_source`, and `quality_detail`
    (JSON: {task: {"full", "value", "loss", "lo", "hi", "n", "unit"}})."""
    head = headline(records, label, budget)
    if head is None:
        return {}
    loss, unit = head.loss, head.unit
    detail = {name: fig.as_dict() for name, fig in figures(records, label, budget).items()}
    return {
        "quality_loss": loss.mean,
        "quality_loss_lo": loss.lo,
        "quality_loss_hi": loss.hi,
        "quality_loss_unit": unit,
        "quality_samples": loss.n,
        "quality_source": source,
        "quality_detail": json.dumps(detail, sort_keys=True),
    }


def _cell(interval: Interval, digits: int) -> str:
    mark = "" if interval.excludes_zero else " ~"
    return f"{interval.mean:+.{digits}f} [{interval.lo:+.{digits}f}, {interval.hi:+.{digits}f}]{mark}"


def _digits(unit: str) -> int:
    return 3 if unit == NATS else 1


def headline_table(records: Mapping[str, Mapping], labels: Sequence[str], budgets: Sequence[float]) -> str:
    """Markdown: one row per variant, one column per budget, the headline loss and its interval ("~": the interval
    contains 0, no measurable loss); first, the full cache's own value on the same prompts."""
    head = ["method", *(f"@ {b:g}" for b in budgets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    reference = None
    for label in labels:
        cells = []
        for budget in budgets:
            found = headline(records, label, budget)
            reference = reference or found
            cells.append("-" if found is None else _cell(found.loss, _digits(found.unit)))
        rows.append(f"| `{label}` | " + " | ".join(cells) + " |")
    if reference is not None:
        value = f"{reference.full:.1f}% exact" if reference.unit == POINTS else f"{reference.full:.3f} nats/token"
        lines.append(f"| full cache ({value}, n={reference.loss.n}) | " + " | ".join("0" for _ in budgets) + " |")
    return "\n".join(lines + rows)


def task_table(records: Mapping[str, Mapping], labels: Sequence[str], budget: float) -> str:
    """Markdown at one budget: one row per variant, one column per figure (task): the paired loss and interval."""
    names: list[str] = []
    found = {label: figures(records, label, budget) for label in labels}
    for figs in found.values():
        names += [n for n in figs if n not in names]
    full_row = next((figs for figs in found.values() if figs), {})
    head = ["method", *(f"{n} ({full_row[n].unit if n in full_row else ''})" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| full cache (value) | " + " | ".join(
        f"{full_row[n].full:.3f}" if full_row[n].unit == NATS else f"{full_row[n].full:.1f}" for n in names) + " |")
    for label, figs in found.items():
        cells = [_cell(figs[n].loss, _digits(figs[n].unit)) if n in figs else "-" for n in names]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_table(records: Mapping[str, Mapping], label: str, over: str, budgets: Sequence[float], *,
               loss: bool = False) -> str:
    """Markdown: `label`'s paired gain over `over` per budget, pooled and per task (positive: `label` better);
    `loss` as in `gain`."""
    gains = {b: gain(records, label, over, b, loss=loss) for b in budgets}
    names: list[str] = []
    for g in gains.values():
        names += [n for n in g if n not in names]
    lines = ["| budget | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for budget, g in gains.items():
        digits = [3 if loss or n == "continuation" or n.endswith(" nll") else 1 for n in names]
        lines.append(f"| {budget:g} | " + " | ".join(_cell(g[n], d) if n in g else "-"
                                                     for n, d in zip(names, digits, strict=True)) + " |")
    return "\n".join(lines)
