"""Synthetic result stores for the report tests: rows shaped as `bench run` writes them (keys from real `Cell`s),
with speeds drawn from a seeded model of each method, so that the report can be checked without a sweep or a GPU.

- `cpu_store`: the embedded model (trained) and tiny-llama (random weights) on a CPU, noisy as a shared 2-core
  machine is, no energy, no byte floor, one failed cell; compressed cells paired with a full-cache call.
- `gpu_store`: llava-1.5-7b (random weights) at two batch sizes and the embedded model on an "NVIDIA H100 80GB
  HBM3", tight repetitions, energy, `decode_floor_ratio` and `copy_bandwidth_gbps` filled, decode policies; a store
  from before pairing (ratios against the same run's full cell), with the optional memory columns on llava.
- `steps_store`: one full cell and one compressed cell with chosen per-step times (outliers, pairing, runs).
- `engine_store`: the embedded model with the quality engine's columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import store
from bench.matrix import Cell
from bench.runner import cell_columns

H100 = "NVIDIA H100 80GB HBM3"
CPU_ENV = {
    "env_gpu": None, "env_gpu_count": 0, "env_driver": None, "env_cuda": None, "env_torch": "2.13.0+cpu",
    "env_triton": "3.6.0", "env_transformers": "5.24.0", "env_python": "3.11.2", "env_cpu": "AMD EPYC 7B13",
    "env_cpu_count": 2, "env_host": "cpu-box", "env_git_commit": "abc123", "env_date": "2026-01-01T00:00:00+00:00",
    "env_machine": "CPU AMD EPYC 7B13", "env_machine_id": "cpu0aaaa", "run_id": "2026-01-01-cpu",
}
GPU_ENV = {
    **CPU_ENV, "env_gpu": H100, "env_gpu_count": 1, "env_driver": "570.1", "env_cuda": "12.8",
    "env_torch": "2.11.0", "env_cpu": "Intel Xeon", "env_cpu_count": 16, "env_host": "gpu-box",
    "env_machine": H100, "env_machine_id": "gpu0bbbb", "run_id": "2026-01-02-gpu",
}
#: Speed-up of each method at budget 0.2 over the full cache (the GPU model; CPU cells are about as fast as full).
GAIN = {"full": 1.0, "streaming_llm": 1.6, "h2o": 1.3, "snapkv": 1.5, "pyramidkv": 1.5, "uniform": 1.55,
        "prefixkv": 1.55}
#: ROUGE-L against the full cache at budget 0.2, for trained models.
ROUGE = {"full": 1.0, "streaming_llm": 0.42, "h2o": 0.68, "snapkv": 0.68, "pyramidkv": 0.67, "uniform": 0.37,
         "prefixkv": 0.37}
LAYERS = {"embedded": 4, "tiny-llama": 8, "llava-1.5-7b": 32}
IMAGE = {"embedded": 16, "tiny-llama": 0, "llava-1.5-7b": 576}


def rows_for(cell: Cell, env: dict, *, base_tps: float, noise: float, rng: np.random.Generator, gpu: bool,
             matrix: str, status: str = "ok", paired: bool = False, memory_detail: bool = False) -> list[dict]:
    """The rows `bench run` would write for `cell` (one per repetition, or one failure row). `paired`: a compressed
    cell's rows carry its paired full-cache call (today's cells); without, they are a store from before pairing.
    `memory_detail`: the optional memory columns (KV bytes allocated, per-head bytes and kept counts)."""
    base = {**cell_columns(cell), "matrix": matrix, **env}
    if status != "ok":
        return [{**base, "rep": None, "status": status, "error": "CUDA out of memory (synthetic)"}]
    prompt = 25 if cell.model == "embedded" else IMAGE[cell.model] + cell.text_tokens
    layers = LAYERS[cell.model]
    full = cell.method == "full"
    budget = 1.0 if full else cell.budget
    # More compression, more speed on GPU; on CPU no systematic gain (what the 2-core runs show).
    gain = (1 + (GAIN[cell.method] - 1) * (0.2 / budget) ** 0.5) if gpu else 1.0
    kept = [max(1, round(prompt * budget * (1.3 - 0.6 * i / max(1, layers - 1)))) for i in range(layers)] \
        if cell.method == "prefixkv" else [max(1, round(prompt * budget))] * layers
    trained = cell.model == "embedded"
    rouge = 1.0 if full else min(1.0, ROUGE[cell.method] + (budget - 0.2) * 0.6)
    kv = [k * cell.batch_size * 2 * 64 * 4 for k in kept]
    peak = (13.5 * 2**30 + sum(kv) * 20) if gpu else 520 * 2**20
    rows = []
    for rep in range(cell.repetitions):
        load = float(np.exp(rng.normal(0, noise)))  # this repetition's moment: both calls of a pair share it
        tps = base_tps * gain / load
        steps = list(cell.batch_size / tps * np.exp(rng.normal(0, noise / 3, cell.new_tokens - 1)))
        decode_s = float(sum(steps))
        extra = {}
        if paired and not full:
            full_steps = list(cell.batch_size / (base_tps / load) * np.exp(rng.normal(0, noise / 3, len(steps))))
            extra.update(paired_full_first=rep % 2 == 0, paired_full_decode_steps_s=full_steps,
                         paired_full_total_s=0.004 * cell.batch_size + float(sum(full_steps)),
                         paired_full_prefill_s=0.004 * cell.batch_size)
        if memory_detail:
            heads = 4
            extra.update(kv_capacity_bytes_total=int(sum(kv) + len(kept) * cell.new_tokens * cell.batch_size * 512),
                         kv_bytes_per_head=[[b // heads] * heads for b in kv],
                         kept_per_head=[[k] * heads for k in kept])
        prefill = 0.004 * cell.batch_size * (1.1 if not full else 1.0)
        total = prefill + decode_s
        energy = 0.4 * cell.batch_size * cell.new_tokens / gain * float(np.exp(rng.normal(0, 0.02))) if gpu else None
        rows.append({
            **base, "rep": rep, "status": "ok", "error": None, "total_s": total, "prefill_s": prefill,
            "score_s": 0.0 if full else 0.001, "allocate_s": 0.0, "compact_s": 0.0 if full else 0.0005,
            "ttft_s": prefill, "decode_s": decode_s, "decode_steps_s": steps,
            "decode_step_median_s": float(np.median(steps)),
            "decode_tokens_per_s": cell.batch_size / float(np.median(steps)),
            "tokens_per_s": cell.batch_size * cell.new_tokens / total,
            "energy_j": energy, "j_per_token": None if energy is None else energy / (cell.batch_size * cell.new_tokens),
            "energy_source": "nvml total energy" if gpu else None,
            "prompt_length": prompt, "image_tokens": IMAGE[cell.model], "model_layers": layers,
            "device_name": H100 if gpu else None, "peak_memory_bytes": int(peak),
            "peak_memory_source": "torch.cuda.max_memory_allocated" if gpu else "process peak RSS",
            "kv_bytes_per_layer": kv, "kv_bytes_total": int(sum(kv)), "kept_per_layer": kept,
            "decode": cell.decode, "held_per_layer": [k + cell.new_tokens for k in kept], "evictions": 0,
            "kept_fraction": budget,
            "token_agreement": 1.0 if full else (rouge * 0.3 if trained else 0.003),
            "rouge_l": rouge if trained else (1.0 if full else 0.02),
            "perplexity": 1.0 if full else (1 + 20 * (1 - rouge) if trained else 12000.0),
            "telemetry_status": "ok" if gpu else "unavailable: CPU cell (no GPU telemetry)",
            "decode_floor_ratio": (1.4 + 0.3 * (1 - budget)) * float(np.exp(rng.normal(0, 0.01))) if gpu else None,
            "copy_bandwidth_gbps": 2900.0 if gpu else None,
            "load_avg_1min_before": 1.0 + load, "load_avg_1min_after": 1.1 + load,
            "cpu_steal_fraction": 0.0 if gpu else 0.02,
            "decode_step_p10_s": float(np.percentile(steps, 10)),
            **extra,
        })
    return rows


def _cells(model, device, dtype, shapes, methods, budgets, policies=("grow",), reps=3):
    out = []
    for batch, text, new in shapes:
        for method in methods:
            for policy in ("grow",) if method == "full" else policies:
                for budget in (1.0,) if method == "full" else budgets:
                    kwargs = {} if policy == "grow" else {"decode": policy}
                    out.append(Cell(model=model, device=device, dtype=dtype, batch_size=batch, text_tokens=text,
                                    new_tokens=new, method=method, budget=budget, method_kwargs=kwargs,
                                    repetitions=reps, cpu_threads=1 if device == "cpu" else 0))
    return out


def write(results: Path, rows_by_cell: list[tuple[Cell, dict, list[dict]]]) -> Path:
    for cell, env, rows in rows_by_cell:
        store.write_part(store.part_path(results, cell.key, env["env_machine_id"]), rows)
    return results


#: The default matrix's budgets (bench/matrices/default.toml): the CPU store holds its batch-1 cells.
DEFAULT_BUDGETS = [0.2, 0.5, 0.8]


def cpu_store(results: Path, seed: int = 0) -> Path:
    """Today's cells on a noisy 2-core CPU: paired full-cache calls, the machine's load."""
    rng = np.random.default_rng(seed)
    parts = []
    methods = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "uniform", "prefixkv"]
    for cell in _cells("embedded", "cpu", "float32", [(1, 112, 48)], methods, DEFAULT_BUDGETS):
        parts.append((cell, CPU_ENV, rows_for(cell, CPU_ENV, base_tps=450, noise=0.25, rng=rng, gpu=False,
                                              matrix="default", paired=True)))
    for cell in _cells("tiny-llama", "cpu", "float32", [(1, 32, 16)], ["full", "h2o", "prefixkv"], [0.25]):
        status = "oom" if cell.method == "h2o" else "ok"
        parts.append((cell, CPU_ENV, rows_for(cell, CPU_ENV, base_tps=300, noise=0.25, rng=rng, gpu=False,
                                              matrix="tiny", status=status, paired=True)))
    return write(results, parts)


def gpu_store(results: Path, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    parts = []
    methods = ["full", "h2o", "snapkv", "prefixkv"]
    for cell in _cells("llava-1.5-7b", "cuda", "float16", [(16, 448, 512), (48, 48, 256)], methods, [0.2, 0.4],
                       policies=("grow", "fixed_position")):
        status = "oom" if cell.method == "full" and cell.batch_size == 48 else "ok"
        parts.append((cell, GPU_ENV, rows_for(cell, GPU_ENV, base_tps=480, noise=0.02, rng=rng, gpu=True,
                                              matrix="paper", status=status, memory_detail=True)))
    # The CPU store's embedded workload, also run on the GPU: the cells the cross-machine section lines up.
    methods = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "uniform", "prefixkv"]
    for cell in _cells("embedded", "cuda", "float32", [(1, 112, 48)], methods, DEFAULT_BUDGETS):
        parts.append((cell, GPU_ENV, rows_for(cell, GPU_ENV, base_tps=900, noise=0.03, rng=rng, gpu=True,
                                              matrix="default-gpu")))
    return write(results, parts)



def _cell_rows(cell: Cell, env: dict, steps_per_rep: list[list[float]], *, run_id: str, extra=None) -> list[dict]:
    """Minimal rows of `cell` with the given decode steps per repetition (the figures the report derives from)."""
    base = {**cell_columns(cell), "matrix": "steps", **env, "run_id": run_id}
    rows = []
    for rep, steps in enumerate(steps_per_rep):
        total = 0.002 + float(sum(steps))
        rows.append({**base, "rep": rep, "status": "ok", "error": None, "total_s": total, "prefill_s": 0.002,
                     "ttft_s": 0.002, "score_s": 0.0, "compact_s": 0.0, "decode_s": float(sum(steps)),
                     "decode_steps_s": list(steps), "tokens_per_s": cell.batch_size * cell.new_tokens / total,
                     "prompt_length": 25, "image_tokens": 16, "model_layers": 4, "peak_memory_bytes": 500 * 2**20,
                     "peak_memory_source": "process peak RSS", "kv_bytes_total": int(4096 * cell.budget),
                     "kept_per_layer": [int(25 * cell.budget)] * 4, "decode": "grow",
                     "rouge_l": 1.0 if cell.method == "full" else 0.9, "token_agreement": 1.0, "perplexity": 1.0,
                     "load_avg_1min_before": 1.5 if run_id == "run-a" else 6.5,
                     "load_avg_1min_after": 1.6 if run_id == "run-a" else 7.0,
                     **((extra or {}).get(rep, {}))})
    return rows


def steps_store(results: Path, *, full_steps: list[list[float]], method_steps: list[list[float]],
                paired_steps: list[list[float]] | None = None, same_run: bool = True) -> Path:
    """The embedded model at batch 1: a full cell and an h2o@0.5 cell whose decode steps are given per repetition.
    `paired_steps`: the h2o cell's paired full-cache calls; `same_run` False puts the two cells in different runs
    (a resumed store)."""
    cells = _cells("embedded", "cpu", "float32", [(1, 112, 48)], ["full", "h2o"], [0.5])
    full, h2o = cells
    extra = None
    if paired_steps is not None:
        extra = {rep: {"paired_full_decode_steps_s": steps, "paired_full_total_s": 0.002 + sum(steps),
                       "paired_full_first": rep % 2 == 0} for rep, steps in enumerate(paired_steps)}
    parts = [(full, CPU_ENV, _cell_rows(full, CPU_ENV, full_steps, run_id="run-a")),
             (h2o, CPU_ENV, _cell_rows(h2o, CPU_ENV, method_steps, run_id="run-a" if same_run else "run-b",
                                       extra=extra))]
    return write(results, parts)


#: Quality-engine figures of `engine_store`'s cells: (loss, lo, hi) per method@budget, in nats per token.
ENGINE_LOSS = {"h2o@0.5": (0.05, 0.02, 0.15), "snapkv@0.5": (0.04, 0.01, 0.08), "h2o@0.8": (0.01, 0.0, 0.03)}


def engine_store(results: Path, seed: int = 2) -> Path:
    """The embedded model at batch 1 with the quality engine's columns (`quality_loss` and its interval, unit,
    samples, source, per-task detail) on its compressed cells; snapkv is 10% faster than the full cache, h2o no
    different."""
    import json

    rng = np.random.default_rng(seed)
    parts = []
    for cell in _cells("embedded", "cpu", "float32", [(1, 112, 48)], ["full", "h2o", "snapkv"], [0.5, 0.8]):
        label = f"{cell.method}@{cell.budget:g}"
        speed = {"snapkv": 1.1}.get(cell.method, 1.0)
        steps = [list(0.002 / speed * np.exp(rng.normal(0, 0.01, 47))) for _ in range(3)]
        paired = [list(0.002 * np.exp(rng.normal(0, 0.01, 47))) for _ in range(3)]
        loss, lo, hi = ENGINE_LOSS.get(label, (0.3, 0.2, 0.4))
        engine = {} if cell.method == "full" else {
            "quality_loss": loss, "quality_loss_lo": lo, "quality_loss_hi": hi, "quality_loss_unit": "nats/token",
            "quality_samples": 64, "quality_source": "realtext engine (synthetic)",
            "quality_detail": json.dumps({task: {"full": 2.7, "value": 2.7 + loss, "loss": loss, "lo": lo, "hi": hi,
                                                  "n": 32, "unit": "nats/token"} for task in ("continuation", "qa")}),
        }
        if label == "h2o@0.8":  # the column the engine gives PrefixKV cells (its gain over uniform), on one cell here
            engine.update(allocation_gain=0.05, allocation_gain_lo=0.01, allocation_gain_hi=0.09,
                          allocation_gain_unit="nats/token")
        extra = None if cell.method == "full" else {
            rep: {"paired_full_decode_steps_s": paired[rep], "paired_full_total_s": 0.002 + sum(paired[rep]),
                  "paired_full_first": rep % 2 == 0} for rep in range(3)}
        rows = _cell_rows(cell, CPU_ENV, steps, run_id="run-a", extra=extra)
        parts.append((cell, CPU_ENV, [{**row, **engine} for row in rows]))
    return write(results, parts)
