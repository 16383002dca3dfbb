"""Synthetic result stores for the report tests: rows shaped as `bench run` writes them (keys from real `Cell`s),
with speeds drawn from a seeded model of each method, so that the report can be checked without a sweep or a GPU.

- `cpu_store`: the embedded model (trained) and tiny-llama (random weights) on a CPU, noisy as a shared 2-core
  machine is, no energy, no byte floor, one failed cell.
- `gpu_store`: llava-1.5-7b (random weights) at two batch sizes and the embedded model on an "NVIDIA H100 80GB
  HBM3", tight repetitions, energy, `decode_floor_ratio` and `copy_bandwidth_gbps` filled, decode policies.
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
             matrix: str, status: str = "ok") -> list[dict]:
    """The rows `bench run` would write for `cell` (one per repetition, or one failure row)."""
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
        tps = base_tps * gain * float(np.exp(rng.normal(0, noise)))
        steps = list(cell.batch_size / tps * np.exp(rng.normal(0, noise / 3, cell.new_tokens - 1)))
        decode_s = float(sum(steps))
        prefill = 0.004 * cell.batch_size * (1.1 if not full else 1.0)
        total = prefill + decode_s
        energy = 0.4 * cell.batch_size * cell.new_tokens / gain * float(np.exp(rng.normal(0, 0.02))) if gpu else None
        rows.append({
            **base, "rep": rep, "status": "ok", "error": None, "total_s": total, "prefill_s": prefill,
            "score_s": 0.0 if full else 0.001, "allocate_s": 0.0, "compact_s": 0.0 if full else 0.0005,
            "ttft_s": prefill, "decode_s": decode_s, "decode_steps_s": steps,
            "decode_step_median_s": float(np.median(steps)),
            "decode_tokens_per_s": cell.batch_size * len(steps) / decode_s,
            "tokens_per_s": cell.batch_size * cell.new_tokens / total,
            "energy_j": energy, "j_per_token": None if energy is None else energy / (cell.batch_size * cell.new_tokens),
            "energy_source": "nvml total energy" if gpu else None,
            "prompt_length": prompt, "image_tokens": IMAGE[cell.model], "model_layers": layers,
            "device_name": H100 if gpu else None, "peak_memory_bytes": int(peak),
            "peak_memory_source": "torch.cuda.max_memory_allocated" if gpu else "process peak RSS",
            "kv_bytes_per_layer": kv, "kv_bytes_total": int(sum(kv)), "kept_per_layer": kept,
            "kv_capacity_bytes_total": int(sum(kv)) + layers * cell.batch_size * 4096,
            "decode": cell.decode, "held_per_layer": [k + cell.new_tokens for k in kept], "evictions": 0,
            "kept_fraction": budget,
            "token_agreement": 1.0 if full else (rouge * 0.3 if trained else 0.003),
            "rouge_l": rouge if trained else (1.0 if full else 0.02),
            "perplexity": 1.0 if full else (1 + 20 * (1 - rouge) if trained else 12000.0),
            "telemetry_status": "ok" if gpu else "unavailable: CPU cell (no GPU telemetry)",
            "decode_floor_ratio": (1.4 + 0.3 * (1 - budget)) * float(np.exp(rng.normal(0, 0.01))) if gpu else None,
            "copy_bandwidth_gbps": 2900.0 if gpu else None,
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


def cpu_store(results: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    parts = []
    methods = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "uniform", "prefixkv"]
    for cell in _cells("embedded", "cpu", "float32", [(1, 112, 48)], methods, [0.1, 0.3]):
        parts.append((cell, CPU_ENV, rows_for(cell, CPU_ENV, base_tps=450, noise=0.25, rng=rng, gpu=False,
                                              matrix="default")))
    for cell in _cells("tiny-llama", "cpu", "float32", [(1, 32, 16)], ["full", "h2o", "prefixkv"], [0.25]):
        status = "oom" if cell.method == "h2o" else "ok"
        parts.append((cell, CPU_ENV, rows_for(cell, CPU_ENV, base_tps=300, noise=0.25, rng=rng, gpu=False,
                                              matrix="tiny", status=status)))
    return write(results, parts)


def gpu_store(results: Path, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    parts = []
    methods = ["full", "h2o", "snapkv", "prefixkv"]
    for cell in _cells("llava-1.5-7b", "cuda", "float16", [(16, 448, 512), (48, 48, 256)], methods, [0.2, 0.4],
                       policies=("grow", "fixed_position")):
        status = "oom" if cell.method == "full" and cell.batch_size == 48 else "ok"
        parts.append((cell, GPU_ENV, rows_for(cell, GPU_ENV, base_tps=480, noise=0.02, rng=rng, gpu=True,
                                              matrix="paper", status=status)))
    # The CPU store's embedded workload, also run on the GPU: the cells the cross-machine section lines up.
    methods = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "uniform", "prefixkv"]
    for cell in _cells("embedded", "cuda", "float32", [(1, 112, 48)], methods, [0.1, 0.3]):
        parts.append((cell, GPU_ENV, rows_for(cell, GPU_ENV, base_tps=900, noise=0.03, rng=rng, gpu=True,
                                              matrix="default-gpu")))
    return write(results, parts)

