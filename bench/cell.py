"""One cell, measured in its own process: `python -m bench.cell CELL_JSON RESULT_JSON` (the runner calls it).

Order of work, so that nothing untimed leaks into the timed region and nothing timed is a first call:
1. build the model and the prompt; generate with the full cache once (the quality reference, untimed);
2. warm up the method (`warmup` untimed calls);
3. `repetitions` timed calls of `prefixkv.generate`, inside the telemetry sampler, reading the energy counter around
   each; the generation's own host-synchronised timings split prefill / score / allocate / compact / decode;
4. quality against the reference: token agreement, ROUGE-L, and the perplexity of the reference continuation under
   the compressed cache (teacher forcing).

The result (one row per repetition) is written as JSON; a failure writes `status` and `error` instead, and a crash
leaves no file at all, which the runner records as the cell's outcome.

Test-only hooks (environment variables; never set outside tests):
- BENCH_TEST_FAULT="MODE:METHOD[,MODE:METHOD...]": cells of METHOD fail before any work - MODE `raise` raises,
  `exit` calls os._exit(3) (a crash), `oom` raises torch.OutOfMemoryError, `hang` sleeps past any timeout.
- BENCH_TEST_SLOW_DECODE="METHOD:SECONDS": every decode step of METHOD sleeps SECONDS (an injected regression).
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
from bench.matrix import Cell
from bench.models import build
from bench.telemetry import Telemetry
from bench.timing import median, timed


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


def _peak_memory(device: str) -> tuple[int | None, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process, model and interpreter included, since it started.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss * 1024 if sys.platform.startswith("linux") else rss), "process peak RSS"


def measure(cell: Cell) -> list[dict]:
    """Measure `cell`; one dict per repetition."""
    import prefixkv

    _fault(cell)
    if cell.device == "cpu" and cell.cpu_threads:
        torch.set_num_threads(cell.cpu_threads)
    torch.manual_seed(cell.seed)
    loaded = build(cell.model, cell.device, cell.dtype)
    model, inputs = loaded.model, loaded.make_inputs(cell.batch_size, cell.text_tokens, cell.seed)
    prompt_length = inputs["input_ids"].shape[1]
    kwargs = dict(cell.method_kwargs)

    def run(method: str = cell.method, budget: float = cell.budget, **kw):
        return prefixkv.generate(model, inputs, method=method, budget=budget, max_new_tokens=cell.new_tokens, **kw)

    reference = run("full", 1.0) if cell.method != "full" else None
    for _ in range(cell.warmup):
        run(**kwargs)

    hook = _slow_decode_hook(model, cell)
    telemetry = Telemetry.for_device(cell.device)
    if cell.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cell.device)
    reps = []
    telemetry.start()
    try:
        for rep in range(cell.repetitions):
            e0, t0 = telemetry.energy_mj(), time.perf_counter()
            out, total = timed(lambda: run(**kwargs), cell.device)
            e1, t1 = telemetry.energy_mj(), time.perf_counter()
            reps.append((rep, out, total, telemetry.window_energy_j(e0, e1, t0, t1)))
    finally:
        telemetry.stop()
        if hook is not None:
            hook.remove()
    peak, peak_source = _peak_memory(cell.device)

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
    }
    generated = cell.batch_size * cell.new_tokens
    rows = []
    for rep, out, total, (energy, energy_source) in reps:
        t = out.timings
        steps = [float(s) for s in t.get("decode_steps", [])]
        decode = float(t.get("decode", sum(steps)))
        rows.append(
            {
                "rep": rep,
                "status": "ok",
                "error": None,
                "total_s": total,
                "prefill_s": float(t["prefill"]),
                "score_s": float(t.get("score", 0.0)),
                "allocate_s": float(t.get("allocate", 0.0)),
                "compact_s": float(t.get("compact", 0.0)),
                # The first token is the prefill's argmax; it exists once prefill returns.
                "ttft_s": float(t["prefill"]),
                "decode_s": decode,
                "decode_steps_s": steps,
                "decode_step_median_s": median(steps),
                "decode_tokens_per_s": cell.batch_size * len(steps) / decode if decode > 0 else None,
                "tokens_per_s": generated / total,
                "energy_j": energy,
                "energy_source": energy_source,
                "j_per_token": None if energy is None else energy / generated,
                **shared,
            }
        )
    return rows


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
