"""A cell with a known regression injected into each decode step of its own method - never into the full-cache
reference beside it: the current sides of `python -m bench.gate_trials`, which measure what the gate catches.

    python -m bench.injected_cell CELL_JSON RESULT_JSON --slow-decode SECONDS [--methods prefixkv,h2o]
    python -m bench.injected_cell CELL_JSON RESULT_JSON --extra-decode-work [--methods prefixkv]

`--slow-decode` sleeps SECONDS before every decode step (a slowdown only the timing layer can see);
`--extra-decode-work` runs one more allocation and kernel in every decode step (what only the counters see for sure).
`--methods` limits the injection to cells of those methods (default: every cell but the full cache). An executor
runs this module in place of `bench.cell` when built with `entry=entry(...)`:
`LocalExecutor(entry=injected_cell.entry(slow_decode_s=0.001))`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import cell as cell_module
from bench.matrix import Cell

MODULE = "bench.injected_cell"


def entry(*, slow_decode_s: float | None = None, extra_decode_work: bool = False,
          methods: Sequence[str] = ()) -> tuple[str, ...]:
    """The executor entry (module and arguments) that runs cells with these injections."""
    if slow_decode_s is None and not extra_decode_work:
        raise ValueError("entry(): give slow_decode_s, extra_decode_work or both")
    args: list[str] = [MODULE]
    if slow_decode_s is not None:
        if not slow_decode_s > 0:
            raise ValueError(f"slow_decode_s must be > 0, got {slow_decode_s!r}")
        args += ["--slow-decode", f"{slow_decode_s:.9f}"]
    if extra_decode_work:
        args.append("--extra-decode-work")
    if methods:
        args += ["--methods", ",".join(methods)]
    return tuple(args)


def _is_decode_step(args: tuple, kwargs: dict) -> bool:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids is not None and ids.shape[-1] == 1


def perturbation(slow_decode_s: float | None, extra_decode_work: bool):
    """A `bench.cell.Perturbation`: a forward pre-hook on the model, for the duration of each call of the cell's
    method, that sleeps and/or adds work before every decode step (a one-token forward)."""

    def hook(module, args, kwargs):
        if not _is_decode_step(args, kwargs):
            return
        if slow_decode_s is not None:
            time.sleep(slow_decode_s)
        if extra_decode_work:
            ids = kwargs.get("input_ids", args[0] if args else None)
            torch.ones(64, device=ids.device).add_(1)

    @contextmanager
    def around(model: torch.nn.Module) -> Iterator[None]:
        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return around


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("cell_json")
    parser.add_argument("result_json")
    parser.add_argument("--slow-decode", type=float, metavar="SECONDS")
    parser.add_argument("--extra-decode-work", action="store_true")
    parser.add_argument("--methods", help="comma-separated methods to perturb (default: all but full)")
    args = parser.parse_args(argv)
    cell = Cell.from_json(Path(args.cell_json).read_text())
    targets = set(args.methods.split(",")) if args.methods else None
    chosen = cell.method in targets if targets is not None else cell.method != "full"
    injected = perturbation(args.slow_decode, args.extra_decode_work) if chosen else None
    return cell_module.main([args.cell_json, args.result_json], perturbation=injected)


if __name__ == "__main__":
    raise SystemExit(main())
