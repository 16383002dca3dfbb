"""Peak memory of one generation, each variant in a fresh process:
`python -m bench.peak_memory --methods "A,B" [--model smollm2-135m] [--batch 4] [--length 512] [--budget 0.2]
[--out rows.jsonl]`.

A benchmark cell's peak memory on CPU is its process's peak RSS since it started, which includes the full-cache
reference it generates first, so it cannot tell two methods' KV caches apart. Here each variant runs alone in its
own process: the model is loaded and warmed up (every weight read once - safetensors are memory-mapped, so the
first forward pass would page in the whole model - and a one-token forward), freed memory is handed back to the
system (glibc `malloc_trim`), the peak RSS is reset to the current RSS (Linux: `/proc/self/clear_refs`), one
`prefixkv.generate` runs, and the peak RSS above the RSS before it is the generation's own peak: the KV cache
(prefill's and the compressed one) and the activations. RSS also moves with the allocator's habits (arenas,
fragmentation: tens of MiB between two runs of the same code), so the heap's live bytes are sampled too, after
every aten operation (glibc `mallinfo2`: bytes in use, mmapped chunks included; `HeapPeak`): their peak above the
start is deterministic to the operation (a custom op's temporaries, freed before it returns, are not seen). On
CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) above the memory allocated before is used instead.
Each line also gives the KV bytes allocated and held after generation (`prefixkv.CacheStats`); `--out` appends each
row, with its settings, to a JSON-lines file as it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefixkv
from bench.realtext.evaluate import parse_methods

MIB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapPeak(TorchDispatchMode):
    """The peak of the C heap's live bytes (glibc `mallinfo2`: in use + mmapped) above its value on entry, sampled
    after every aten operation dispatched inside the block (`peak`, bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = _Mallinfo2
        self.start = self.live()
        self.peak = 0

    def live(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.live() - self.start)
        return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(model_name: str, device: str, label: str, batch: int, length: int, new_tokens: int, budget: float) -> dict:
    """In this process: load the model, then one generation's peak memory above what was held before it."""
    from bench.models import build

    (variant,) = parse_methods(label)
    loaded = build(model_name, device, "float32")
    inputs = loaded.make_inputs(batch, length, 0)
    with torch.inference_mode():
        for parameter in loaded.model.parameters():
            parameter.sum()
        loaded.model(input_ids=inputs["input_ids"][:1, :1], use_cache=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
        before = _status_kib("VmRSS") * 1024
    heap = HeapPeak() if device == "cpu" else contextlib.nullcontext()
    with heap:
        out = prefixkv.generate(loaded.model, inputs, method=variant.method, budget=budget,
                                max_new_tokens=new_tokens, **variant.kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        peak, source = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, source = _status_kib("VmHWM") * 1024, "peak RSS (VmHWM)"
    stats = out.cache_stats
    return {
        "method": label,
        "model": model_name,
        "device": device,
        "batch": batch,
        "length": length,
        "new_tokens": new_tokens,
        "budget": budget,
        "peak_above_before_mib": (peak - before) / MIB,
        "peak_source": source,
        "heap_peak_mib": heap.peak / MIB if device == "cpu" else None,
        "kv_allocated_mib": sum(stats.capacity_bytes) / MIB,
        "kv_held_mib": sum(stats.bytes) / MIB,
        "prompt_length": stats.prompt_length,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="comma-separated name[key=value,...] variants")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="text tokens of the prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each process")
    parser.add_argument("--out", type=Path, help="JSON-lines file the rows are appended to")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one variant, JSON out
    args = parser.parse_args(argv)
    if args.one:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.device, args.methods, args.batch, args.length, args.new_tokens,
                                 args.budget)))
        return 0
    try:
        variants = parse_methods(args.methods)
        prefixkv.check_budget(args.budget)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for variant in variants:
        cmd = [sys.executable, "-m", "bench.peak_memory", "--one", "--methods", variant.label, "--model", args.model,
               "--device", args.device, "--batch", str(args.batch), "--length", str(args.length), "--new-tokens",
               str(args.new_tokens), "--budget", str(args.budget), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant.label}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1]) | {"threads": args.threads}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:  # one line per row: a crash loses at most the row in progress
                f.write(json.dumps(row) + "\n")
        heap = "" if row["heap_peak_mib"] is None else f"live heap peak {row['heap_peak_mib']:.2f} MiB, "
        print(f"{row['method']}: {heap}peak {row['peak_above_before_mib']:.1f} MiB above the loaded model "
              f"({row['peak_source']}); KV allocated {row['kv_allocated_mib']:.2f} MiB, held "
              f"{row['kv_held_mib']:.2f} MiB; prompt {row['prompt_length']} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
