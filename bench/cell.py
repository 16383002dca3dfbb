"""One cell, measured in its own process: `python -m bench.cell CELL_JSON RESULT_JSON` (the runner calls it).

Order of work, so that nothing untimed leaks into the timed region and nothing timed is a first call:
1. build the model and the prompt; generate with the full cache once (the quality reference, untimed);
2. warm up the method (`warmup` untimed calls);
3. `repetitions` timed calls of `prefixkv.generate`, inside the telemetry sampler, reading the energy counter around
   each; a `RegionTimer` passed to the library (CUDA events on GPU, never a sync inside the work) splits prefill /
   score / allocate / compact / each decode step;
4. the deterministic counters of one decode step (`bench.counters`): aten ops, host syncs and bytes allocated from the
   eager step, kernel launches (CUDA) from the step as configured, graph breaks and recompiles of a compiled step;
5. on CUDA, the byte floor of a decode step - the bytes it must read (decoder weights + the KV cache held) over the
   copy bandwidth measured in the same process - and the measured step's ratio to it;
6. quality against the reference: token agreement, ROUGE-L, and the perplexity of the reference continuation under
   the compressed cache (teacher forcing).

The result (one row per repetition) is written as JSON; a failure writes `status` and `error` instead, and a crash
leaves no file at all, which the runner records as the cell's outcome.

Test-only hooks (environment variables; never set outside tests):
- BENCH_TEST_FAULT="MODE:METHOD[,MODE:METHOD...]": cells of METHOD fail before any work - MODE `raise` raises,
  `exit` calls os._exit(3) (a crash), `oom` raises torch.OutOfMemoryError, `hang` sleeps past any timeout.
- BENCH_TEST_SLOW_DECODE="METHOD:SECONDS": every decode step of METHOD sleeps SECONDS (an injected regression).
- BENCH_TEST_EXTRA_DECODE_WORK="METHOD": every decode step of METHOD runs one extra allocation and kernel (an
  injected regression that only the counters can see for sure).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import quality
from bench.counters import StepCounters, compile_counters
from bench.matrix import Cell
from bench.models import build
from bench.telemetry import Telemetry
from bench.timing import RegionTimer, median, synchronize, timed


def _fault(cell: Cell) -> None:
    for spec in filter(None, os.environ.get("BENCH_TEST_FAULT", "").split(",")):
        mode, _, method = spec.partition(":")
        if method != cell.method:
            continue
        if mode == "exit":
            os._exit(3)
        if mode == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected: BENCH_TEST_FAULT)")
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure (BENCH_TEST_FAULT={spec})")


def _slow_decode_hook(model: torch.nn.Module, cell: Cell):
    method, _, seconds = os.environ.get("BENCH_TEST_SLOW_DECODE", "").partition(":")
    if method != cell.method or not seconds:
        return None
    delay = float(seconds)

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 1:
            time.sleep(delay)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _extra_work_hook(model: torch.nn.Module, cell: Cell):
    if os.environ.get("BENCH_TEST_EXTRA_DECODE_WORK", "") != cell.method:
        return None

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 1:
            torch.ones(64, device=ids.device).add_(1)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _peak_memory(device: str) -> tuple[int | None, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process, model and interpreter included, since it started.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss * 1024 if sys.platform.startswith("linux") else rss), "process peak RSS"


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: the text decoder and the LM head - not a vision tower or projector (run
    once, in prefill), nor an untied input embedding (one row per token is read)."""
    text = model.config.get_text_config(decoder=True)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    skipped = ("vision", "multi_modal_projector") + (() if tied else ("embed_tokens",))
    return sum(p.nbytes for name, p in model.named_parameters() if not any(s in name for s in skipped))


def copy_bandwidth_gbps(device: str) -> float | None:
    """GB/s of a 1 GiB device-to-device copy on `device` (read + write counted), timed as the kernel microbenchmark
    times it (`bench.kernels.copy_bandwidth`: do_bench median); None if it could not run."""
    from bench.kernels import Timer, copy_bandwidth

    with torch.cuda.device(device):
        row = copy_bandwidth(Timer("cuda", quick=True), "cuda", 1 << 30, torch.float16)
    torch.cuda.empty_cache()
    return row["gbps"]


def _counters(run, cell: Cell, compile_step: bool) -> dict:
    """The deterministic per-decode-step counters (module docstring), from a short extra generation."""
    new_tokens = min(cell.new_tokens, 5)
    if new_tokens < 2:
        return {}
    eager = StepCounters()
    run(timer=eager, compile_step=False, new_tokens=new_tokens)
    counted = eager.per_step()
    launches = None
    if cell.device.startswith("cuda"):
        launched = StepCounters(count_ops=False, profile_launches=True)
        run(timer=launched, compile_step=compile_step, new_tokens=new_tokens)
        launches = launched.per_step()["kernel_launches"]
    return {
        "decode_aten_ops_per_step": counted["aten_ops"],
        "decode_host_syncs_per_step": counted["host_syncs"],
        "decode_alloc_bytes_per_step": counted["alloc_bytes"],
        "decode_kernel_launches_per_step": launches,
    }


def measure(cell: Cell) -> list[dict]:
    """Measure `cell`; one dict per repetition."""
    import prefixkv

    _fault(cell)
    if cell.device == "cpu" and cell.cpu_threads:
        torch.set_num_threads(cell.cpu_threads)
    torch.manual_seed(cell.seed)
    loaded = build(cell.model, cell.device, cell.dtype)
    model, inputs = loaded.model, loaded.make_inputs(cell.batch_size, cell.text_tokens, cell.seed)
    _extra_work_hook(model, cell)  # test-only (module docstring); lives as long as the model
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(cell.method_kwargs)
    compile_step = cell.compile

    def run(method: str = cell.method, budget: float = cell.budget, *, timer=None, compile_step=compile_step,
            new_tokens=cell.new_tokens, **kw):
        return prefixkv.generate(
            model, inputs, method=method, budget=budget, max_new_tokens=new_tokens, timer=timer,
            compile=compile_step, **kw,
        )

    reference = run("full", 1.0, compile_step=False) if cell.method != "full" else None
    with compile_counters() as compiled:
        for _ in range(cell.warmup):
            run(**kwargs)

        hook = _slow_decode_hook(model, cell)
        telemetry = Telemetry.for_device(cell.device)
        if cell.device.startswith("cuda"):
            synchronize(cell.device)
            torch.cuda.reset_peak_memory_stats(cell.device)
        reps = []
        telemetry.start()
        try:
            for rep in range(cell.repetitions):
                timer = RegionTimer(cell.device)
                e0, t0 = telemetry.energy_mj(), time.perf_counter()
                out, total = timed(lambda timer=timer: run(timer=timer, **kwargs), cell.device)
                e1, t1 = telemetry.energy_mj(), time.perf_counter()
                reps.append((rep, out, total, telemetry.window_energy_j(e0, e1, t0, t1), timer.seconds()))
        finally:
            telemetry.stop()
            if hook is not None:
                hook.remove()
    peak, peak_source = _peak_memory(cell.device)
    counters = _counters(lambda **kw: run(**kwargs, **kw), cell, compile_step)

    new = [s[prompt_length:].tolist() for s in reps[-1][1].sequences]
    ref = new if reference is None else [s[prompt_length:].tolist() for s in reference.sequences]
    continuation = torch.tensor(ref, device=inputs["input_ids"].device)
    logprobs = prefixkv.continuation_logprobs(
        model, inputs, continuation, method=cell.method, budget=cell.budget, **kwargs
    )
    stats = reps[-1][1].cache_stats
    shared = {
        "prompt_length": prompt_length,
        "image_tokens": loaded.image_tokens,
        "model_layers": len(stats.kept),
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(cell.device) if cell.device.startswith("cuda") else None,
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "kv_bytes_per_layer": [int(b) for b in stats.bytes],
        "kv_bytes_total": int(sum(stats.bytes)),
        # KV bytes allocated (decode slots included), and per [layer][kv_head] what each head holds and kept.
        "kv_capacity_bytes_per_layer": [int(b) for b in stats.capacity_bytes],
        "kv_capacity_bytes_total": int(sum(stats.capacity_bytes)),
        "kv_bytes_per_head": [[int(b) for b in layer] for layer in stats.bytes_per_head],
        "kept_per_head": [[int(k) for k in layer] for layer in stats.kept_per_head],
        "kept_per_layer": [int(k) for k in stats.kept],
        "decode": stats.policy,
        "held_per_layer": [int(h) for h in stats.held],
        "evictions": int(sum(stats.evictions)),
        "kept_fraction": stats.kept_fraction,
        "output_tokens": new,
        # Per sequence, then averaged over the batch; ROUGE-L reads token ids as words.
        "token_agreement": statistics.fmean(quality.token_agreement(o, r) for o, r in zip(new, ref, strict=True)),
        "rouge_l": statistics.fmean(
            quality.rouge_l(" ".join(map(str, o)), " ".join(map(str, r))) for o, r in zip(new, ref, strict=True)
        ),
        "perplexity": quality.perplexity(logprobs),
        **telemetry.summary(),
        **counters,
        "compiled": compile_step,
        "compile_graph_breaks": compiled["graph_breaks"] if compile_step else None,
        # Warm-up and repetitions share one graph when nothing recompiles.
        "compile_recompiles": max(0, compiled["graphs"] - 1) if compile_step else None,
        "decode_weight_bytes": decode_weight_bytes(model),
    }
    floor = _byte_floor(cell, shared, stats) if cell.device.startswith("cuda") else {}
    shared.update(floor)
    generated = cell.batch_size * cell.new_tokens
    rows = []
    for rep, _out, total, (energy, energy_source), t in reps:
        steps = [float(s) for s in t.get("decode_step", [])]
        decode = float(sum(steps))
        prefill = float(sum(t.get("prefill", [0.0])))
        step_median = median(steps)
        floor_s = floor.get("decode_floor_s")
        rows.append(
            {
                "rep": rep,
                "status": "ok",
                "error": None,
                "total_s": total,
                "prefill_s": prefill,
                "score_s": float(sum(t.get("score", []))),
                "allocate_s": float(sum(t.get("allocate", []))),
                "compact_s": float(sum(t.get("compact", []))),
                # The first token is the prefill's argmax; it exists once prefill returns.
                "ttft_s": prefill,
                "decode_s": decode,
                "decode_steps_s": steps,
                "decode_step_median_s": step_median,
                "decode_floor_ratio": step_median / floor_s if floor_s and step_median else None,
                "decode_tokens_per_s": cell.batch_size * len(steps) / decode if decode > 0 else None,
                "tokens_per_s": generated / total,
                "energy_j": energy,
                "energy_source": energy_source,
                "j_per_token": None if energy is None else energy / generated,
                **shared,
            }
        )
    return rows


def _byte_floor(cell: Cell, shared: dict, stats) -> dict:
    """The decode step's byte floor on this GPU: decoder weights plus the mean KV cache held over the steps, over
    the copy bandwidth measured now, in this process."""
    bandwidth = copy_bandwidth_gbps(cell.device)
    if not bandwidth:
        return {"copy_bandwidth_gbps": None}
    entry_bytes = [b / h if h else 0.0 for b, h in zip(stats.bytes, stats.held, strict=True)]
    kv_mean = sum(e * (k + h) / 2 for e, k, h in zip(entry_bytes, stats.kept, stats.held, strict=True))
    floor_bytes = shared["decode_weight_bytes"] + kv_mean
    return {
        "copy_bandwidth_gbps": bandwidth,
        "decode_floor_bytes": int(floor_bytes),
        "decode_floor_s": floor_bytes / (bandwidth * 1e9),
    }


def main(argv: list[str] | None = None) -> int:
    cell_file, result_file = argv or sys.argv[1:]
    cell = Cell.from_json(Path(cell_file).read_text())
    try:
        result = {"status": "ok", "rows": measure(cell)}
    except torch.OutOfMemoryError as err:
        result = {"status": "oom", "error": str(err).strip().splitlines()[0]}
    except Exception as err:  # noqa: BLE001 - any failure is this cell's outcome; the sweep goes on
        tb = traceback.format_exc(limit=-3)
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": tb}
    Path(result_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
