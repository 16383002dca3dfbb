"""The quality engine inside `bench run`: a matrix with a `[quality]` table gets its cells' quality columns from it.

Per (model, device, dtype) of the matrix - for models with real weights: a fetched model, `hf:<id or path>`, a
checkpoint directory - one evaluation runs every method x budget of the matrix over the table's prompts (one
prefill per prompt; `bench.evaluation.run`), its records in `DIR/quality/<settings digest>.jsonl` (resumable, like
the sweep). Each cell then carries, in every row of its part, the columns of `bench.evaluation.summary.row_columns`:
`quality_loss`, `quality_loss_lo`, `quality_loss_hi`, `quality_loss_unit`, `quality_samples`, `quality_source`,
`quality_detail`; a `prefixkv` cell whose uniform ablation with the same scores is in the matrix also carries
`allocation_gain`, `allocation_gain_lo`, `allocation_gain_hi`, `allocation_gain_unit` (the adaptive allocation's
paired gain; positive: better). With `timing = false` the cells are not timed: their part is one row of
configuration and quality (`quality_only` true); otherwise the quality columns are added to the parts the sweep
wrote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench import store
from bench.evaluation import run, summary
from bench.evaluation.spec import QualitySpec
from bench.evaluation.variants import Variant
from bench.matrix import Cell
from bench.models import ModelError, load_pretrained, pretrained_path
from bench.realtext.fetch import SOURCES


def has_real_weights(model: str) -> bool:
    """True for the models the engine evaluates: fetched real models, `hf:` checkpoints, checkpoint directories."""
    if model in SOURCES:
        return True
    try:
        return pretrained_path(model) is not None
    except ModelError:
        return False


def variant_of(cell: Cell) -> Variant:
    """The cell's method as the engine names it: `prefixkv`, `prefixkv[decode='fixed_position',recent=8]`."""
    kwargs = dict(sorted(cell.method_kwargs.items()))
    label = cell.method + ("[" + ",".join(f"{k}={v!r}" for k, v in kwargs.items()) + "]" if kwargs else "")
    return Variant(label, cell.method, kwargs)


def uniform_of(cell: Cell) -> Variant | None:
    """PrefixKV's uniform ablation with the same scores (the cell's hyper-parameters but PrefixKV's own allocation
    fields), for a `prefixkv` cell; None otherwise."""
    if cell.method != "prefixkv":
        return None
    from prefixkv.methods.prefixkv import PrefixKV
    from prefixkv.methods.uniform import Uniform

    own = set(PrefixKV.__dataclass_fields__) - set(Uniform.__dataclass_fields__)
    kwargs = {k: v for k, v in cell.method_kwargs.items() if k not in own}
    return variant_of(Cell(**{**cell.__dict__, "method": "uniform", "method_kwargs": kwargs}))


def _gain_columns(records, label: str, ablation: str, budget: float) -> dict:
    """`allocation_gain` (PrefixKV's pooled paired gain over its uniform ablation at the same budget; positive:
    the adaptive allocation is better), its 95% interval and unit."""
    gains = summary.gain(records, label, ablation, budget)
    head = summary.headline(records, label, budget)
    if "pooled" not in gains or head is None:
        return {}
    pooled = gains["pooled"]
    return {"allocation_gain": pooled.mean, "allocation_gain_lo": pooled.lo, "allocation_gain_hi": pooled.hi,
            "allocation_gain_unit": head.unit}


def _settings(spec: QualitySpec, cell: Cell) -> dict:
    device = "cuda" if cell.device.startswith("cuda") else cell.device
    return {**spec.settings(cell.model), "device": device, "dtype": cell.dtype}


def records_path(results: str | Path, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(results) / "quality" / f"{digest}.jsonl"


def evaluate_cells(
    cells: Sequence[Cell], spec: QualitySpec, results: str | Path, *, threads: int = 0,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, dict]:
    """Run the engine for `cells` (grouped by model, device and dtype); {cell key: quality columns}. Cells of
    models without real weights get none (said once per model through `progress`)."""
    from bench.evaluation.photos import image_prompts
    from bench.evaluation.prompts import text_prompts

    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.device, cell.dtype), []).append(cell)
    columns: dict[str, dict] = {}
    for (model_spec, device, dtype), group in groups.items():
        if not has_real_weights(model_spec):
            progress(f"quality: {model_spec} has no real weights to evaluate (random weights or its own scenes): "
                     "its cells keep the sweep's quality figures")
            continue
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        model, tokenizer, processor = load_pretrained(model_spec, device, dtype)
        if processor is None:
            tasks = spec.tasks_for(image_model=False)
            prompts = text_prompts(tokenizer, spec, tasks)
        else:
            tasks = spec.tasks_for(image_model=True)
            token = getattr(model.config, "image_token_index", getattr(model.config, "image_token_id", None))
            prompts = image_prompts(processor, token, spec, tasks)
        variants = list({variant_of(c).label: variant_of(c) for c in group if c.method != "full"}.values())
        budgets = sorted({c.budget for c in group if c.method != "full"})
        settings = _settings(spec, group[0])
        out = records_path(results, settings)
        progress(f"quality: {model_spec} on {device}: {len(prompts)} prompts x ({len(variants)} methods x "
                 f"{len(budgets)} budgets + the full cache) -> {out}")
        records = run.evaluate(model, prompts, variants, budgets or [1.0], protocol=spec.protocol,
                               new_tokens=spec.new_tokens, settings=settings, out=out, progress=progress)
        source = spec.describe(tasks)
        labels = {variant_of(c).label for c in group}
        for cell in group:
            label = "full" if cell.method == "full" else variant_of(cell).label
            columns[cell.key] = summary.row_columns(records, label, 1.0 if cell.method == "full" else cell.budget,
                                                    source)
            ablation = uniform_of(cell)
            if ablation is not None and ablation.label in labels:
                columns[cell.key].update(_gain_columns(records, label, ablation.label, cell.budget))
        del model
    return columns


def write_parts(results: str | Path, cells: Sequence[Cell], columns: dict[str, dict], *, timed: bool,
                matrix_name: str, run_id: str) -> int:
    """Put each cell's quality columns into its part for this machine: added to the rows the sweep wrote (`timed`),
    or as a quality-only part of one row. Returns the parts written. Holds the store's lock."""
    from bench.environment import fingerprint
    from bench.runner import cell_columns

    env = fingerprint()
    machine = env["env_machine_id"]
    written = 0
    with store.Lock(results, run_id):
        for cell in cells:
            quality = columns.get(cell.key)
            if not quality:
                continue
            path = store.part_path(results, cell.key, machine)
            if timed:
                if not path.is_file():
                    continue
                try:
                    rows = store.read_part(path).to_dict("records")
                except ValueError:  # unreadable: the next sweep quarantines and re-runs it
                    continue
                rows = [{**row, **quality} for row in rows]
            else:
                rows = [{**cell_columns(cell), "matrix": matrix_name, "run_id": run_id, **env, "executor": "local",
                         "attempts": 1, "rep": 0, "status": "ok", "error": None, "quality_only": True, **quality}]
            store.write_part(path, rows, owner=run_id)
            written += 1
    return written
