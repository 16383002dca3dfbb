"""One cell, measured in its own process: `python -m bench.cell CELL_JSON RESULT_JSON` (the runner calls it).

`measure` runs these steps in order, so that nothing untimed leaks into the timed region and nothing timed is a first
call:
1. `prepare`: build the model and the prompt;
2. `quality_reference`: generate with the full cache once, untimed - the tokens quality is measured against, and
   the warm-up of the paired full-cache calls below;
3. `timed_repetitions`: warm up the method (`warmup` untimed calls), then `repetitions` timed calls of
   `prefixkv.generate`. In a compressed cell each repetition is paired with a timed full-cache call in the same
   process, in alternating order (full then method, method then full, ...): the reference the report divides by.
   The full cache's own cell ran minutes before or after, or in another run after a resume; the load between the
   two is not the method, and pairing costs one more full-cache call per repetition, which buys a ratio whose two
   sides saw the same moment (and the alternation makes a drift within the cell hit both sides alike). A
   `RegionTimer` passed to the library (CUDA events on GPU, never a sync inside the work) splits prefill / score /
   allocate / compact / each decode step; the telemetry sampler, the energy counter and the peak-memory reset
   bracket the method's own calls only; the machine's load is read before and after (`bench.machine_load`);
4. `step_counters`: the deterministic counters of one decode step (`bench.counters`): aten ops, host syncs and bytes
   allocated from the eager step, kernel launches (CUDA) from the step as configured, graph breaks and recompiles;
5. `byte_floor` (CUDA): the bytes a decode step must read (decoder weights + the KV cache held) over the copy
   bandwidth measured in the same process, and the measured step's ratio to it;
6. `quality`: token agreement, ROUGE-L, and the perplexity of the reference continuation under the compressed cache;
7. `result_rows`: one row per repetition.

The result is written as JSON; a failure writes `status` and `error` instead, and a crash leaves no file at all,
which the runner records as the cell's outcome. A full cache that runs out of memory beside a compressed cell leaves
that cell unpaired and without quality (its rows say why); the cell itself is still measured.

`measure` and `main` take a `Perturbation`: a context manager around every call of the cell's own method (never the
full-cache reference). `bench.injected_cell` injects known regressions with it for the gate's trials; tests inject
failures through their own entry module. Nothing here reads the environment.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import machine_load, quality
from bench.byte_floor import byte_floor, decode_weight_bytes
from bench.counters import StepCounters, compile_counters
from bench.matrix import Cell
from bench.models import build
from bench.telemetry import Telemetry
from bench.timing import RegionTimer, synchronize, timed

#: Wraps each call of the cell's own method: given the model, returns a context manager (`bench.injected_cell`).
Perturbation = Callable[[torch.nn.Module], AbstractContextManager]


@dataclass
class Prepared:
    """A cell ready to run: its model and prompt."""

    cell: Cell
    model: torch.nn.Module
    inputs: dict
    image_tokens: int
    perturbation: Perturbation | None = None

    @property
    def prompt_length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def generate(self, *, full: bool = False, timer=None, compile_step: bool | None = None,
                 new_tokens: int | None = None):
        """One `prefixkv.generate` call: the cell's own method (inside the perturbation), or the full cache."""
        cell = self.cell
        method, budget, kwargs = ("full", 1.0, {}) if full else (cell.method, cell.budget, dict(cell.method_kwargs))
        wrap = self.perturbation(self.model) if self.perturbation is not None and not full else nullcontext()
        import prefixkv

        with wrap:
            return prefixkv.generate(
                self.model, self.inputs, method=method, budget=budget, max_new_tokens=new_tokens or cell.new_tokens,
                timer=timer, compile=cell.compile if compile_step is None else compile_step, **kwargs,
            )


@dataclass
class Call:
    """One timed `generate` call: its output, its total seconds and its regions' samples."""

    output: object
    total_s: float
    regions: dict[str, list[float]]


@dataclass
class Repetition:
    """One repetition of the cell's method, with the full-cache call paired with it (None when unpaired)."""

    own: Call
    energy_j: float | None
    energy_source: str | None
    paired_full: Call | None = None
    full_first: bool | None = None


@dataclass
class Timed:
    """What `timed_repetitions` measured."""

    repetitions: list[Repetition]
    peak_bytes: int | None
    peak_source: str
    telemetry: dict
    load: dict
    compiled: dict
    unpaired_reason: str | None = None


def prepare(cell: Cell, perturbation: Perturbation | None = None) -> Prepared:
    if cell.device == "cpu" and cell.cpu_threads:
        torch.set_num_threads(cell.cpu_threads)
    torch.manual_seed(cell.seed)
    loaded = build(cell.model, cell.device, cell.dtype)
    inputs = loaded.make_inputs(cell.batch_size, cell.text_tokens, cell.seed)
    return Prepared(cell, loaded.model, inputs, loaded.image_tokens, perturbation)


def _out_of_memory(device: str, what: str, err: torch.OutOfMemoryError) -> str:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return f"{what} ran out of memory ({str(err).strip().splitlines()[0][:200]})"


def quality_reference(prepared: Prepared) -> tuple[object | None, str | None]:
    """(the full cache's output, None) for a compressed cell - eager, the tokens quality is compared with - or
    (None, why not): None for the full cell itself, or the full cache out of memory."""
    if prepared.cell.method == "full":
        return None, None
    try:
        return prepared.generate(full=True, compile_step=False), None
    except torch.OutOfMemoryError as err:
        return None, _out_of_memory(prepared.cell.device, "the full cache (quality reference)", err)


def _timed_call(prepared: Prepared, *, full: bool) -> Call:
    timer = RegionTimer(prepared.cell.device)
    out, total = timed(lambda: prepared.generate(full=full, timer=timer), prepared.cell.device)
    return Call(out, total, timer.seconds())


def _peak_memory(device: str) -> tuple[int | None, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process, model and interpreter included, since it started.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss * 1024 if sys.platform.startswith("linux") else rss), "process peak RSS"


def _own_repetition(prepared: Prepared, telemetry: Telemetry) -> tuple[Repetition, int | None]:
    """One timed call of the cell's method inside the telemetry window; with its peak memory on CUDA."""
    device = prepared.cell.device
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    telemetry.start()
    try:
        e0, t0 = telemetry.energy_mj(), time.perf_counter()
        call = _timed_call(prepared, full=False)
        e1, t1 = telemetry.energy_mj(), time.perf_counter()
    finally:
        telemetry.stop()
    energy, source = telemetry.window_energy_j(e0, e1, t0, t1)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    return Repetition(call, energy, source), peak


def timed_repetitions(prepared: Prepared, unpaired_reason: str | None = None) -> Timed:
    """Warm-up, then the timed repetitions, each paired with a full-cache call in a compressed cell (module
    docstring) unless `unpaired_reason` says why not."""
    cell = prepared.cell
    pair = cell.method != "full" and unpaired_reason is None
    if pair and cell.compile:
        # The full cache's compiled step, compiled outside the counted region: its graph is not the method's.
        try:
            prepared.generate(full=True)
        except torch.OutOfMemoryError as err:
            pair, unpaired_reason = False, _out_of_memory(cell.device, "the paired full cache", err)
    telemetry = Telemetry.for_device(cell.device)
    before = machine_load.snapshot(telemetry)
    repetitions, peaks = [], []
    with compile_counters() as compiled:
        for _ in range(cell.warmup):
            prepared.generate()
        for index in range(cell.repetitions):
            full_first = index % 2 == 0
            paired = None
            if pair and full_first:
                paired, pair, unpaired_reason = _paired_full(prepared, unpaired_reason)
            repetition, peak = _own_repetition(prepared, telemetry)
            if pair and not full_first:
                paired, pair, unpaired_reason = _paired_full(prepared, unpaired_reason)
            if paired is not None:
                repetition.paired_full, repetition.full_first = paired, full_first
            repetitions.append(repetition)
            peaks.append(peak)
    after = machine_load.snapshot(telemetry)
    if cell.device.startswith("cuda"):
        peak_bytes, peak_source = max(p for p in peaks if p is not None), "torch.cuda.max_memory_allocated"
    else:
        peak_bytes, peak_source = _peak_memory(cell.device)
    return Timed(repetitions, peak_bytes, peak_source, telemetry.summary(), machine_load.columns(before, after),
                 compiled, unpaired_reason)


def _paired_full(prepared: Prepared, reason: str | None) -> tuple[Call | None, bool, str | None]:
    """(the paired full-cache call, still pairing, why not): a full cache out of memory ends the pairing."""
    try:
        return _timed_call(prepared, full=True), True, reason
    except torch.OutOfMemoryError as err:
        return None, False, _out_of_memory(prepared.cell.device, "the paired full cache", err)


def step_counters(prepared: Prepared) -> dict:
    """The deterministic per-decode-step counters (module docstring), from a short extra generation."""
    cell = prepared.cell
    new_tokens = min(cell.new_tokens, 5)
    if new_tokens < 2:
        return {}
    eager = StepCounters()
    prepared.generate(timer=eager, compile_step=False, new_tokens=new_tokens)
    counted = eager.per_step()
    launches = None
    if cell.device.startswith("cuda"):
        launched = StepCounters(count_ops=False, profile_launches=True)
        prepared.generate(timer=launched, new_tokens=new_tokens)
        launches = launched.per_step()["kernel_launches"]
    return {
        "decode_aten_ops_per_step": counted["aten_ops"],
        "decode_host_syncs_per_step": counted["host_syncs"],
        "decode_alloc_bytes_per_step": counted["alloc_bytes"],
        "decode_kernel_launches_per_step": launches,
    }


def _new_tokens(prepared: Prepared, output) -> list[list[int]]:
    return [s[prepared.prompt_length:].tolist() for s in output.sequences]


def quality_figures(prepared: Prepared, output, reference) -> dict:
    """Agreement, ROUGE-L and perplexity of the cell's output against the full cache's (`reference`; the full cell
    is its own reference); None where there is no reference (the full cache ran out of memory)."""
    import prefixkv

    cell = prepared.cell
    new = _new_tokens(prepared, output)
    if cell.method != "full" and reference is None:
        return {"output_tokens": new, "token_agreement": None, "rouge_l": None, "perplexity": None}
    ref = new if reference is None else _new_tokens(prepared, reference)
    continuation = torch.tensor(ref, device=prepared.inputs["input_ids"].device)
    logprobs = prefixkv.continuation_logprobs(prepared.model, prepared.inputs, continuation, method=cell.method,
                                              budget=cell.budget, **dict(cell.method_kwargs))
    return {
        "output_tokens": new,
        # Per sequence, then averaged over the batch; ROUGE-L reads token ids as words.
        "token_agreement": statistics.fmean(quality.token_agreement(o, r) for o, r in zip(new, ref, strict=True)),
        "rouge_l": statistics.fmean(
            quality.rouge_l(" ".join(map(str, o)), " ".join(map(str, r))) for o, r in zip(new, ref, strict=True)
        ),
        "perplexity": quality.perplexity(logprobs),
    }


def _steps(call: Call) -> list[float]:
    return [float(s) for s in call.regions.get("decode_step", [])]


def result_rows(prepared: Prepared, timed_: Timed, shared: dict) -> list[dict]:
    """One row per repetition: its regions, its decode steps and their statistics, the paired full-cache call, and
    the cell's `shared` figures."""
    cell = prepared.cell
    generated = cell.batch_size * cell.new_tokens
    floor_s = shared.get("decode_floor_s")
    rows = []
    for index, repetition in enumerate(timed_.repetitions):
        own, paired = repetition.own, repetition.paired_full
        steps = _steps(own)
        step_median = float(np.median(steps)) if steps else None
        prefill = float(sum(own.regions.get("prefill", [0.0])))
        rows.append({
            "rep": index,
            "status": "ok",
            "error": None,
            # The whole call, prefill and every step included: a total, which one slow moment moves.
            "total_s": own.total_s,
            "prefill_s": prefill,
            "score_s": float(sum(own.regions.get("score", []))),
            "allocate_s": float(sum(own.regions.get("allocate", []))),
            "compact_s": float(sum(own.regions.get("compact", []))),
            # The first token is the prefill's argmax; it exists once prefill returns.
            "ttft_s": prefill,
            "decode_s": float(sum(steps)),
            "decode_steps_s": steps,
            "decode_step_median_s": step_median,
            "decode_step_p10_s": float(np.percentile(steps, 10)) if steps else None,
            "decode_floor_ratio": step_median / floor_s if floor_s and step_median else None,
            # From the median step (batch / step time), not from the total: a slow moment moves a total, not a median.
            "decode_tokens_per_s": cell.batch_size / step_median if step_median else None,
            "tokens_per_s": generated / own.total_s,
            "energy_j": repetition.energy_j,
            "energy_source": repetition.energy_source,
            "j_per_token": None if repetition.energy_j is None else repetition.energy_j / generated,
            "paired_full_first": repetition.full_first,
            "paired_full_total_s": None if paired is None else paired.total_s,
            "paired_full_prefill_s": None if paired is None else float(sum(paired.regions.get("prefill", [0.0]))),
            "paired_full_decode_steps_s": None if paired is None else _steps(paired),
            **shared,
        })
    return rows


def measure(cell: Cell, perturbation: Perturbation | None = None) -> list[dict]:
    """Measure `cell` (the module docstring's steps); one dict per repetition."""
    prepared = prepare(cell, perturbation)
    reference, unpaired_reason = quality_reference(prepared)
    timed_ = timed_repetitions(prepared, unpaired_reason)
    counters = step_counters(prepared)
    last = timed_.repetitions[-1].own.output
    stats = last.cache_stats
    shared = {
        "prompt_length": prepared.prompt_length,
        "image_tokens": prepared.image_tokens,
        "model_layers": len(stats.kept),
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(cell.device) if cell.device.startswith("cuda") else None,
        "peak_memory_bytes": timed_.peak_bytes,
        "peak_memory_source": timed_.peak_source,
        "kv_bytes_per_layer": [int(b) for b in stats.bytes],
        "kv_bytes_total": int(sum(stats.bytes)),
        # KV bytes allocated (decode slots included), and per [layer][kv_head] what each head holds and kept.
        "kv_capacity_bytes_per_layer": [int(b) for b in stats.capacity_bytes],
        "kv_capacity_bytes_total": int(sum(stats.capacity_bytes)),
        "kv_bytes_per_head": [[int(b) for b in layer] for layer in stats.bytes_per_head],
        "kv_capacity_bytes_per_head": [[int(b) for b in layer] for layer in stats.capacity_bytes_per_head],
        "kept_per_head": [[int(k) for k in layer] for layer in stats.kept_per_head],
        "kept_per_layer": [int(k) for k in stats.kept],
        "decode": stats.policy,
        "held_per_layer": [int(h) for h in stats.held],
        "evictions": int(sum(stats.evictions)),
        "kept_fraction": stats.kept_fraction,
        "paired_full_unavailable": timed_.unpaired_reason,
        **quality_figures(prepared, last, reference),
        **timed_.telemetry,
        **timed_.load,
        **counters,
        "compiled": cell.compile,
        "compile_graph_breaks": timed_.compiled["graph_breaks"] if cell.compile else None,
        # Warm-up and repetitions share one graph when nothing recompiles.
        "compile_recompiles": max(0, timed_.compiled["graphs"] - 1) if cell.compile else None,
        "decode_weight_bytes": decode_weight_bytes(prepared.model),
    }
    if cell.device.startswith("cuda"):
        shared.update(byte_floor(prepared.cell.device, prepared.model, stats))
    return result_rows(prepared, timed_, shared)


def main(argv: list[str] | None = None, perturbation: Perturbation | None = None) -> int:
    cell_file, result_file = argv if argv is not None else sys.argv[1:]
    cell = Cell.from_json(Path(cell_file).read_text())
    try:
        result = {"status": "ok", "rows": measure(cell, perturbation)}
    except torch.OutOfMemoryError as err:
        result = {"status": "oom", "error": str(err).strip().splitlines()[0]}
    except Exception as err:  # noqa: BLE001 - any failure is this cell's outcome; the sweep goes on
        tb = traceback.format_exc(limit=-3)
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": tb}
    Path(result_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
